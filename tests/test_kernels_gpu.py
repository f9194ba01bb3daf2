"""Compiled Triton kernels on a CUDA device, against the reference on the same device.

Real vocabulary sizes (Llama 2, Llama 3, Qwen 2), bf16, fp16 and fp32 logits, batches
up to 256, non-finite logits, the kernels inside a captured CUDA graph, and the engine
end to end with the kernels in the loop. Skipped without CUDA; with CUDA every test
runs (a missing kernel fails, see gpu_support.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

import specdec.kernels as kernels
from specdec.kernels import reference

from gpu_support import GPU_MARKS, require_compiled_kernels

pytestmark = GPU_MARKS

VOCABS = [32000, 128256, 151936]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DEVICE = "cuda"


@pytest.fixture(scope="module")
def mods():
    require_compiled_kernels()
    from specdec.kernels import greedy, probs, sampling

    return greedy, sampling, probs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _pad(tokens, num_draft):
    slots = torch.arange(tokens.shape[1], device=DEVICE).unsqueeze(0)
    return torch.where(slots < num_draft.unsqueeze(1), tokens, torch.full_like(tokens, -1))


def _sample(probs, g):
    return reference.sample_exponential_race(probs, torch.empty(probs.shape, device=DEVICE).exponential_(generator=g))


def _check_layout(tokens, num_accepted, drafts, num_draft, vocab):
    batch, k = drafts.shape
    slots = torch.arange(k + 1, device=DEVICE).unsqueeze(0)
    n = num_accepted.unsqueeze(1)
    assert bool((num_accepted >= 0).all()) and bool((num_accepted <= num_draft).all())
    padded = torch.cat([drafts, drafts.new_full((batch, 1), -1)], dim=1)
    assert bool(torch.where(slots < n, tokens == padded, True).all())
    emitted = tokens.gather(1, n).squeeze(1)
    assert bool(((emitted >= 0) & (emitted < vocab)).all())
    assert bool(torch.where(slots > n, tokens == -1, True).all())


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,k", [(1, 1), (7, 4), (256, 3)])
def test_greedy_matches_reference(mods, vocab, dtype, batch, k):
    g = _gen(vocab + batch + k)
    logits = (torch.randn(batch, k + 1, vocab, device=DEVICE, generator=g) * 3).to(dtype)
    num_draft = torch.randint(0, k + 1, (batch,), device=DEVICE, generator=g)
    best = logits[:, :k].argmax(-1)
    flip = torch.rand(best.shape, device=DEVICE, generator=g) < 0.3
    drafts = _pad(torch.where(flip, (best + 1) % vocab, best), num_draft)
    want = reference.verify_greedy(drafts, logits, num_draft)
    got = mods[0].verify_greedy_triton(drafts, logits, num_draft)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    _check_layout(*got, drafts, num_draft, vocab)


def _sampling_case(batch, k, vocab, dtype, seed, *, model, temperature=1.0, top_k=0, top_p=1.0, spread=3.0):
    g = _gen(seed)
    target = torch.randn(batch, k + 1, vocab, device=DEVICE, generator=g) * spread
    num_draft = torch.randint(0, k + 1, (batch,), device=DEVICE, generator=g)
    if model:
        draft_logits = target[:, :k] + 0.5 * torch.randn(batch, k, vocab, device=DEVICE, generator=g)
        draft_probs = reference.logits_to_probs(draft_logits, temperature, top_k, top_p)
        drafts = _sample(draft_probs, g)
    else:
        draft_probs = None
        drafts = _sample(reference.logits_to_probs(target[:, :k], temperature, top_k, top_p), g)
    uniforms = torch.rand(batch, k, device=DEVICE, generator=g)
    exponentials = torch.empty(batch, vocab, device=DEVICE).exponential_(generator=g)
    args = (_pad(drafts, num_draft), draft_probs, target.to(dtype), uniforms, exponentials)
    return args, dict(temperature=temperature, top_k=top_k, top_p=top_p, num_draft=num_draft)


def _compare_sampling(mods, args, kwargs):
    want = reference.verify_sampling(*args, **kwargs)
    got = mods[1].verify_sampling_triton(*args, **kwargs)
    assert torch.equal(got[1], want[1]), "accepted counts differ from the reference"
    assert torch.equal(got[0], want[0]), "emitted tokens differ from the reference"
    _check_layout(*got, args[0], kwargs["num_draft"], args[2].shape[-1])
    return got


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("batch,k,temperature", [(1, 1, 1.0), (8, 5, 0.7), (256, 3, 1.0)])
def test_sampling_matches_reference(mods, vocab, dtype, model, batch, k, temperature):
    args, kwargs = _sampling_case(batch, k, vocab, dtype, vocab + batch + k, model=model, temperature=temperature)
    got = _compare_sampling(mods, args, kwargs)
    if batch == 256:
        assert int(got[1].sum()) > 0, "the case should accept some drafts"


@pytest.mark.parametrize("vocab", [32000, 151936])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k,top_p", [(50, 1.0), (0, 0.8), (40, 0.9)])
def test_sampling_top_k_top_p_matches_reference(mods, vocab, dtype, top_k, top_p):
    # Peaked rows (spread 6) keep the top-p boundary token well above float32 rounding
    # of the cumulative mass, which decides the boundary in both implementations.
    args, kwargs = _sampling_case(64, 4, vocab, dtype, vocab + top_k, model=True, temperature=0.9,
                                  top_k=top_k, top_p=top_p, spread=6.0)
    _compare_sampling(mods, args, kwargs)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 1.0), (0.9, 0, 0.9), (1.0, 20, 0.8)])
def test_probs_match_reference(mods, vocab, dtype, temperature, top_k, top_p):
    g = _gen(vocab + top_k)
    logits = (torch.randn(256, vocab, device=DEVICE, generator=g) * 6).to(dtype)
    got = mods[2].logits_to_probs_triton(logits, temperature, top_k, top_p)
    want = reference.logits_to_probs(logits, temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.sum(-1), torch.ones(256, device=DEVICE), rtol=0, atol=1e-5)
    same_support = ((got > 0) == (want > 0)).all(-1)  # [256]
    if top_p >= 1.0:
        assert bool(same_support.all())
    else:
        # Which token sits exactly on the top-p boundary depends on float32 rounding of
        # the cumulative mass (a sort+cumsum in the reference, tile sums here).
        assert int((~same_support).sum()) <= 2
    torch.testing.assert_close(got[same_support], want[same_support], rtol=1e-4, atol=1e-7)


def test_dispatch_runs_the_kernels_on_cuda(mods, monkeypatch):
    calls = []
    for mod, name in ((mods[0], "verify_greedy_triton"), (mods[1], "verify_sampling_triton"),
                      (mods[2], "logits_to_probs_triton")):
        original = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=original, _n=name, **kw: (calls.append(_n), _f(*a, **kw))[1])
    args, kwargs = _sampling_case(4, 3, 32000, torch.bfloat16, 5, model=True)
    kernels.verify_greedy(args[0], args[2], kwargs["num_draft"])
    kernels.verify_sampling(*args, **kwargs)
    kernels.logits_to_probs(args[2][:, 0], 0.8, 10, 0.9)
    kernels.logits_to_probs(args[2].transpose(0, 1))  # not row-contiguous: copied, then the kernel
    assert calls == ["verify_greedy_triton", "verify_sampling_triton", "logits_to_probs_triton",
                     "logits_to_probs_triton"]
    # float64 keeps the reference's float64 arithmetic.
    assert kernels.logits_to_probs(args[2].double()[:, 0]).dtype == torch.float64
    assert calls[-1] == "logits_to_probs_triton" and len(calls) == 4


# --------------------------------------------------------------------------- non-finite logits

def _nonfinite_logits(batch: int, k: int, vocab: int, dtype, seed: int) -> torch.Tensor:  # [B, K+1, V]
    """The cases of reference.py's non-finite policy: NaN (one at the row maximum), -inf,
    tied +inf, and positions with no allowed token (all -inf, all NaN, mixed)."""
    g = _gen(seed)
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(batch, k + 1, vocab, device=DEVICE, generator=g) * 3
    logits[0, 0, logits[0, 0].argmax()] = nan
    logits[0, 0, ::7] = nan
    logits[0, 1, 1::3] = -inf
    logits[1, 0, [vocab // 3, vocab - 1]] = inf
    logits[1, 1] = -inf
    logits[2, 2] = nan
    logits[3, 0, : vocab // 2] = -inf
    logits[3, 0, vocab // 2:] = nan
    logits[3, 1, 5] = inf
    logits[3, 1, 9] = nan
    return logits.to(dtype)


@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_logits_follow_the_policy(mods, vocab, dtype):
    k = 3
    logits = _nonfinite_logits(4, k, vocab, dtype, seed=vocab)
    best = reference.sanitize_logits(logits.float()).argmax(-1)
    drafts = best[:, :k].clone()
    drafts[3, 0] = -1
    want = reference.verify_greedy(drafts, logits)
    got = mods[0].verify_greedy_triton(drafts, logits)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].tolist() == [3, 1, 2, 0] and got[0][1].tolist() == [vocab // 3, -1, -1, -1]

    g = _gen(vocab + 1)
    for top_k, top_p in ((0, 1.0), (20, 1.0)):
        p = reference.logits_to_probs(logits, 0.7, top_k, top_p)
        assert not torch.isnan(p).any()
        q = reference.logits_to_probs(logits[:, :k].float() + torch.randn(4, k, vocab, device=DEVICE, generator=g),
                                      0.7, top_k, top_p)
        sampled = _sample(p[:, :k] + 1e-6, g)
        uniforms = torch.rand(4, k, device=DEVICE, generator=g)
        exponentials = torch.empty(4, vocab, device=DEVICE).exponential_(generator=g)
        for probs in (q, None):
            args = (sampled, probs, logits, uniforms, exponentials)
            kwargs = dict(temperature=0.7, top_k=top_k, top_p=top_p)
            want = reference.verify_sampling(*args, **kwargs)
            got = mods[1].verify_sampling_triton(*args, **kwargs)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        got_p = mods[2].logits_to_probs_triton(logits.view(-1, vocab), 0.7, top_k, top_p)
        assert not torch.isnan(got_p).any()
        assert torch.equal(got_p > 0, p.view(-1, vocab) > 0)
        torch.testing.assert_close(got_p, p.view(-1, vocab), rtol=1e-4, atol=1e-7)
        assert int((got_p.sum(-1) == 0).sum()) == 3  # the three positions without a token


# --------------------------------------------------------------------------- CUDA graphs

def test_kernels_inside_a_captured_cuda_graph(mods):
    """verify_greedy, verify_sampling and logits_to_probs captured once with static input
    buffers, replayed with new inputs copied in: the same tokens and probabilities as the
    reference on those inputs (no host synchronisation or allocation breaks the capture)."""
    batch, k, vocab = 8, 4, 128256
    static = dict(
        drafts=torch.zeros(batch, k, dtype=torch.int64, device=DEVICE),
        q=torch.zeros(batch, k, vocab, device=DEVICE),
        logits=torch.zeros(batch, k + 1, vocab, dtype=torch.bfloat16, device=DEVICE),
        uniforms=torch.zeros(batch, k, device=DEVICE),
        exponentials=torch.ones(batch, vocab, device=DEVICE),
        num_draft=torch.zeros(batch, dtype=torch.int64, device=DEVICE),
        last=torch.zeros(batch, vocab, dtype=torch.bfloat16, device=DEVICE),
    )
    sampling = dict(temperature=0.8, top_k=50, top_p=1.0)

    def fill(seed: int) -> dict:
        args, kwargs = _sampling_case(batch, k, vocab, torch.bfloat16, seed, model=True, **sampling)
        new = dict(drafts=args[0], q=args[1], logits=args[2], uniforms=args[3], exponentials=args[4],
                   num_draft=kwargs["num_draft"], last=args[2][:, -1].contiguous())
        for name, value in new.items():
            static[name].copy_(value)
        return new

    def step(x: dict):
        greedy = kernels.verify_greedy(x["drafts"], x["logits"], x["num_draft"])
        sampled = kernels.verify_sampling(x["drafts"], x["q"], x["logits"], x["uniforms"], x["exponentials"],
                                          num_draft=x["num_draft"], **sampling)
        probs = kernels.logits_to_probs(x["last"], 0.8, 50, 0.9)
        return greedy, sampled, probs

    fill(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(static)

    seen = []
    for seed in (1, 2, 3):
        new = fill(seed)
        graph.replay()
        torch.cuda.synchronize()
        (g_tokens, g_n), (s_tokens, s_n), probs = outputs
        want_g = reference.verify_greedy(new["drafts"], new["logits"], new["num_draft"])
        want_s = reference.verify_sampling(new["drafts"], new["q"], new["logits"], new["uniforms"],
                                           new["exponentials"], num_draft=new["num_draft"], **sampling)
        assert torch.equal(g_tokens, want_g[0]) and torch.equal(g_n, want_g[1]), f"greedy differs (seed {seed})"
        assert torch.equal(s_tokens, want_s[0]) and torch.equal(s_n, want_s[1]), f"sampling differs (seed {seed})"
        eager = kernels.logits_to_probs(new["last"], 0.8, 50, 0.9)
        assert torch.equal(probs, eager), f"probs differ from the eager kernel (seed {seed})"
        want_p = reference.logits_to_probs(new["last"], 0.8, 50, 0.9)
        assert int(((probs > 0) != (want_p > 0)).any(-1).sum()) <= 2  # top-p boundary rounding, see above
        seen.append(s_tokens.clone())
    assert not torch.equal(seen[0], seen[1]), "replays returned the same tokens for different inputs"


# --------------------------------------------------------------------------- engine end to end

def _llama(vocab: int, layers: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    # float32: the kernels take fp32/bf16/fp16 logits (float64 stays on the reference).
    return LlamaForCausalLM(config).to(device=DEVICE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_pair():
    target = _llama(1000, layers=2, hidden=64, seed=0)
    return target, {"same": copy.deepcopy(target), "random": _llama(1000, layers=1, hidden=32, seed=1)}


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 11, 3, 17)]


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: (calls.append(1), original(*a, **kw))[1])
    return calls


@pytest.mark.parametrize("draft", ["same", "random"])
@pytest.mark.parametrize("k", [1, 4])
def test_engine_greedy_equality_with_kernels(mods, monkeypatch, llama_pair, draft, k):
    from specdec import SpeculativeGenerator

    calls = _count_calls(monkeypatch, mods[0], "verify_greedy_triton")
    target, drafts = llama_pair
    gen = SpeculativeGenerator(target, None, drafts[draft])
    prompts = _prompts(k)
    base = gen.generate_ids(prompts, max_new_tokens=24, drafter="none", ignore_eos=True)
    spec = gen.generate_ids(prompts, max_new_tokens=24, drafter="model", num_draft_tokens=k, ignore_eos=True)
    assert [r.token_ids for r in spec] == [r.token_ids for r in base]
    assert all(len(r.token_ids) == 24 for r in spec)
    assert calls, "the engine did not verify through the Triton kernel"
    if draft == "same":
        assert all(r.stats.accepted_tokens > 0 for r in spec)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.9)])
def test_engine_sampling_kernels_equal_reference_path(mods, monkeypatch, llama_pair, top_k, top_p):
    """Seeded sampling through the engine: the same tokens with the kernels as with the
    reference ops (same noise, same logits), so the kernels keep the engine lossless."""
    from specdec import SpeculativeGenerator

    target, drafts = llama_pair
    gen = SpeculativeGenerator(target, None, drafts["random"])
    kwargs = dict(max_new_tokens=24, drafter="model", num_draft_tokens=4, temperature=0.8, top_k=top_k,
                  top_p=top_p, seed=1234, ignore_eos=True)
    calls = _count_calls(monkeypatch, mods[1], "verify_sampling_triton")
    with_kernels = gen.generate_ids(_prompts(7), **kwargs)
    assert calls, "the engine did not verify through the Triton kernel"
    monkeypatch.setattr(kernels, "_use_triton", lambda tensor: False)
    with_reference = gen.generate_ids(_prompts(7), **kwargs)
    assert [r.token_ids for r in with_kernels] == [r.token_ids for r in with_reference]
