"""Semantics of the plain-PyTorch reference ops (the oracle for the kernels)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats as scistats

from specdec.kernels import reference as ref


def test_logits_to_probs_temperature_and_normalisation():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    p = ref.logits_to_probs(logits, temperature=0.5)
    assert torch.allclose(p, torch.softmax(logits / 0.5, -1))
    assert p.dtype == torch.float64
    assert ref.logits_to_probs(logits.half(), 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature > 0"):
        ref.logits_to_probs(logits, 0.0)


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[5.0, 3.0, 3.0, 1.0]])
    p = ref.logits_to_probs(logits, 1.0, top_k=2)
    assert (p > 0).tolist() == [[True, True, True, False]]
    assert float(p.sum()) == pytest.approx(1.0)


def test_top_p_is_tie_inclusive_and_keeps_the_crossing_token():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    logits = probs.log()
    p = ref.logits_to_probs(logits, 1.0, top_p=0.6)
    assert (p > 0).tolist() == [[True, True, True, False]]  # 0.5 < 0.6, so one 0.2 crosses; its tie stays
    p = ref.logits_to_probs(logits, 1.0, top_p=0.5)
    assert (p > 0).tolist() == [[True, False, False, False]]
    p = ref.logits_to_probs(logits, 1.0, top_p=0.01)
    assert (p > 0).tolist() == [[True, False, False, False]]  # the top token always survives


def _threshold_by_full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """p_m exactly as the module docstring defines it: the whole row sorted."""
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    exclusive_mass = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    last_rank = (exclusive_mass < top_p).sum(dim=-1, keepdim=True) - 1
    return sorted_probs.gather(-1, last_rank.clamp(min=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vocab", [7, 300, 5000, 131072])
def test_top_p_threshold_equals_the_full_sort_bit_for_bit(dtype, vocab):
    """The CPU top-p reads the nucleus from a prefix of the largest probabilities (growing
    when a row's nucleus is longer): its threshold is the full sort's, bit for bit, for
    peaked and flat rows side by side (a flat row makes the prefix grow), tied
    probabilities, rows with excluded ids, and top_p from tiny to nearly 1."""
    g = torch.Generator().manual_seed(vocab)
    rows = []
    for scale in (0.05, 1.0, 4.0, 12.0):  # flat (nucleus of most ids) to peaked (a few)
        rows.append(torch.randn(3, vocab, generator=g, dtype=torch.float64) * scale)
    logits = torch.cat(rows).to(dtype)
    logits[0, : vocab // 2] = logits[0, 0]  # ties across a prefix boundary
    logits[1, ::3] = float("-inf")  # excluded ids: probability 0
    probs = torch.softmax(logits, dim=-1)
    for top_p in (1e-6, 0.3, 0.9, 0.95, 0.999, 1.0 - 1e-7):
        want = _threshold_by_full_sort(probs, top_p)
        assert torch.equal(ref.top_p_threshold(probs, top_p), want), top_p
        assert torch.equal(ref.top_p_threshold(probs.view(2, 6, vocab), top_p), want.view(2, 6, 1))


def test_top_p_prefix_grows_until_the_nucleus_fits(monkeypatch):
    """A nucleus longer than the prefixes (a flat row) is found in the whole sorted row; the
    topk calls show which prefixes were tried, and the answer is the full sort's."""
    calls = []
    real = torch.topk

    def counting(x, n, *args, **kwargs):
        calls.append(n)
        return real(x, n, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", counting)
    flat = torch.softmax(torch.randn(2, 20000, generator=torch.Generator().manual_seed(0)) * 0.01, dim=-1)
    peaked = torch.softmax(torch.randn(2, 20000, generator=torch.Generator().manual_seed(1)) * 20.0, dim=-1)
    assert torch.equal(ref.top_p_threshold(peaked, 0.9), _threshold_by_full_sort(peaked, 0.9))
    assert calls == [ref.TOP_P_PREFIXES[0]]  # a few ids hold 0.9: one short prefix
    calls.clear()
    assert torch.equal(ref.top_p_threshold(flat, 0.9), _threshold_by_full_sort(flat, 0.9))
    assert calls == list(ref.TOP_P_PREFIXES)  # 18000 ids: both prefixes, then the whole row sorted
    calls.clear()
    both = torch.cat([peaked, flat])
    assert torch.equal(ref.logits_to_probs(both.log(), 1.0, top_p=0.9),
                       _reference_probs_by_full_sort(both.log(), 0.9))


def _reference_probs_by_full_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(probs < _threshold_by_full_sort(probs, top_p), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def test_top_k_then_top_p_on_renormalised_probs():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # after top-3: 0.444, 0.333, 0.222; top-p 0.7 keeps the first two (0.444 < 0.7 <= 0.777)
    p = ref.logits_to_probs(logits, 1.0, top_k=3, top_p=0.7)
    assert torch.allclose(p, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


def test_verify_greedy_cases():
    logits = torch.zeros(3, 4, 6)
    best = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    logits.scatter_(2, best.unsqueeze(-1), 1.0)
    draft = torch.tensor([[1, 2, 3], [1, 0, 3], [5, 5, 5]])
    tokens, n = ref.verify_greedy(draft, logits, torch.tensor([3, 3, 1]))
    assert n.tolist() == [3, 1, 1]
    assert tokens.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [5, 5, -1, -1]]
    tokens, n = ref.verify_greedy(torch.empty(3, 0, dtype=torch.long), logits[:, :1])
    assert tokens.tolist() == [[1], [1], [5]] and n.tolist() == [0, 0, 0]


def test_verify_sampling_identical_draft_always_accepts():
    torch.manual_seed(0)
    logits = torch.randn(4, 4, 9, dtype=torch.float64)
    q = ref.logits_to_probs(logits[:, :3], 1.0)
    draft = torch.multinomial(q.view(-1, 9), 1).view(4, 3)
    u = torch.rand(4, 3, dtype=torch.float64)
    e = torch.empty(4, 9, dtype=torch.float64).exponential_()
    tokens, n = ref.verify_sampling(draft, q, logits, u, e)
    assert n.tolist() == [3, 3, 3, 3]
    assert (tokens[:, :3] == draft).all() and (tokens[:, 3] >= 0).all()


def test_verify_sampling_one_hot_rejection_never_re_emits_the_draft():
    torch.manual_seed(1)
    logits = torch.randn(64, 2, 5, dtype=torch.float64)
    draft = torch.zeros(64, 1, dtype=torch.long)
    u = torch.ones(64, 1, dtype=torch.float64) - 1e-12  # reject unless p(d) ~ 1
    e = torch.empty(64, 5, dtype=torch.float64).exponential_()
    tokens, n = ref.verify_sampling(draft, None, logits, u, e)
    assert (n == 0).all() and (tokens[:, 0] != 0).all() and (tokens[:, 1] == -1).all()


def test_exponential_race_samples_proportionally():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.5, 1.5, 0.0, 3.0], dtype=torch.float64)  # unnormalised
    e = torch.empty(20000, 4, dtype=torch.float64).exponential_(generator=g)
    draws = ref.sample_exponential_race(weights.expand(20000, 4), e)
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == 0
    expected = [20000 * w / 5.0 for w in (0.5, 1.5, 3.0)]
    assert scistats.chisquare([counts[0], counts[1], counts[3]], expected).pvalue > 1e-3


# --------------------------------------------------------------------------- non-finite logits

def test_nan_is_excluded_and_never_the_argmax():
    logits = torch.tensor([[[0.0, float("nan"), 1.0, float("-inf")], [2.0, 1.0, float("nan"), 0.0]]],
                          dtype=torch.float64)  # [1, 2, 4]
    tokens, n = ref.verify_greedy(torch.tensor([[2]]), logits)
    assert n.tolist() == [1] and tokens.tolist() == [[2, 0]]
    p = ref.logits_to_probs(logits, 1.0)
    assert not torch.isnan(p).any()
    assert p[0, 0, 1] == 0 and p[0, 0, 3] == 0 and p[0, 1, 2] == 0
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, dtype=torch.float64))


def test_positive_inf_tokens_share_the_mass():
    inf = float("inf")
    logits = torch.tensor([[3.0, inf, 1.0, inf, float("nan")]])
    p = ref.logits_to_probs(logits, 0.5)
    assert p.tolist() == [[0.0, 0.5, 0.0, 0.5, 0.0]]
    tokens, _ = ref.verify_greedy(torch.empty(1, 0, dtype=torch.long), logits.unsqueeze(1))
    assert tokens.tolist() == [[1]]  # lowest id among the +inf tokens


@pytest.mark.parametrize("fill", [float("-inf"), float("nan")])
def test_row_with_no_allowed_token_emits_minus_one(fill):
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    best = logits.argmax(-1)  # [2, 3]
    logits[0, 1] = fill  # row 0: position 1 allows nothing
    logits[1, 0, :3] = float("-inf")
    logits[1, 0, 3:] = float("nan")  # row 1: position 0 allows nothing
    draft = best[:, :2].clone()
    draft[1, 0] = -1  # even a -1 draft does not match a position without a token
    tokens, n = ref.verify_greedy(draft, logits)
    assert n.tolist() == [1, 0]
    assert tokens.tolist() == [[int(best[0, 0]), -1, -1], [-1, -1, -1]]
    p = ref.logits_to_probs(logits, 0.8, top_k=2, top_p=0.9)
    assert (p[0, 1] == 0).all() and (p[1, 0] == 0).all() and not torch.isnan(p).any()
    # Sampling: the draft at a position without a token is rejected, -1 emitted there.
    q = ref.logits_to_probs(torch.randn(2, 2, 6, dtype=torch.float64), 1.0)
    u = torch.zeros(2, 2, dtype=torch.float64)  # accept whenever p(d) > 0
    e = torch.ones(2, 6, dtype=torch.float64)
    for probs in (q, None):
        tokens, n = ref.verify_sampling(draft.clamp(min=0), probs, logits, u, e)
        assert n.tolist() == [1, 0] and tokens[0, 1] == -1 and tokens[1, 0] == -1


def test_exponential_race_of_zero_weights_is_minus_one():
    weights = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert ref.sample_exponential_race(weights, torch.ones(2, 3)).tolist() == [-1, 1]
