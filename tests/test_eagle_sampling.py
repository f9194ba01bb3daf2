"""Sampling with drafter "eagle" is lossless: an EAGLE-3 head's q lives on its draft
vocabulary and is placed at the target's ids (zero elsewhere) before verification.

The target is test_sampling's (a 5-token vocabulary, distributions moved a lot by context);
the head drafts over 4 of the 5 tokens (token 1 is outside its vocabulary, so every sample
of 1 comes from a rejection's residual). Thousands of seeded samples of the first four
tokens must pass a chi-square goodness-of-fit test against the exact distribution at
several temperature/top-k/top-p settings, and a head whose mapping is broken (q reported
one id off from where its drafts are drawn) must fail it. At a real vocabulary size
(131072, float32) the first token's distribution is tested the same way, with the same
negative control.
"""

from __future__ import annotations

import pytest
import torch
from fixtures_models import make_model
from specdec.kernels import reference
from test_sampling import ALPHA, chi_square_pvalue, draw, exact_distribution

from specdec import SpeculativeGenerator
from specdec.eagle import EagleHead
from specdec.eagle_training import head_config

DRAFT_IDS = [0, 2, 3, 4]


def _head(target, draft_ids: list[int], seed: int, scale: float) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(head_config(target, draft_vocab=len(draft_ids)))
    ids = torch.tensor(draft_ids)
    head.d2t.copy_(ids - torch.arange(len(ids)))
    head.t2d.zero_()
    head.t2d[ids] = True
    with torch.no_grad():
        head.lm_head.weight.mul_(scale)
    return head.double()


@pytest.fixture(scope="module")
def small():
    target = make_model("llama", 5, seed=11, layers=2, hidden=16)
    with torch.no_grad():
        for p in target.parameters():
            if p.dim() >= 2:
                p.mul_(1.5)
    return target


def _broken(monkeypatch) -> None:
    """q placed one draft id off from where the drafts are drawn."""
    def rolled(self, draft_probs):
        shape = (*draft_probs.shape[:-1], self.vocab_size)
        index = self.draft_to_target().roll(1).expand(*draft_probs.shape[:-1], -1)
        return draft_probs.new_zeros(shape).scatter(-1, index, draft_probs)

    monkeypatch.setattr(EagleHead, "target_probs", rolled)


SETTINGS = [
    pytest.param(1.0, 0, 1.0, id="t1.0"),
    pytest.param(0.6, 0, 1.0, id="t0.6"),
    pytest.param(1.3, 3, 1.0, id="t1.3-topk3"),
    pytest.param(0.8, 4, 0.85, id="t0.8-topk4-topp0.85"),
]


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_eagle_samples_follow_target_distribution(small, temperature, top_k, top_p):
    gen = SpeculativeGenerator(small, draft_head=_head(small, DRAFT_IDS, seed=3, scale=4.0))
    samples, results = draw(gen, "eagle", temperature, top_k, top_p, k=3)
    assert sum(r.stats.accepted_tokens for r in results) > 1000  # drafts are accepted, and rejected
    assert sum(r.stats.drafted_tokens - r.stats.accepted_tokens for r in results) > 1000
    assert chi_square_pvalue(samples, exact_distribution(small, temperature, top_k, top_p)) > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_k, top_p", [SETTINGS[0], SETTINGS[3]])
def test_negative_control_broken_mapping_fails(small, monkeypatch, temperature, top_k, top_p):
    _broken(monkeypatch)
    gen = SpeculativeGenerator(small, draft_head=_head(small, DRAFT_IDS, seed=3, scale=4.0))
    samples, _ = draw(gen, "eagle", temperature, top_k, top_p, k=3)
    assert chi_square_pvalue(samples, exact_distribution(small, temperature, top_k, top_p)) < ALPHA


# ----------------------------------------------------------------------------- real vocabulary size

BIG_VOCAB = 131072
BIG_SAMPLES = 2000
CHUNK = 250
BIG_PROMPT = [5, 900, 77_000, 12, 131_000]


@pytest.fixture(scope="module")
def big():
    """A tiny target over 131072 ids whose first-token distribution has its mass on a few hundred
    ids, and a head whose 512-id draft vocabulary (spread over the whole range) holds them."""
    target = make_model("llama", BIG_VOCAB, seed=21, layers=2, hidden=16).float()  # float32: V-wide work is costly
    with torch.no_grad():
        target.lm_head.weight.mul_(5.0)  # 78% of the first token's mass on 256 ids (flat otherwise)
        logits = target(torch.tensor([BIG_PROMPT])).logits[0, -1]
    top = torch.topk(logits, 256).indices
    rest = torch.randperm(BIG_VOCAB, generator=torch.Generator().manual_seed(0))[:512]
    draft_ids = sorted(set(top.tolist()) | set(rest.tolist()))[:512]
    if not set(top.tolist()) <= set(draft_ids):
        draft_ids = sorted(set(top.tolist()) | set(rest.tolist()[: 512 - 256]))
    head = _head(target, draft_ids, seed=4, scale=1.0).float()
    with torch.no_grad():  # the head's logits: the target's first-token logits on its draft ids, sharpened
        head.lm_head.weight.zero_()
        head.norm.weight.fill_(1.0)
    gen = SpeculativeGenerator(target, draft_head=head)
    bias = logits[torch.tensor(draft_ids)]

    def with_bias(self, prenorm):  # constant logits: q is fixed, so its effect is easy to see
        return (bias * 1.5).expand(*prenorm.shape[:-1], -1).to(prenorm.dtype)

    return target, gen, logits, with_bias


def _first_tokens(gen, temperature, top_p) -> tuple[list[tuple[int]], list]:
    results = []
    for start in range(0, BIG_SAMPLES, CHUNK):  # [rows, K+1, V] logits: a chunk at a time
        results += gen.generate_ids([BIG_PROMPT] * CHUNK, max_new_tokens=2, temperature=temperature, top_p=top_p,
                                    seed=list(range(start, start + CHUNK)), drafter="eagle", num_draft_tokens=1,
                                    ignore_eos=True)
    return [(r.token_ids[0],) for r in results], results


def _first_pvalue(samples, logits, temperature, top_p) -> float:
    from scipy import stats as scistats

    probs = reference.logits_to_probs(logits, temperature, 0, top_p)
    counts: dict[int, int] = {}
    for (t,) in samples:
        counts[t] = counts.get(t, 0) + 1
    if any(probs[t] == 0 for t in counts):
        return 0.0
    n = len(samples)
    big = (probs * n >= 5).nonzero().flatten().tolist()
    observed = [counts.get(t, 0) for t in big]
    expected = [float(probs[t]) * n for t in big]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    return float(scistats.chisquare(observed, expected).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("broken", [False, True], ids=["exact", "broken-mapping"])
def test_eagle_first_token_at_real_vocabulary(big, monkeypatch, broken):
    target, gen, logits, with_bias = big
    monkeypatch.setattr(EagleHead, "logits", with_bias)
    if broken:
        _broken(monkeypatch)
    samples, results = _first_tokens(gen, 0.9, 0.95)
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert 0.1 * BIG_SAMPLES < accepted < BIG_SAMPLES  # drafts are accepted, and rejected
    pvalue = _first_pvalue(samples, logits, 0.9, 0.95)
    assert (pvalue < ALPHA) if broken else (pvalue > ALPHA)
