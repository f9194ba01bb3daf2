"""Drafts from the store never change what sampling draws: the first token follows the target exactly.

One batch of N identical prompts, all drafting the same stored token d: rows accept d
with probability p(d) and otherwise resample from p without d, so the first emitted
token must be distributed as p. Checked with a chi-square goodness-of-fit test against
the target's exact probabilities, for a likely d and for an unlikely one (a poisoned
entry).
"""

from __future__ import annotations

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.caching import CacheLayer

N = 3000


@pytest.fixture(scope="module")
def gen(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["likely", "unlikely"])
def test_first_token_distribution_is_the_targets(gen, which, cache_namespace):
    from scipy.stats import binomtest, chisquare

    prompt = gen.tokenizer("def add(a, b):")["input_ids"]
    with torch.no_grad():
        logits = gen.target_model(torch.tensor([prompt])).logits[0, -1]
    p = torch.softmax(logits.double(), dim=-1)  # temperature 1, no top-k / top-p
    order = torch.argsort(p, descending=True).tolist()
    draft = order[0] if which == "likely" else order[40]
    with CacheLayer.open(f"memory://dist-{which}", gen, namespace=cache_namespace, response_cache=False) as layer:
        for n in layer.draft_store.contexts:
            layer.draft_store.put(prompt[-n:], [draft, 0, 0])
        results = gen.generate_ids([prompt] * N, max_new_tokens=2, temperature=1.0, drafter="cache",
                                   num_draft_tokens=1, ignore_eos=True, cache=layer)
    assert all(r.stats.drafted_tokens == 1 for r in results)  # every row was offered the stored token
    first = torch.tensor([r.token_ids[0] for r in results])
    counts = torch.bincount(first, minlength=p.numel()).double()
    expected = p * N
    # Merge the tail so that every bin expects at least 5 draws.
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().unsqueeze(0)])
    exp = torch.cat([expected[keep], expected[~keep].sum().unsqueeze(0)])
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    accepted = sum(r.stats.accepted_tokens for r in results)
    assert binomtest(accepted, N, float(p[draft])).pvalue > 1e-3  # accepted with probability p(d)
