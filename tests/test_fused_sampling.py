"""specdec.fused against the eager path: the same tokens, bit for bit.

The eager sequence is what the engine runs on CPU without compile: noise.uniform /
noise.exponential (or exponential_by_position) and kernels.reference's verifiers. Each
comparison runs a batch of rows, one seed each, so one call checks many seeds. Random
cases rarely put a decision near its boundary, so a fused path whose probabilities were
off in the last bit would mostly still pass them; the "edge" tests place every accept test
(through the draft probs) and the race (through the logits) within an ulp of the boundary,
where such a path fails (a softmax or a top-p sum fused by inductor does).

Compiling costs seconds per graph on a small CPU, so the tests share a few graphs: the
small vocabulary with no filters for every kind of call (no drafts, one-hot drafts,
draft probs, by position), top-k and top-p together for draft probs, draft probs at a
131072 vocabulary, and top-p at a vocabulary large enough that its threshold is an input.
Temperature and top_p values are graph inputs: varying them costs no compile.
"""

from __future__ import annotations

import pytest
import torch

from specdec import engine, fused, noise
from specdec.drafters.base import DecodeState, DraftProposal
from specdec.kernels import reference
from specdec.params import GenerationParams

VOCAB = 1031  # not a multiple of the vector width: the kernels' tail loops run too
ROWS = 48
F32 = torch.float32


def _eager_step(seeds, counters, drafts, probs, logits, num_draft, temperature, top_k, top_p):
    """The engine's eager _verify for sampled rows."""
    k, vocab = drafts.shape[1], logits.shape[-1]
    if probs is not None and probs.shape[-1] < vocab:
        probs = torch.nn.functional.pad(probs, (0, vocab - probs.shape[-1]))
    uniforms = noise.uniform(seeds, counters, noise.UNIFORM_STREAM, k, F32)
    exponentials = noise.exponential(seeds, counters, noise.BONUS_STREAM, vocab, F32)
    return reference.verify_sampling(
        drafts, probs, logits, uniforms, exponentials,
        temperature=temperature, top_k=top_k, top_p=top_p, num_draft=num_draft,
    )


def _eager_by_position(seeds, counters, drafts, logits, num_draft, temperature, top_k, top_p):
    """The engine's eager _verify_by_position for sampled rows."""
    k = drafts.shape[1]
    exponentials = noise.exponential_by_position(seeds, counters, k + 1, noise.BONUS_STREAM, logits.shape[-1], F32)
    return reference.verify_by_position(
        drafts, logits, exponentials, temperature=temperature, top_k=top_k, top_p=top_p, num_draft=num_draft,
    )


def _case(seed: int, rows: int, k: int, vocab: int = VOCAB, *, probs: bool = False, draft_vocab: int | None = None):
    """Random logits (scale 1..6 per row), drafts mostly sampled from the target so that some
    are accepted and some rejected, ragged num_draft, random seeds and counters."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, 1, generator=g) * 5 + 1
    logits = torch.randn(rows, k + 1, vocab, generator=g) * scale  # [B, K+1, V]
    seeds = torch.randint(0, 2**63 - 1, (rows,), generator=g)
    counters = torch.randint(0, 5000, (rows,), generator=g)
    num_draft = torch.randint(0, k + 1, (rows,), generator=g)
    if k:
        guess = torch.softmax(logits[:, :k] + torch.randn(rows, k, vocab, generator=g), dim=-1)  # [B, K, V]
        drafts = torch.multinomial(guess.reshape(-1, vocab), 1, generator=g).view(rows, k)
        slots = torch.arange(k).unsqueeze(0)
        drafts = torch.where(slots < num_draft.unsqueeze(1), drafts, -1)
    else:
        guess, drafts = None, torch.empty(rows, 0, dtype=torch.int64)
    q = None
    if probs and k:
        q = guess if draft_vocab is None else torch.softmax(logits[:, :k, :draft_vocab] * 0.8, dim=-1)
    return seeds, counters, drafts, q, logits, num_draft


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _fused_step(case, temperature, top_k=0, top_p=1.0):
    seeds, counters, drafts, q, logits, num_draft = case
    return fused.sample_step(
        seeds, counters, drafts, q, logits, num_draft,
        temperature=temperature, top_k=top_k, top_p=top_p, noise_dtype=F32,
    )


def _eager(case, temperature, top_k=0, top_p=1.0):
    return _eager_step(*case, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("k", [0, 1, 4, 8])
@pytest.mark.parametrize("probs", [False, True])
def test_sample_step_matches_eager(k, probs, temperature):
    if k == 0 and probs:
        pytest.skip("no drafts, no draft probs")
    for seed in range(3):
        case = _case(100 * k + seed, ROWS, k, probs=probs)
        assert _same(_fused_step(case, temperature), _eager(case, temperature)), (k, probs, temperature, seed)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_sample_by_position_matches_eager(k, temperature):
    for seed in range(3):
        seeds, counters, drafts, _, logits, num_draft = _case(200 + 10 * k + seed, ROWS, k)
        # Draft the by-position samples themselves in half the rows: long accepted runs.
        e = noise.exponential_by_position(seeds, counters, k + 1, noise.BONUS_STREAM, VOCAB, F32)
        own = reference.sample_exponential_race(reference.logits_to_probs(logits, temperature), e)[:, :k]
        drafts = torch.where((torch.arange(ROWS) % 2 == 0).unsqueeze(1) & (drafts >= 0), own, drafts)
        out = fused.sample_by_position(
            seeds, counters, drafts, logits, num_draft, temperature=temperature, noise_dtype=F32
        )
        assert _same(out, _eager_by_position(seeds, counters, drafts, logits, num_draft, temperature, 0, 1.0))
        assert int(out[1].sum()) > 0  # some drafts accepted: the accept path ran


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.3, 0.5)])
def test_top_k_top_p_match_eager(temperature, top_p):
    for seed in range(3):
        case = _case(300 + seed, ROWS, 4, probs=True)
        assert _same(_fused_step(case, temperature, 20, top_p), _eager(case, temperature, 20, top_p)), seed


def _knife_edge_accepts(case, temperature, top_k=0, top_p=1.0):
    """Draft probs q chosen so that every accept test u * q < p sits within an ulp of its
    boundary (a random ulp either side): a fused p that differs from the eager p in its last
    bit at a draft token flips about half of these decisions."""
    seeds, counters, drafts, q, logits, num_draft = case
    k = drafts.shape[1]
    p = reference.logits_to_probs(logits, temperature, top_k, top_p)  # [B, K+1, V]
    u = noise.uniform(seeds, counters, noise.UNIFORM_STREAM, k, F32)  # [B, K]
    safe = drafts.clamp(min=0).unsqueeze(-1)  # [B, K, 1]
    p_d = p[:, :k].gather(-1, safe).squeeze(-1)  # [B, K]
    edge = p_d / u
    g = torch.Generator().manual_seed(int(seeds[0] % 1000))
    up = torch.rand(edge.shape, generator=g) < 0.5
    edge = torch.where(up, torch.nextafter(edge, torch.tensor(1.0)), edge)
    q = q.clone()
    q.scatter_(-1, safe, torch.where(p_d > 0, edge, q.gather(-1, safe).squeeze(-1)).unsqueeze(-1))
    return seeds, counters, drafts, q, logits, num_draft


def _knife_edge_race(logits, exponentials, temperature):
    """Logits whose race argmax(p / E) has two tokens within an ulp of a tie: the runner-up's
    logit is moved to where p_b / E_b = p_a / E_a. logits [B, T, V], exponentials [B, T, V]."""
    p = reference.logits_to_probs(logits, temperature)
    scores = p / exponentials
    top = scores.topk(2, dim=-1).indices  # [B, T, 2]
    a, b = top[..., :1], top[..., 1:]
    x_a = logits.gather(-1, a) / temperature
    ratio = exponentials.gather(-1, b).double() / exponentials.gather(-1, a).double()
    x_b = x_a.double() + ratio.log()
    return logits.scatter(-1, b, (x_b * temperature).float())


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.9)])
def test_accept_tests_on_the_edge_match_eager(top_k, top_p):
    flips = 0
    for seed in range(3):
        case = _knife_edge_accepts(_case(800 + seed, ROWS, 4, probs=True), 1.3, top_k, top_p)
        out = _fused_step(case, 1.3, top_k, top_p)
        assert _same(out, _eager(case, 1.3, top_k, top_p)), seed
        flips += int(out[1].sum())
    assert flips > 0  # accepted drafts: the edge is crossed both ways


def test_race_on_the_edge_matches_eager():
    seeds, counters, _, _, logits, _ = _case(900, ROWS, 0)
    e = noise.exponential(seeds, counters, noise.BONUS_STREAM, VOCAB, F32).unsqueeze(1)  # [B, 1, V]
    logits = _knife_edge_race(logits, e, 0.7)
    none = torch.empty(ROWS, 0, dtype=torch.int64)
    case = (seeds, counters, none, None, logits, torch.zeros(ROWS, dtype=torch.int64))
    assert _same(_fused_step(case, 0.7), _eager(case, 0.7))
    # The edge is real: the eager race picks the first and the second token about equally.
    p = reference.logits_to_probs(logits, 0.7)[:, 0]
    first = (p / e[:, 0]).argmax(-1)
    assert 0 < int((first == _fused_step(case, 0.7)[0][:, 0]).sum()) <= ROWS


def test_by_position_race_on_the_edge_matches_eager():
    k = 3
    seeds, counters, drafts, _, logits, num_draft = _case(950, ROWS, k)
    e = noise.exponential_by_position(seeds, counters, k + 1, noise.BONUS_STREAM, VOCAB, F32)  # [B, K+1, V]
    logits = _knife_edge_race(logits, e, 1.3)
    own = reference.sample_exponential_race(reference.logits_to_probs(logits, 1.3), e)[:, :k]
    drafts = torch.where(drafts >= 0, own, drafts)  # accepted up to num_draft: every slot's race decides
    out = fused.sample_by_position(seeds, counters, drafts, logits, num_draft, temperature=1.3, noise_dtype=F32)
    assert _same(out, _eager_by_position(seeds, counters, drafts, logits, num_draft, 1.3, 0, 1.0))


def test_uniform_logits_pick_the_smallest_noise():
    """Equal logits: the race picks argmin E over the whole vocabulary, so each row's token
    checks the fused exponential noise against the eager one where it decides."""
    rows = 256
    g = torch.Generator().manual_seed(5)
    seeds = torch.randint(0, 2**63 - 1, (rows,), generator=g)
    counters = torch.randint(0, 10**6, (rows,), generator=g)
    logits = torch.zeros(rows, 1, VOCAB)
    none = torch.empty(rows, 0, dtype=torch.int64)
    out = fused.sample_step(seeds, counters, none, None, logits, torch.zeros(rows, dtype=torch.int64),
                            temperature=1.0, noise_dtype=F32)
    expected = noise.exponential(seeds, counters, noise.BONUS_STREAM, VOCAB, F32).argmin(-1)
    assert torch.equal(out[0][:, 0], expected)


def test_edge_rows_match_eager():
    """NaN and +inf logits, a row with no allowed token (-1 emitted), drafts outside the
    vocabulary or -1 in real slots, a draft vocabulary shorter than the target's."""
    seeds, counters, drafts, q, logits, num_draft = _case(7, 8, 4, probs=True, draft_vocab=VOCAB - 31)
    logits[0, :, ::7] = float("nan")
    logits[1, 1, 3] = float("inf")
    logits[1, 2, 5:9] = float("inf")
    logits[2, 2] = float("-inf")
    logits[3] = float("nan")
    num_draft[:] = 4
    drafts[4] = torch.tensor([VOCAB + 5, -1, 3, 4])
    drafts[5, 0] = -1
    case = (seeds, counters, drafts, q, logits, num_draft)
    assert _same(_fused_step(case, 0.7), _eager(case, 0.7))
    one_hot = (seeds, counters, drafts, None, logits, num_draft)
    assert _same(_fused_step(one_hot, 0.7), _eager(one_hot, 0.7))
    assert int(_fused_step(case, 0.7)[0][3, 0]) == -1  # no allowed token in row 3


def test_large_vocabulary_matches_eager():
    case = _case(11, 4, 3, vocab=131072, probs=True)
    for temperature in (0.7, 1.3):
        assert _same(_fused_step(case, temperature), _eager(case, temperature)), temperature


def test_top_p_at_a_large_vocabulary_takes_its_threshold_and_matches_eager():
    """At EAGER_TOP_P_VOCAB ids or more a top-p graph does not sort the vocabulary: the
    threshold is found before the call (reference.top_p_threshold_of_logits) and given to
    the graph. Verification (draft probs, so the drafts' q is masked too) and a sampled draft
    token keep the eager tokens and q bit for bit, for several top_p values through one graph
    each; nuclei of a few ids and of most of the vocabulary (a flat row) alike."""
    vocab = fused.EAGER_TOP_P_VOCAB
    case = _case(21, 6, 3, vocab=vocab, probs=True)
    logits = case[4].clone()
    logits[0] *= 0.01  # a flat row: its nucleus is most of the vocabulary (the sort runs, eagerly)
    case = (*case[:4], logits, case[5])
    graphs = fused.compile_stats()["graphs"]
    for temperature, top_p in [(0.7, 0.9), (1.3, 0.5), (1.0, 0.999)]:
        assert _same(_fused_step(case, temperature, 0, top_p), _eager(case, temperature, 0, top_p)), top_p
        seeds, counters = case[0], case[1]
        got = fused.sample_draft(seeds, counters, logits[:, 0], noise.DRAFT_STREAM, temperature=temperature,
                                 top_p=top_p, noise_dtype=F32)
        expected = _eager_draft(seeds, counters, logits[:, 0], noise.DRAFT_STREAM, temperature, 0, top_p)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), top_p
    assert fused.compile_stats()["graphs"] - graphs <= 2  # one graph each, whatever top_p
    given = [key for key in fused._graphs if key[1] == vocab and key[4]]
    assert given and all(key[5] == 3 for key in given)  # the threshold [B, T, 1] is an input


def test_comparison_catches_a_difference():
    """Negative control: a slightly different temperature changes tokens, so the comparisons
    above would see a fused path that computed p differently."""
    case = _case(400, ROWS, 4, probs=True)
    assert _same(_fused_step(case, 0.7), _eager(case, 0.7))
    assert not _same(_fused_step(case, 0.7), _eager(case, 0.75))
    assert not _same(_fused_step(case, 0.75), _eager(case, 0.7))


def test_batch_and_draft_width_share_a_graph():
    """B = 1..ROWS and K = 1..8 run the graphs compiled above: no recompile."""
    _fused_step(_case(500, ROWS, 2, probs=True), 0.7)  # compiled here if this test runs alone
    _fused_step(_case(501, 2, 0), 0.7)
    before = fused.compile_stats()
    for rows, k in [(1, 1), (1, 5), (3, 8), (1, 0), (2, 3), (ROWS, 7)]:
        case = _case(600 + k, rows, k, probs=True)
        assert _same(_fused_step(case, 1.3), _eager(case, 1.3)), (rows, k)
    after = fused.compile_stats()
    assert after["graphs"] == before["graphs"] and after["recompiles"] == 0


def test_graphs_run_without_dynamo_after_the_first_call(monkeypatch):
    """After its compile a graph is called directly: dynamo's compiled function is not
    entered again, and the tokens stay the eager path's."""
    case = _case(650, 5, 2, probs=True)
    _fused_step(case, 0.7)
    assert fused.compile_stats()["direct"] >= 1
    monkeypatch.setattr(fused, "_through_dynamo", lambda *a, **kw: pytest.fail("went through dynamo"))
    for seed in range(3):
        case = _case(660 + seed, 1 + seed, 1 + 2 * seed, probs=True)
        assert _same(_fused_step(case, 1.3), _eager(case, 1.3))


def test_a_failed_compile_runs_the_body_eagerly(monkeypatch, caplog):
    """A compiler failure costs speed, never tokens: the key runs its body eagerly, which
    computes the same values as the eager path."""
    from torch._inductor import compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    case = _case(670, 6, 3, probs=True)
    top_k = 7  # a key no other test compiles
    with caplog.at_level("ERROR", logger="specdec.fused"):
        first = _fused_step(case, 0.7, top_k)
    assert "failed to compile" in caplog.text
    assert _same(first, _eager(case, 0.7, top_k))
    other = _case(671, 3, 2, probs=True)
    assert _same(_fused_step(other, 1.3, top_k), _eager(other, 1.3, top_k))
    assert fused.compile_stats()["eager"] >= 1


def test_frozen_keys_run_eagerly_and_compile_nothing(monkeypatch):
    """After freeze() (a server's warm-up is done), settings without a graph run their body
    eagerly with the same tokens, and nothing compiles; compiled settings keep their graphs."""
    warm = _case(680, 4, 2, probs=True)
    _fused_step(warm, 0.7)  # compiled (here, if this test runs alone) before the freeze
    monkeypatch.setattr(fused, "_frozen", False)
    fused.freeze()
    before = fused.compile_stats()
    case = _case(681, 5, 3, probs=True)
    top_k = 11  # a key no other test compiles
    assert _same(_fused_step(case, 0.9, top_k), _eager(case, 0.9, top_k))
    assert _same(_fused_step(warm, 1.3), _eager(warm, 1.3))
    after = fused.compile_stats()
    assert after["graphs"] == before["graphs"] and after["direct"] == before["direct"]


def _state(case, temperature: float, compiled: bool) -> DecodeState:
    seeds, counters = case[0], case[1]
    return DecodeState(
        sequences=[[0] * int(c) for c in counters], params=GenerationParams(temperature=temperature),
        device=torch.device("cpu"), noise_dtype=F32, seeds=seeds, seq_lens=counters, new_kv=None,
        compiled=compiled,
    )


def test_engine_uses_the_fused_path_only_when_compiled(monkeypatch):
    case = _case(700, 6, 4, probs=True)
    proposal = DraftProposal(tokens=case[2], num_draft=case[5], probs=case[3])
    calls = []
    real = fused.sample_step
    monkeypatch.setattr(fused, "sample_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    eager = engine._verify(_state(case, 0.7, False), proposal, case[4], case[5])
    assert not calls
    compiled = engine._verify(_state(case, 0.7, True), proposal, case[4], case[5])
    assert calls and _same(compiled, eager)

    one_hot = DraftProposal(tokens=case[2], num_draft=case[5])
    by_position = engine._verify_by_position(_state(case, 0.7, True), one_hot, case[4], case[5])
    assert _same(by_position, engine._verify_by_position(_state(case, 0.7, False), one_hot, case[4], case[5]))


def _eager_draft(seeds, counters, logits, stream, temperature, top_k, top_p):
    """drafters/model.py's eager sampled draft token."""
    q = reference.logits_to_probs(logits, temperature, top_k, top_p)
    race = noise.exponential(seeds, counters, stream, q.shape[-1], q.dtype)
    token = reference.sample_exponential_race(q, race)
    return token, q, q.gather(1, token.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 0, 1.0), (0.9, 20, 0.9)])
def test_sampled_draft_tokens_match_eager(temperature, top_k, top_p):
    """fused.sample_draft (a compiled request's draft-model and head tokens) against the eager
    sequence: tokens, q and q at the token bit for bit, for several noise streams (the slots
    of a step) through one graph."""
    for seed in range(3):
        seeds, counters, _, _, logits, _ = _case(500 + seed, ROWS, 0)
        for stream in (noise.DRAFT_STREAM, noise.DRAFT_STREAM + 5):
            got = fused.sample_draft(seeds, counters, logits[:, 0], stream, temperature=temperature, top_k=top_k,
                                     top_p=top_p, noise_dtype=F32)
            expected = _eager_draft(seeds, counters, logits[:, 0], stream, temperature, top_k, top_p)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (seed, stream)
    # another stream is other noise (a different draw somewhere in the batch), through the same graph
    graphs = fused.compile_stats()["graphs"]
    other = fused.sample_draft(seeds, counters, logits[:, 0], noise.DRAFT_STREAM + 1, temperature=temperature,
                               top_k=top_k, top_p=top_p, noise_dtype=F32)
    assert not torch.equal(other[0], got[0])
    assert fused.compile_stats()["graphs"] == graphs
