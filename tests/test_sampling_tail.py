"""Sampling at real vocabulary sizes: a tail of tiny mass gets exactly its mass.

The exponential race argmax(r / E) gives a token the win whatever its weight when its
noise E is 0, so noise with an atom at 0 puts about V * P(E = 0) of the mass on random
tokens. The first counter-based noise drew 24-bit float32 uniforms, E = -log1p(-u) was 0
with probability 2**-24 per entry, and about V / 2**24 of the samples (1.6% at 262k)
were a uniformly random token. Tests at small vocabularies cannot see it.

Each test here builds a target whose distribution puts all but TAIL_MASS on 8 head
tokens and spreads TAIL_MASS over the other V - 8 (each tail token ~4e-11 at 262k),
samples it many times through the real noise (specdec.noise, seeded and unseeded) and
the real verifiers, and requires the number of samples that land in the tail to pass an
exact binomial test against the exact tail mass. With N * TAIL_MASS ~ 0.01 that means
almost no tail samples, where the old noise gave about N * V / 2**24 (8 at N = 512,
V = 262k). The negative controls run the same tests with the old noise and require them
to fail: through the reference verifier, the Triton kernel (interpreter) and generate.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as scistats

from fixtures_models import make_model
from specdec import SpeculativeGenerator, kernels, noise
from specdec.kernels import reference

pytestmark = pytest.mark.slow

HEAD = 8  # head tokens: ids 0..7
TAIL_MASS = 1e-5  # of the target distribution, spread over ids 8..V-1
TEMPERATURE = 0.7
ALPHA = 1e-6  # two-sided exact binomial test; seeded cases are fixed outcomes
VOCABS = {131072: 1024, 262144: 512}  # vocabulary -> samples (N * V the same)
CHUNK = 32  # rows per verify call (memory: [CHUNK, K+1, V] float32)


def legacy_uniform(seeds, counters, stream, width, dtype):
    """The first noise: the top 24 (float32) or 53 (float64) hash bits, in [0, 1)."""
    bits = 53 if dtype == torch.float64 else 24
    return noise._shr(noise.hash_bits(seeds, counters, stream, width), 64 - bits).to(dtype) * (2.0 ** -bits)


def legacy_exponential(seeds, counters, stream, width, dtype):
    """-log1p(-u) of legacy_uniform: exactly 0 with probability 2**-24 per float32 entry."""
    return -torch.log1p(-legacy_uniform(seeds, counters, stream, width, dtype))


@pytest.fixture
def legacy_noise(monkeypatch):
    """Every sampling path draws the first, broken noise (the negative control)."""
    monkeypatch.setattr(noise, "uniform", legacy_uniform)
    monkeypatch.setattr(noise, "exponential", legacy_exponential)


def head_tail_logits(vocab: int, tail_mass: float, head_logits: torch.Tensor) -> torch.Tensor:  # [V] float32
    """Logits (before TEMPERATURE) whose tail ids 8..V-1 carry `tail_mass` of the processed distribution."""
    head = torch.exp(head_logits.double() / TEMPERATURE).sum()
    tail_each = tail_mass / (1 - tail_mass) * head / (vocab - HEAD)
    logits = torch.full((vocab,), TEMPERATURE * math.log(tail_each), dtype=torch.float64)
    logits[:HEAD] = head_logits.double()
    return logits.float()


def exact_tail_mass(logits: torch.Tensor) -> float:  # logits [V], as the verifier sees them
    p = torch.softmax(logits.double() / TEMPERATURE, dim=-1)
    return float(p[HEAD:].sum())


TARGET_HEAD = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
DRAFT_HEAD = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0])  # disagrees with the target


def assert_tail_mass(hits: int, samples: int, mass: float) -> None:
    pvalue = scistats.binomtest(hits, samples, mass).pvalue
    assert pvalue >= ALPHA, (
        f"{hits} of {samples} samples in a tail of mass {mass:.2e} (expected {samples * mass:.3f}): "
        f"binomial p = {pvalue:.2e}")


def tail_hits(vocab: int, samples: int, mode: str, seeded: bool, verify) -> tuple[int, float]:
    """Samples whose first emitted token lands in the tail; and the tail's exact mass.

    mode "baseline": the bonus sample of p (no drafts). "onehot": one draft from the head
    (a prompt-lookup drafter), accepted with probability p(d), else p without d.
    "model": one draft sampled from the draft's q with the draft stream's noise, accepted
    with probability min(1, p/q), else the residual max(0, p - q). Either way the first
    emitted token has exactly the distribution p.
    """
    target = head_tail_logits(vocab, TAIL_MASS, TARGET_HEAD)  # [V]
    draft_q = reference.logits_to_probs(head_tail_logits(vocab, TAIL_MASS, DRAFT_HEAD), TEMPERATURE)  # [V]
    seeds = torch.arange(samples, dtype=torch.int64) if seeded else noise.request_seeds(None, samples, torch.device("cpu"))
    counters = torch.full((samples,), 17, dtype=torch.int64)  # a row's length: any value
    k = 0 if mode == "baseline" else 1
    hits = 0
    for start in range(0, samples, CHUNK):
        s, c = seeds[start:start + CHUNK], counters[start:start + CHUNK]
        rows = len(s)
        logits = target.expand(rows, k + 1, vocab).contiguous()  # [rows, K+1, V]
        probs = None
        if mode == "model":
            q = draft_q.expand(rows, vocab)  # [rows, V]
            drafts = kernels.sample_exponential_race(q, noise.exponential(s, c, noise.DRAFT_STREAM, vocab, q.dtype))
            drafts = drafts.view(rows, 1)
            probs = q.unsqueeze(1).contiguous()  # [rows, 1, V]
        elif mode == "onehot":
            drafts = (s % HEAD).view(rows, 1)  # [rows, 1] a head token
        else:
            drafts = torch.zeros(rows, 0, dtype=torch.int64)
        uniforms = noise.uniform(s, c, noise.UNIFORM_STREAM, k, torch.float32)  # [rows, K]
        exponentials = noise.exponential(s, c, noise.BONUS_STREAM, vocab, torch.float32)  # [rows, V]
        tokens, _ = verify(drafts, probs, logits, uniforms, exponentials, temperature=TEMPERATURE)
        hits += int((tokens[:, 0] >= HEAD).sum())
    return hits, exact_tail_mass(target)


# --------------------------------------------------------------------------- reference


# The bonus sample at both sizes, seeded and not; the drafters at 262k, where the old
# noise failed most often (a full grid would cost minutes of CPU for little more).
REFERENCE_CASES = [(131072, "baseline", True), (131072, "baseline", False), (262144, "baseline", True),
                   (262144, "baseline", False), (262144, "onehot", True), (262144, "model", False)]


@pytest.mark.parametrize("vocab,mode,seeded", REFERENCE_CASES)
def test_reference_tail_mass(vocab, mode, seeded):
    hits, mass = tail_hits(vocab, VOCABS[vocab], mode, seeded, reference.verify_sampling)
    assert_tail_mass(hits, VOCABS[vocab], mass)


@pytest.mark.parametrize("vocab,mode", [(131072, "baseline"), (262144, "onehot"), (262144, "model")])
def test_reference_tail_mass_fails_with_legacy_noise(legacy_noise, vocab, mode):
    hits, mass = tail_hits(vocab, VOCABS[vocab], mode, True, reference.verify_sampling)
    with pytest.raises(AssertionError, match="binomial"):
        assert_tail_mass(hits, VOCABS[vocab], mass)


# --------------------------------------------------------------------------- Triton (interpreter)

TRITON_SAMPLES = 512  # the interpreter is slow: ~0.1 s a row at 262k with one tile per row


def _triton_verify():
    sampling = pytest.importorskip("specdec.kernels.sampling")
    from specdec.kernels import _launch

    if not _launch.is_interpreted(sampling._sample_kernel):
        pytest.skip("compiled Triton (CUDA present): the interpreter tests run in their own process")

    def verify(drafts, probs, logits, uniforms, exponentials, temperature):
        got = sampling.verify_sampling_triton(drafts, probs, logits, uniforms, exponentials,
                                              temperature=temperature, block_size=1 << 18)
        want = reference.verify_sampling(drafts, probs, logits, uniforms, exponentials, temperature=temperature)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # same noise, same tokens
        return got

    return verify


@pytest.mark.parametrize("mode,seeded", [("baseline", True), ("onehot", False)])
def test_triton_tail_mass(mode, seeded):
    hits, mass = tail_hits(262144, TRITON_SAMPLES, mode, seeded, _triton_verify())
    assert_tail_mass(hits, TRITON_SAMPLES, mass)


def test_triton_tail_mass_fails_with_legacy_noise(legacy_noise):
    hits, mass = tail_hits(262144, TRITON_SAMPLES, "baseline", True, _triton_verify())
    with pytest.raises(AssertionError, match="binomial"):
        assert_tail_mass(hits, TRITON_SAMPLES, mass)


# --------------------------------------------------------------------------- generate

ENGINE_VOCAB = 262144
ENGINE_ROWS, ENGINE_NEW = 32, 16  # 512 sampled tokens per case


def constant_model(head_logits: torch.Tensor, seed: int):
    """A float32 tiny Llama whose next-token logits are the same at every position.

    The LM head becomes a zero matrix plus a bias, so every generated token is an
    independent sample of one known distribution, whatever the context.
    """
    model = make_model("llama", ENGINE_VOCAB, seed=seed, layers=1, hidden=8).float()
    logits = head_tail_logits(ENGINE_VOCAB, TAIL_MASS, head_logits)
    head = torch.nn.Linear(8, ENGINE_VOCAB, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(logits)
    model.lm_head = head
    return model.eval(), exact_tail_mass(logits)


@pytest.fixture(scope="module")
def constant_pair():
    target, mass = constant_model(TARGET_HEAD, seed=1)
    draft, _ = constant_model(DRAFT_HEAD, seed=2)
    return SpeculativeGenerator(target, None, draft), mass


def generate_tail_hits(gen, drafter: str, seeded: bool) -> int:
    prompts = [[(r + i) % HEAD for i in range(12)] * 2 for r in range(ENGINE_ROWS)]  # repeats: lookup drafts
    seed = list(range(ENGINE_ROWS)) if seeded else None
    results = gen.generate_ids(prompts, max_new_tokens=ENGINE_NEW, temperature=TEMPERATURE, seed=seed,
                               drafter=drafter, num_draft_tokens=2, ignore_eos=True)
    tokens = [t for r in results for t in r.token_ids]
    assert len(tokens) == ENGINE_ROWS * ENGINE_NEW
    if drafter != "none":
        assert sum(r.stats.drafted_tokens for r in results) > 0
    return sum(t >= HEAD for t in tokens)


@pytest.mark.parametrize("drafter,seeded", [("none", True), ("none", False), ("ngram", True), ("model", False)])
def test_generate_tail_mass(constant_pair, drafter, seeded):
    gen, mass = constant_pair
    assert_tail_mass(generate_tail_hits(gen, drafter, seeded), ENGINE_ROWS * ENGINE_NEW, mass)


def test_generate_tail_mass_fails_with_legacy_noise(constant_pair, legacy_noise):
    gen, mass = constant_pair
    with pytest.raises(AssertionError, match="binomial"):
        assert_tail_mass(generate_tail_hits(gen, "ngram", True), ENGINE_ROWS * ENGINE_NEW, mass)
