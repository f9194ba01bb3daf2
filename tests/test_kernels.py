"""Triton kernels against the PyTorch reference, on CPU under TRITON_INTERPRET=1.

The launchers are called directly (the public dispatch sends CPU tensors to the
reference). Every comparison feeds the kernel and the reference the same logits and
the same noise and requires the same tokens and counts, exactly. Tiles are kept small
so rows span several of them, and shapes are small because the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import specdec.kernels as kernels
from specdec.kernels import reference

greedy_mod = pytest.importorskip("specdec.kernels.greedy")
sampling_mod = pytest.importorskip("specdec.kernels.sampling")
probs_mod = pytest.importorskip("specdec.kernels.probs")
from specdec.kernels import _launch  # noqa: E402

# conftest.py sets TRITON_INTERPRET=1 only where there is no CUDA device; this module
# never sets it, so importing it cannot turn the GPU tests' compiled kernels into
# interpreted ones. With CUDA the kernels here are compiled and these CPU-tensor tests
# run in a process of their own (test_kernels_isolation.py), under the interpreter.
# A mark, not a module-level skip: `pytest -m gpu` then deselects these tests instead of
# reporting a skip on a GPU machine.
pytestmark = pytest.mark.skipif(
    not _launch.is_interpreted(greedy_mod._row_argmax_kernel),
    reason="compiled Triton kernels (CUDA present): these interpreter tests run in their own process, "
           "see tests/test_kernels_isolation.py",
)

VOCABS = [7, 111, 1000, 4099]
# Tiles for the plain passes: several tiles per row, a partial last tile.
PLAIN_BLOCK = {7: 16, 111: 32, 1000: 128, 4099: 512}
# Tiles when top-k/top-p searches run (up to 18 passes per row): one tile per row where
# possible to keep the interpreter fast; 4099 and the tie tests still span several tiles.
FILTER_BLOCK = {7: 16, 111: 128, 1000: 1024, 4099: 1024}

verify_greedy_triton = greedy_mod.verify_greedy_triton
verify_sampling_triton = sampling_mod.verify_sampling_triton
logits_to_probs_triton = probs_mod.logits_to_probs_triton


# --------------------------------------------------------------------------- helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ragged(batch: int, k: int, g: torch.Generator) -> torch.Tensor:  # [B]
    return torch.randint(0, k + 1, (batch,), generator=g)


def _pad(tokens: torch.Tensor, num_draft: torch.Tensor | None) -> torch.Tensor:
    """-1 in draft slots past each row's num_draft, like the drafters produce."""
    if num_draft is None:
        return tokens
    slots = torch.arange(tokens.shape[1]).unsqueeze(0)
    return torch.where(slots < num_draft.unsqueeze(1), tokens, torch.full_like(tokens, -1))


def _noise(batch: int, k: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    uniforms = torch.rand(batch, k, generator=g)  # [B, K]
    exponentials = torch.empty(batch, vocab).exponential_(generator=g)  # [B, V]
    return uniforms, exponentials


def _sample(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:  # [..., V] -> [...]
    noise = torch.empty(probs.shape).exponential_(generator=g)
    return reference.sample_exponential_race(probs, noise)


def _greedy_drafts(logits: torch.Tensor, corrupt: float, g: torch.Generator) -> torch.Tensor:  # [B, K]
    """The target's argmax with each slot replaced by another token with prob `corrupt`."""
    best = logits[:, :-1].argmax(-1)
    vocab = logits.shape[-1]
    shift = torch.randint(1, max(vocab, 2), best.shape, generator=g)
    flip = torch.rand(best.shape, generator=g) < corrupt
    return torch.where(flip, (best + shift) % vocab, best)


def _check_layout(tokens, num_accepted, draft_tokens, num_draft, vocab):
    """tokens[:n] are the accepted drafts, tokens[n] is a real token, -1 after."""
    batch, k = draft_tokens.shape
    assert tokens.shape == (batch, k + 1) and tokens.dtype == torch.int64
    assert num_accepted.shape == (batch,) and num_accepted.dtype == torch.int64
    limit = num_draft if num_draft is not None else torch.full((batch,), k)
    for row in range(batch):
        n = int(num_accepted[row])
        assert 0 <= n <= int(limit[row])
        assert torch.equal(tokens[row, :n], draft_tokens[row, :n].to(torch.int64))
        assert 0 <= int(tokens[row, n]) < vocab
        assert bool((tokens[row, n + 1:] == -1).all())


def _assert_same(got, want, draft_tokens, num_draft, vocab):
    tokens, num_accepted = got
    assert torch.equal(num_accepted, want[1]), f"counts {num_accepted.tolist()} != reference {want[1].tolist()}"
    assert torch.equal(tokens, want[0]), f"tokens {tokens.tolist()} != reference {want[0].tolist()}"
    _check_layout(tokens, num_accepted, draft_tokens, num_draft, vocab)


def _sampling_case(batch, k, vocab, seed, *, temperature=1.0, top_k=0, top_p=1.0, model=True,
                   ragged=True, dtype=torch.float32, spread=3.0):
    """Target logits, correlated draft probs and drafts sampled from them, and noise."""
    g = _gen(seed)
    target = torch.randn(batch, k + 1, vocab, generator=g) * spread  # [B, K+1, V]
    num_draft = _ragged(batch, k, g) if ragged else None
    if model:
        draft_logits = target[:, :k] + 0.7 * torch.randn(batch, k, vocab, generator=g)
        draft_probs = reference.logits_to_probs(draft_logits, temperature, top_k, top_p)  # [B, K, V]
        drafts = _sample(draft_probs, g)
    else:
        draft_probs = None
        p = reference.logits_to_probs(target[:, :k], temperature, top_k, top_p)
        drafts = _sample(p, g)  # one-hot drafter that often guesses well
    drafts = _pad(drafts, num_draft)
    uniforms, exponentials = _noise(batch, k, vocab, g)
    return dict(draft_tokens=drafts, draft_probs=draft_probs, target_logits=target.to(dtype),
                uniforms=uniforms, exponentials=exponentials, num_draft=num_draft,
                temperature=temperature, top_k=top_k, top_p=top_p)


def _run_sampling(case, block):
    want = reference.verify_sampling(
        case["draft_tokens"], case["draft_probs"], case["target_logits"], case["uniforms"],
        case["exponentials"], temperature=case["temperature"], top_k=case["top_k"],
        top_p=case["top_p"], num_draft=case["num_draft"],
    )
    got = verify_sampling_triton(
        case["draft_tokens"], case["draft_probs"], case["target_logits"], case["uniforms"],
        case["exponentials"], temperature=case["temperature"], top_k=case["top_k"],
        top_p=case["top_p"], num_draft=case["num_draft"], block_size=block,
    )
    _assert_same(got, want, case["draft_tokens"], case["num_draft"], case["target_logits"].shape[-1])
    return got


# --------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch,k", [(1, 1), (4, 5), (3, 3)])
def test_greedy_matches_reference_ragged(vocab, batch, k):
    g = _gen(vocab * 100 + batch * 10 + k)
    logits = torch.randn(batch, k + 1, vocab, generator=g)
    num_draft = _ragged(batch, k, g)
    drafts = _pad(_greedy_drafts(logits, 0.3, g), num_draft)
    want = reference.verify_greedy(drafts, logits, num_draft)
    got = verify_greedy_triton(drafts, logits, num_draft, block_size=PLAIN_BLOCK[vocab])
    _assert_same(got, want, drafts, num_draft, vocab)


@pytest.mark.parametrize("vocab", VOCABS)
def test_greedy_perfect_match_emits_bonus(vocab):
    g = _gen(vocab)
    logits = torch.randn(4, 6, vocab, generator=g)
    drafts = logits[:, :-1].argmax(-1)
    tokens, num_accepted = verify_greedy_triton(drafts, logits, block_size=PLAIN_BLOCK[vocab])
    assert num_accepted.tolist() == [5] * 4
    assert torch.equal(tokens, logits.argmax(-1))  # every draft, then the bonus argmax


def test_greedy_early_mismatch():
    g = _gen(1)
    logits = torch.randn(3, 5, 1000, generator=g)
    drafts = logits[:, :-1].argmax(-1)
    drafts[:, 0] = (drafts[:, 0] + 1) % 1000  # wrong from the first slot on
    tokens, num_accepted = verify_greedy_triton(drafts, logits, block_size=128)
    assert num_accepted.tolist() == [0, 0, 0]
    assert torch.equal(tokens[:, 0], logits[:, 0].argmax(-1))
    assert bool((tokens[:, 1:] == -1).all())


def test_greedy_empty_draft():
    g = _gen(2)
    logits = torch.randn(3, 1, 111, generator=g)
    drafts = torch.empty(3, 0, dtype=torch.int64)
    tokens, num_accepted = verify_greedy_triton(drafts, logits, block_size=32)
    assert num_accepted.tolist() == [0, 0, 0]
    assert torch.equal(tokens[:, 0], logits[:, 0].argmax(-1))
    # K > 0 but no drafts in any row: only position 0 is read and emitted.
    logits = torch.randn(2, 4, 111, generator=g)
    drafts = torch.full((2, 3), -1, dtype=torch.int64)
    zero = torch.zeros(2, dtype=torch.int64)
    tokens, num_accepted = verify_greedy_triton(drafts, logits, zero, block_size=32)
    assert num_accepted.tolist() == [0, 0]
    assert tokens[:, 0].tolist() == logits[:, 0].argmax(-1).tolist()
    assert bool((tokens[:, 1:] == -1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_ties_resolve_to_lowest_id(dtype):
    g = _gen(3)
    # Few distinct values: the maximum is shared by many ids in every row and tile.
    logits = torch.randint(-3, 3, (4, 6, 1000), generator=g).to(dtype)
    logits[:, :, 999] = 2  # a tied maximum in the last, partial tile too
    num_draft = torch.tensor([5, 2, 0, 4])
    drafts = _pad(_greedy_drafts(logits.float(), 0.2, g), num_draft)
    want = reference.verify_greedy(drafts, logits, num_draft)
    got = verify_greedy_triton(drafts, logits, num_draft, block_size=128)
    _assert_same(got, want, drafts, num_draft, 1000)


def test_greedy_int32_drafts_and_out_of_vocab_tokens():
    g = _gen(4)
    logits = torch.randn(3, 4, 111, generator=g)
    drafts = logits[:, :-1].argmax(-1)
    drafts[0, 1] = 111  # past the vocabulary
    drafts[1, 0] = -1  # padding value in a real slot
    want = reference.verify_greedy(drafts, logits)
    got = verify_greedy_triton(drafts.to(torch.int32), logits, block_size=32)
    assert got[1].tolist() == [1, 0, 3]
    _assert_same(got, want, drafts, None, 111)


def test_greedy_strided_batch_rows():
    g = _gen(5)
    big = torch.randn(4, 7, 1000, generator=g)
    logits = big[:, 1:5]  # [4, 4, V] view with a batch stride that is not (K+1) * V
    drafts = _greedy_drafts(logits, 0.3, g)
    want = reference.verify_greedy(drafts, logits)
    got = verify_greedy_triton(drafts, logits, block_size=128)
    _assert_same(got, want, drafts, None, 1000)


# --------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("model", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("batch,k,temperature", [(4, 5, 1.0), (3, 2, 0.7), (2, 4, 1.3)])
def test_sampling_matches_reference_ragged(vocab, model, batch, k, temperature):
    case = _sampling_case(batch, k, vocab, seed=vocab + 7 * k, temperature=temperature, model=model)
    _run_sampling(case, PLAIN_BLOCK[vocab])


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (20, 0.9)])
def test_sampling_top_k_top_p_matches_reference(vocab, top_k, top_p):
    # top-k alone is covered by the tie tests below and by the probs tests.
    case = _sampling_case(2, 2, vocab, seed=vocab + top_k, temperature=0.8, top_k=top_k, top_p=top_p)
    _run_sampling(case, FILTER_BLOCK[vocab])
    case = _sampling_case(2, 1, vocab, seed=vocab + top_k + 1, temperature=1.0, top_k=top_k, top_p=top_p,
                          model=False)
    _run_sampling(case, FILTER_BLOCK[vocab])


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (4, 0.7)])
def test_sampling_filters_with_tied_logits(top_k, top_p):
    # Integer logits tie at the top-k and top-p boundaries; ties are kept on both sides.
    g = _gen(6)
    target = torch.randint(-2, 3, (2, 3, 111), generator=g).float()
    draft_probs = reference.logits_to_probs(target[:, :2] + torch.randint(0, 2, (2, 2, 111), generator=g),
                                            1.0, top_k, top_p)
    drafts = _sample(draft_probs, g)
    uniforms, exponentials = _noise(2, 2, 111, g)
    args = (drafts, draft_probs, target, uniforms, exponentials)
    kwargs = dict(temperature=1.0, top_k=top_k, top_p=top_p)
    want = reference.verify_sampling(*args, **kwargs)
    got = verify_sampling_triton(*args, **kwargs, block_size=64)
    _assert_same(got, want, drafts, None, 111)


def test_sampling_all_accepted_then_bonus():
    case = _sampling_case(4, 5, 1000, seed=11, ragged=False)
    case["uniforms"] = torch.zeros(4, 5)  # accept iff p(d) > 0
    tokens, num_accepted = _run_sampling(case, 128)
    assert num_accepted.tolist() == [5, 5, 5, 5]
    # The bonus token is the race over p at position K with the row's noise.
    p_bonus = reference.logits_to_probs(case["target_logits"][:, 5])
    assert torch.equal(tokens[:, 5], reference.sample_exponential_race(p_bonus, case["exponentials"]))


def test_sampling_perfect_match_draft_equals_target():
    """q == p: every draft is accepted whatever u < 1 is (u * q < p)."""
    g = _gen(12)
    target = torch.randn(3, 5, 1000, generator=g) * 2
    num_draft = torch.tensor([4, 2, 0])
    # q computed by the kernel is bit-identical to the verifier's own p.
    draft_probs = logits_to_probs_triton(target[:, :4].contiguous(), 0.9, block_size=128)
    drafts = _pad(_sample(draft_probs, g), num_draft)
    uniforms, exponentials = _noise(3, 4, 1000, g)
    tokens, num_accepted = verify_sampling_triton(drafts, draft_probs, target, uniforms, exponentials,
                                                  temperature=0.9, num_draft=num_draft, block_size=128)
    assert num_accepted.tolist() == [4, 2, 0]
    _check_layout(tokens, num_accepted, drafts, num_draft, 1000)


def test_sampling_early_rejection_samples_residual():
    g = _gen(13)
    target = torch.randn(3, 4, 111, generator=g) * 3
    p = reference.logits_to_probs(target)
    drafts = p[:, :3].argmin(-1)  # the target's least likely token ...
    draft_probs = torch.zeros(3, 3, 111)
    draft_probs.scatter_(-1, drafts.unsqueeze(-1), 1.0)  # ... proposed with certainty
    uniforms, exponentials = _noise(3, 3, 111, g)
    args = (drafts, draft_probs, target, uniforms, exponentials)
    tokens, num_accepted = verify_sampling_triton(*args, block_size=32)
    assert num_accepted.tolist() == [0, 0, 0]
    # Residual max(0, p - q) is p without the rejected token.
    assert bool((tokens[:, 0] != drafts[:, 0]).all())
    _assert_same((tokens, num_accepted), reference.verify_sampling(*args), drafts, None, 111)


def test_sampling_empty_draft():
    g = _gen(14)
    target = torch.randn(3, 1, 1000, generator=g)
    uniforms, exponentials = _noise(3, 0, 1000, g)
    drafts = torch.empty(3, 0, dtype=torch.int64)
    for draft_probs in (None, torch.empty(3, 0, 1000)):
        args = (drafts, draft_probs, target, uniforms, exponentials)
        got = verify_sampling_triton(*args, temperature=0.5, block_size=128)
        assert got[1].tolist() == [0, 0, 0]
        _assert_same(got, reference.verify_sampling(*args, temperature=0.5), drafts, None, 1000)
    # K > 0, num_draft = 0 everywhere: a plain sample of p at position 0.
    case = _sampling_case(3, 3, 1000, seed=15)
    case["num_draft"] = torch.zeros(3, dtype=torch.int64)
    case["draft_tokens"] = torch.full((3, 3), -1, dtype=torch.int64)
    tokens, num_accepted = _run_sampling(case, 128)
    assert num_accepted.tolist() == [0, 0, 0]


@pytest.mark.parametrize("model", [True, False], ids=["draft_probs", "one_hot"])
def test_sampling_zero_residual_falls_back_to_p(model):
    """u = 1 rejects even when p == q; the residual is then all zeros and the reference
    samples p itself. top_k = 1 makes p and q exactly one-hot in both implementations."""
    g = _gen(16)
    target = torch.randn(2, 2, 111, generator=g)
    drafts = target[:, :1].argmax(-1)
    draft_probs = reference.logits_to_probs(target[:, :1], 1.0, 1) if model else None
    uniforms = torch.ones(2, 1)
    _, exponentials = _noise(2, 1, 111, g)
    args = (drafts, draft_probs, target, uniforms, exponentials)
    got = verify_sampling_triton(*args, top_k=1, block_size=32)
    assert got[1].tolist() == [0, 0]
    assert torch.equal(got[0][:, 0], drafts[:, 0])
    _assert_same(got, reference.verify_sampling(*args, top_k=1), drafts, None, 111)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampling_half_precision_logits(dtype):
    case = _sampling_case(4, 3, 1000, seed=17, temperature=0.7, dtype=dtype)
    _run_sampling(case, 128)


def test_sampling_out_of_vocab_draft_is_rejected():
    case = _sampling_case(2, 3, 111, seed=18, model=False, ragged=False)
    case["draft_tokens"][:, 0] = 500
    case["uniforms"] = torch.zeros(2, 3)
    tokens, num_accepted = verify_sampling_triton(
        case["draft_tokens"], None, case["target_logits"], case["uniforms"], case["exponentials"],
        block_size=32)
    assert num_accepted.tolist() == [0, 0]
    p0 = reference.logits_to_probs(case["target_logits"][:, 0])
    assert torch.equal(tokens[:, 0], reference.sample_exponential_race(p0, case["exponentials"]))


@pytest.mark.parametrize("model", [True, False], ids=["draft_probs", "one_hot"])
def test_sampling_drafts_outside_the_vocabulary_match_the_reference(model):
    """-1 (what a drafter returns for a row without an allowed token) and ids >= V in real
    draft slots: p = 0 there, so both implementations reject them and sample the same."""
    case = _sampling_case(4, 3, 111, seed=19, model=model, ragged=False)
    case["draft_tokens"][0, 0] = -1
    case["draft_tokens"][1, 1] = 111
    case["draft_tokens"][2, 2] = -1
    case["draft_tokens"][3, 0] = 5000
    for uniforms in (torch.zeros(4, 3), torch.rand(4, 3, generator=_gen(20))):
        case["uniforms"] = uniforms
        tokens, num_accepted = _run_sampling(case, 32)
        assert int(num_accepted[0]) == 0 and int(num_accepted[1]) <= 1 and int(num_accepted[3]) == 0
        assert bool((tokens >= -1).all()) and int(tokens[0, 0]) >= 0


def test_sampling_seeded_determinism():
    """Same seed -> same noise -> the same tokens from kernel and reference, every time."""
    def run(seed):
        case = _sampling_case(4, 4, 1000, seed=seed, temperature=1.0, spread=1.0)
        return _run_sampling(case, 512)

    first, again = run(21), run(21)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [run(s)[0] for s in (22, 23)]
    assert any(not torch.equal(first[0], other) for other in others)


# --------------------------------------------------------------------------- logits -> probs

def _assert_probs_close(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got > 0, want > 0), "kept token sets differ"
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 10, 1.0), (1.2, 0, 0.9), (0.8, 50, 0.7)])
def test_probs_matches_reference(vocab, temperature, top_k, top_p):
    g = _gen(vocab + top_k)
    logits = torch.randn(2, vocab, generator=g) * 3
    block = PLAIN_BLOCK[vocab] if (top_k, top_p) == (0, 1.0) else FILTER_BLOCK[vocab]
    got = logits_to_probs_triton(logits, temperature, top_k, top_p, block_size=block)
    _assert_probs_close(got, reference.logits_to_probs(logits, temperature, top_k, top_p))


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (7, 1.0), (0, 0.3), (0, 0.95), (6, 0.5), (0, 0.0)])
def test_probs_ties_at_the_boundary_are_kept(top_k, top_p):
    g = _gen(31)
    logits = torch.randint(-3, 3, (2, 111), generator=g).float()
    got = logits_to_probs_triton(logits, 1.0, top_k, top_p, block_size=64)
    _assert_probs_close(got, reference.logits_to_probs(logits, 1.0, top_k, top_p))


def test_probs_shapes_dtypes_and_strided_rows():
    g = _gen(32)
    logits = torch.randn(2, 3, 1000, generator=g).to(torch.bfloat16)  # [B, K, V]
    _assert_probs_close(logits_to_probs_triton(logits, 0.7, block_size=128),
                        reference.logits_to_probs(logits, 0.7))
    last = torch.randn(3, 5, 111, generator=g)[:, -1, :]  # [B, V] rows with stride 5 * V
    _assert_probs_close(logits_to_probs_triton(last, 1.0, 0, 0.9, block_size=32),
                        reference.logits_to_probs(last, 1.0, 0, 0.9))
    masked = torch.randn(2, 111, generator=g)
    masked[:, 40:] = float("-inf")  # a vocabulary mask
    _assert_probs_close(logits_to_probs_triton(masked, 1.0, 50, 1.0, block_size=32),
                        reference.logits_to_probs(masked, 1.0, 50, 1.0))


# --------------------------------------------------------------------------- non-finite logits

def _nonfinite_logits(batch: int, k: int, vocab: int, seed: int) -> torch.Tensor:  # [B, K+1, V]
    """Logits with the cases of reference.py's non-finite policy, one per (row, position):
    NaN entries (one at the row maximum), scattered -inf, two +inf ties, and rows with no
    allowed token (all -inf, all NaN, a mix), across tile boundaries."""
    g = _gen(seed)
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(batch, k + 1, vocab, generator=g) * 3
    logits[0, 0, logits[0, 0].argmax()] = nan  # the would-be argmax is NaN
    logits[0, 0, ::7] = nan
    logits[0, 1, 1::3] = -inf
    logits[1, 0, [vocab // 3, vocab - 1]] = inf  # tied +inf, the later one in the last tile
    logits[1, 1] = -inf  # no allowed token
    logits[2, 2] = nan  # no allowed token, after two normal positions
    logits[3, 0, : vocab // 2] = -inf
    logits[3, 0, vocab // 2:] = nan  # no allowed token, mixed
    logits[3, 1, 5] = inf
    logits[3, 1, 9] = nan
    return logits


@pytest.mark.parametrize("vocab", [111, 1000])
def test_greedy_non_finite_logits_follow_the_policy(vocab):
    logits = _nonfinite_logits(4, 3, vocab, seed=51)
    best = reference.sanitize_logits(logits).argmax(-1)  # [B, K+1]; all-excluded rows pick 0 here
    drafts = best[:, :3].clone()
    drafts[3, 0] = -1  # a -1 draft against a position with no token
    want = reference.verify_greedy(drafts, logits)
    got = verify_greedy_triton(drafts, logits, block_size=32 if vocab == 111 else 128)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (got, want)
    assert got[1].tolist() == [3, 1, 2, 0]
    assert got[0][1].tolist() == [vocab // 3, -1, -1, -1]  # lowest +inf id, then no token
    assert got[0][2, 2] == -1 and got[0][3, 0] == -1
    assert not torch.isnan(logits[0, 0, got[0][0, 0]])


@pytest.mark.parametrize("model", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (7, 0.9)])
def test_sampling_non_finite_logits_follow_the_policy(model, top_k, top_p):
    vocab, k = 111, 3
    logits = _nonfinite_logits(4, k, vocab, seed=52)
    g = _gen(53)
    p = reference.logits_to_probs(logits, 0.7, top_k, top_p)  # [B, K+1, V]
    assert not torch.isnan(p).any()
    q = reference.logits_to_probs(logits[:, :k] + torch.randn(4, k, vocab, generator=g), 0.7, top_k, top_p)
    drafts = _sample(p[:, :k] + 1e-3, g)  # allowed tokens mostly, never -1
    for uniforms in (torch.zeros(4, k), torch.rand(4, k, generator=g)):
        _, exponentials = _noise(4, k, vocab, g)
        args = (drafts, q if model else None, logits, uniforms, exponentials)
        kwargs = dict(temperature=0.7, top_k=top_k, top_p=top_p)
        want = reference.verify_sampling(*args, **kwargs)
        got = verify_sampling_triton(*args, **kwargs, block_size=32)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (got, want)
        tokens, n = got
        for b in range(4):
            last = int(tokens[b, n[b]])
            no_token = not bool((p[b, n[b]] > 0).any())
            assert (last == -1) == no_token, (b, last)
            if last >= 0:
                assert p[b, n[b], last] > 0 or (model and bool(n[b] < k)), "sampled an excluded token"
    # Rows 1 and 2 reach a position without a token at the latest there: nothing is accepted past it.
    assert int(n[1]) <= 1 and int(n[2]) <= 2


def test_probs_non_finite_logits_follow_the_policy():
    logits = _nonfinite_logits(4, 3, 1000, seed=54).view(-1, 1000)  # [16, V]
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.5, 40, 1.0), (0.9, 0, 0.8), (1.0, 10, 0.7)):
        block = 128 if (top_k, top_p) == (0, 1.0) else 1024
        got = logits_to_probs_triton(logits, temperature, top_k, top_p, block_size=block)
        want = reference.logits_to_probs(logits, temperature, top_k, top_p)
        assert not torch.isnan(got).any()
        assert torch.equal(got > 0, want > 0), "kept token sets differ"
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
        allowed = (reference.sanitize_logits(logits) > float("-inf")).any(-1)  # [16]
        assert bool((got[~allowed] == 0).all()) and int((~allowed).sum()) == 3
        torch.testing.assert_close(got[allowed].sum(-1), torch.ones(int(allowed.sum())), rtol=0, atol=1e-5)
    # Two +inf logits share all the mass.
    assert got[4].tolist().count(0.5) == 2 and float(got[4].sum()) == 1.0


# --------------------------------------------------------------------------- validation

def _valid_sampling_args():
    return dict(draft_tokens=torch.zeros(2, 3, dtype=torch.int64), draft_probs=torch.full((2, 3, 7), 1 / 7),
                target_logits=torch.randn(2, 4, 7), uniforms=torch.rand(2, 3),
                exponentials=torch.ones(2, 7))


@pytest.mark.parametrize("change,error,match", [
    (dict(target_logits=torch.randn(2, 4, 7, dtype=torch.float64)), TypeError, "float64"),
    (dict(target_logits=torch.zeros(2, 4, 7, dtype=torch.int32)), TypeError, "target_logits has dtype"),
    (dict(target_logits=torch.randn(2, 3, 7)), ValueError, r"expected \(2, 4, 7\)"),
    (dict(target_logits=torch.randn(2, 7, 4).transpose(1, 2)), ValueError, "contiguous"),
    (dict(target_logits=[[0.0]]), TypeError, "torch.Tensor"),
    (dict(draft_tokens=torch.zeros(2, 3)), TypeError, "draft_tokens has dtype"),
    (dict(draft_tokens=torch.zeros(6, dtype=torch.int64)), ValueError, r"\[B, K\]"),
    (dict(draft_probs=torch.rand(2, 3, 8)), ValueError, "draft_probs has shape"),
    (dict(uniforms=torch.rand(2, 4)), ValueError, "uniforms has shape"),
    (dict(exponentials=torch.ones(2, 6)), ValueError, "exponentials has shape"),
    (dict(exponentials=torch.ones(7, 2).t()), ValueError, "exponentials must be contiguous"),
    (dict(uniforms=torch.rand(2, 3, device="meta")), ValueError, "uniforms is on meta"),
    (dict(num_draft=torch.zeros(3, dtype=torch.int64)), ValueError, "num_draft has shape"),
    (dict(num_draft=torch.zeros(2)), TypeError, "num_draft has dtype"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(block_size=100), ValueError, "power of two"),
])
def test_sampling_launcher_rejects_bad_arguments(change, error, match):
    args = _valid_sampling_args() | change
    with pytest.raises(error, match=match):
        verify_sampling_triton(args.pop("draft_tokens"), args.pop("draft_probs"), args.pop("target_logits"),
                               args.pop("uniforms"), args.pop("exponentials"), **args)


@pytest.mark.parametrize("change,error,match", [
    (dict(target_logits=torch.randn(2, 4, 7, dtype=torch.float64)), TypeError, "float64"),
    (dict(target_logits=torch.randn(2, 5, 7)), ValueError, "K\\+1=4"),
    (dict(target_logits=torch.randn(2, 4)), ValueError, r"\[B, K\+1, V\]"),
    (dict(target_logits=torch.randn(2, 4, 0)), ValueError, "V >= 1"),
    (dict(draft_tokens=torch.zeros(2, 3, dtype=torch.int16)), TypeError, "int32, int64"),
    (dict(num_draft=torch.zeros(2, 1, dtype=torch.int64)), ValueError, "num_draft has shape"),
    (dict(num_draft=torch.zeros(2, dtype=torch.int64, device="meta")), ValueError, "num_draft is on meta"),
])
def test_greedy_launcher_rejects_bad_arguments(change, error, match):
    args = dict(draft_tokens=torch.zeros(2, 3, dtype=torch.int64), target_logits=torch.randn(2, 4, 7),
                num_draft=None) | change
    with pytest.raises(error, match=match):
        verify_greedy_triton(args["draft_tokens"], args["target_logits"], args["num_draft"])


@pytest.mark.parametrize("logits,kwargs,error,match", [
    (torch.randn(2, 7, dtype=torch.float64), {}, TypeError, "float64"),
    (torch.randn(7, 2).t(), {}, ValueError, "contiguous"),
    (torch.randn(3, 4, 7).transpose(0, 1), {}, ValueError, "cannot be read as rows"),
    (torch.randn(2, 7), dict(temperature=-1.0), ValueError, "temperature"),
    (torch.randn(2, 7), dict(top_p="0.9"), TypeError, "top_p"),
])
def test_probs_launcher_rejects_bad_arguments(logits, kwargs, error, match):
    with pytest.raises(error, match=match):
        logits_to_probs_triton(logits, **kwargs)


def test_empty_batch():
    tokens, num_accepted = verify_greedy_triton(torch.zeros(0, 2, dtype=torch.int64), torch.randn(0, 3, 7))
    assert tokens.shape == (0, 3) and num_accepted.shape == (0,)
    tokens, num_accepted = verify_sampling_triton(torch.zeros(0, 2, dtype=torch.int64), None, torch.randn(0, 3, 7),
                                                  torch.rand(0, 2), torch.ones(0, 7))
    assert tokens.shape == (0, 3) and num_accepted.shape == (0,)
    assert logits_to_probs_triton(torch.randn(0, 7)).shape == (0, 7)


# --------------------------------------------------------------------------- GPU compiler

def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter never runs Triton's compiler; build the kernels for sm_90 (cubin)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "specdec.kernels.aot_check", "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok    sm_90") == 8


# --------------------------------------------------------------------------- benchmark

def test_kernel_benchmark_quick_grid_runs_under_the_interpreter(tmp_path):
    """benchmarks/bench_kernels.py --quick: every op, kernel and reference agree, files written."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_kernels.py"), "--quick",
                           "--out", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (tmp_path / "kernels_cpu_interpreter_fp32.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["op", "batch", "k"] and "same_output" in header
    body = [dict(zip(header, line.split(","))) for line in rows[1:]]
    assert {r["op"] for r in body} == {"verify_greedy", "verify_sampling", "verify_sampling_topk_topp",
                                       "logits_to_probs", "logits_to_probs_topk_topp"}
    assert all(r["same_output"] == "True" for r in body), [r for r in body if r["same_output"] != "True"]
    assert all(float(r["triton_us"]) > 0 and float(r["reference_us"]) > 0 for r in body)
    md = (tmp_path / "kernels_cpu_interpreter_fp32.md").read_text()
    assert "Interpreter run" in md and "python benchmarks/bench_kernels.py --quick" in md


# --------------------------------------------------------------------------- dispatch

def test_dispatch_uses_the_reference_off_the_gpu():
    assert kernels.triton_available() is False
    g = _gen(41)
    logits = torch.randn(2, 4, 111, generator=g)
    drafts = _greedy_drafts(logits, 0.3, g)
    assert all(torch.equal(a, b) for a, b in zip(kernels.verify_greedy(drafts, logits),
                                                  reference.verify_greedy(drafts, logits)))
    case = _sampling_case(2, 3, 111, seed=42)
    kwargs = dict(temperature=0.7, top_k=5, top_p=0.9, num_draft=case["num_draft"])
    args = (case["draft_tokens"], case["draft_probs"], case["target_logits"], case["uniforms"], case["exponentials"])
    assert all(torch.equal(a, b) for a, b in zip(kernels.verify_sampling(*args, **kwargs),
                                                  reference.verify_sampling(*args, **kwargs)))
    assert torch.equal(kernels.logits_to_probs(logits, 0.7, 5, 0.9), reference.logits_to_probs(logits, 0.7, 5, 0.9))
    # float64 keeps the reference's float64 arithmetic.
    assert kernels.logits_to_probs(logits.double()).dtype == torch.float64
