"""Drafts from the store never change what sampling draws: the first token follows the target exactly.

One batch of N identical prompts, all drafting the same stored token d: rows accept d
with probability p(d) and otherwise resample from p without d, so the first emitted
token must be distributed as p. Checked with a chi-square goodness-of-fit test against
the target's exact probabilities, for a likely d and for an unlikely one (a poisoned
entry). Each row has its own seed, so the draws are a fixed outcome, not a flaky one.

Negative control: a verifier that accepts stored drafts too often (the stored token's
race noise halved) must fail the same test. Seeded rows drafting from the store are
verified by position (kernels.reference.verify_by_position): the control patches that.
"""

from __future__ import annotations

import pytest
import torch

from specdec import SpeculativeGenerator, kernels
from specdec.caching import CacheLayer

N = 3000
ALPHA = 1e-3


@pytest.fixture(scope="module")
def gen(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)


def _target_probs(gen, prompt: list[int]) -> torch.Tensor:  # [V]
    with torch.no_grad():
        logits = gen.target_model(torch.tensor([prompt])).logits[0, -1]
    return torch.softmax(logits.double(), dim=-1)  # temperature 1, no top-k / top-p


def _draw_with_stored_draft(gen, prompt: list[int], draft: int, name: str, namespace: str):
    """N rows of the same prompt, each offered `draft` from the store; their results."""
    with CacheLayer.open(f"memory://dist-{name}", gen, namespace=namespace, response_cache=False) as layer:
        for n in layer.draft_store.contexts:
            layer.draft_store.put(prompt[-n:], [draft, 0, 0])
        results = gen.generate_ids([prompt] * N, max_new_tokens=2, temperature=1.0, drafter="cache",
                                   num_draft_tokens=1, ignore_eos=True, cache=layer, seed=list(range(N)))
    assert all(r.stats.drafted_tokens == 1 for r in results)  # every row was offered the stored token
    return results


def _chi_square_pvalue(first: torch.Tensor, p: torch.Tensor) -> float:
    from scipy.stats import chisquare

    counts = torch.bincount(first, minlength=p.numel()).double()
    expected = p * len(first)
    # Merge the tail so that every bin expects at least 5 draws.
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().unsqueeze(0)])
    exp = torch.cat([expected[keep], expected[~keep].sum().unsqueeze(0)])
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["likely", "unlikely"])
def test_first_token_distribution_is_the_targets(gen, which, cache_namespace):
    from scipy.stats import binomtest

    prompt = gen.tokenizer("def add(a, b):")["input_ids"]
    p = _target_probs(gen, prompt)
    order = torch.argsort(p, descending=True).tolist()
    draft = order[0] if which == "likely" else order[40]
    results = _draw_with_stored_draft(gen, prompt, draft, which, cache_namespace)
    first = torch.tensor([r.token_ids[0] for r in results])
    assert _chi_square_pvalue(first, p) > ALPHA
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert binomtest(accepted, N, float(p[draft])).pvalue > ALPHA  # accepted with probability p(d)


@pytest.mark.slow
def test_negative_control_overaccepting_verifier_fails(gen, cache_namespace, monkeypatch):
    """Accepting the stored draft too often (its noise halved) skews the first token: the same test must fail."""
    real = kernels.reference.verify_by_position

    def overaccepting(draft_tokens, target_logits, exponentials, **kw):
        noise = exponentials.clone()
        slots = draft_tokens.clamp(min=0).unsqueeze(-1)  # [B, K, 1]
        noise[:, :-1].scatter_(-1, slots, noise[:, :-1].gather(-1, slots) * 0.5)
        return real(draft_tokens, target_logits, noise, **kw)

    monkeypatch.setattr(kernels.reference, "verify_by_position", overaccepting)
    prompt = gen.tokenizer("def add(a, b):")["input_ids"]
    p = _target_probs(gen, prompt)
    draft = int(torch.argmax(p))
    results = _draw_with_stored_draft(gen, prompt, draft, "overaccepting", cache_namespace)
    first = torch.tensor([r.token_ids[0] for r in results])
    assert _chi_square_pvalue(first, p) < 1e-6
