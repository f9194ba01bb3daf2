"""The check of a cached greedy response in bounded memory, with the argmax of the full logits.

A hit's check runs one forward over prompt + response; holding its logits for every
position of every row ([B, L, V]) cost more than decoding the same rows uncached, and a
forged entry chooses L. Sizes are counted at the LM head (a forward hook on the output
embedding), so the bound is checked exactly, not through the allocator.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from fixtures_models import make_model
from transformers import LlamaForCausalLM

from specdec import SpeculativeGenerator, caching
from specdec.caching import CacheLayer, verify_responses
from specdec.params import make_params

VOCAB = 65536
ROWS = 6
NEW = 64
GREEDY = dict(max_new_tokens=NEW, ignore_eos=True, drafter="none")
CHUNK_LOGITS = 1 << 22  # the most logits the check holds at once (verify_responses' docstring)


class NegatedLogits(LlamaForCausalLM):
    """A model whose logits are not head(last hidden state): the check must not split its head."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0, **kwargs):
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            logits_to_keep=logits_to_keep, **kwargs,
        )
        out.logits = -out.logits
        return out


@pytest.fixture(scope="module")
def big_vocab_model():
    return make_model("llama", VOCAB, seed=3, hidden=16, positions=128)


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (9 + 3 * i,), generator=g).tolist() for i in range(ROWS)]  # ragged


@contextmanager
def head_output_sizes(model):
    """Logits per LM-head call (elements) while the block runs."""
    sizes: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: sizes.append(out.numel()))
    try:
        yield sizes
    finally:
        handle.remove()


def uncached_run(model) -> tuple[int, list[list[int]]]:
    """Peak logits of decoding the rows without a cache, and the outputs."""
    with head_output_sizes(model) as sizes:
        expected = [r.token_ids for r in SpeculativeGenerator(model, None).generate_ids(prompts(), cache=None, **GREEDY)]
    return max(sizes), expected


@pytest.fixture(scope="module")
def big_vocab_uncached(big_vocab_model):
    return uncached_run(big_vocab_model)


def run_hit(model, uncached_run: tuple[int, list[list[int]]], *, forge: bool):
    """The rows answered from the cache: (peak logits of the uncached call, peak logits of the
    cached call, outputs uncached, results cached)."""
    gen = SpeculativeGenerator(model, None)
    rows = prompts()
    uncached, expected = uncached_run
    with CacheLayer.open(f"memory://{uuid.uuid4().hex}", gen) as layer:
        params = make_params(**GREEDY)
        for row, tokens in zip(rows, expected):
            # An entry for every row: the true response, or a forged one that is right for 3 tokens.
            entry = tokens[:3] + [(t + 1) % VOCAB for t in tokens[3:]] if forge else tokens
            assert layer.responses.put(layer.request_for(row, None, params), entry, "length")
        layer.flush()
        with head_output_sizes(model) as sizes:
            results = gen.generate_ids(rows, cache=layer, **GREEDY)
        return uncached, max(sizes), expected, results


@pytest.mark.parametrize("forge", [False, True], ids=["true-entries", "forged-entries"])
def test_check_of_a_hit_holds_a_chunk_of_logits_not_every_position(big_vocab_model, big_vocab_uncached, forge):
    uncached, cached, expected, results = run_hit(big_vocab_model, big_vocab_uncached, forge=forge)
    assert [r.token_ids for r in results] == expected
    kinds = {r.stats.cache_kind for r in results}
    assert kinds == ({"partial"} if forge else {"verified"})
    # Before: [B, NEW + 1, V] at once, 6 times this bound.
    assert cached <= max(uncached, CHUNK_LOGITS), (cached, uncached)
    assert cached < ROWS * (NEW + 1) * VOCAB // 4


def test_model_with_its_own_logit_transform_is_checked_by_rows(big_vocab_model):
    model = NegatedLogits(big_vocab_model.config).to(torch.float64).eval()
    model.load_state_dict(big_vocab_model.state_dict())
    uncached, cached, expected, results = run_hit(model, uncached_run(model), forge=False)
    # Splitting off the head would take the argmax of the un-negated logits: every check rejected.
    assert [r.token_ids for r in results] == expected
    assert {r.stats.cache_kind for r in results} == {"verified"}
    assert cached <= max(uncached, CHUNK_LOGITS, (NEW + 1) * VOCAB)  # one row at a time
    assert cached < ROWS * (NEW + 1) * VOCAB


def reference_check(model, prompts_: list[list[int]], responses: list[list[int]]) -> list[tuple[list[int], int]]:
    """The check from the full logits of one batched forward (kept tokens, agreed count)."""
    width = max(len(p) + len(r) for p, r in zip(prompts_, responses))
    ids = torch.zeros(len(prompts_), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(prompts_, responses)):
        ids[b, width - len(p) - len(r) :] = torch.tensor(p + r)
        mask[b, width - len(p) - len(r) :] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    out = []
    for b, r in enumerate(responses):
        target = logits[b, width - len(r) - 1 :].argmax(-1).tolist()  # [len(r) + 1]
        agreed = next((j for j in range(len(r)) if r[j] != target[j]), len(r))
        out.append((r[:agreed] + [target[agreed]], agreed))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_check_keeps_the_argmax_of_the_full_logits(monkeypatch, family, dtype):
    vocab = 512
    model = make_model(family, vocab, seed=5).to(dtype)
    gen = SimpleNamespace(target_model=model, device=torch.device("cpu"), vocab_size=vocab)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 17, 11)]
    # Responses that are greedy for a while, then wrong, of different lengths.
    truth = [reference_check(model, [p], [[]])[0][0] for p in rows]
    responses = []
    for p, length, wrong_at in zip(rows, (12, 5, 9), (8, 0, 9)):
        r: list[int] = []
        while len(r) < length:
            nxt = reference_check(model, [p], [r])[0][0][-1]
            r.append(nxt if len(r) != wrong_at else (nxt + 1) % vocab)
        responses.append(r)
    assert truth[0][0] == responses[0][0]
    expected = reference_check(model, rows, responses)
    for budget in (1 << 22, 7 * vocab, 1):  # one chunk; chunks across row boundaries; one position each
        monkeypatch.setattr(caching, "_CHECK_LOGITS", budget)
        checked = verify_responses(gen, rows, responses, max_new_tokens=10_000, stop_ids=frozenset())
        assert [(c.token_ids, c.verified_tokens) for c in checked] == expected, budget
        if dtype == torch.float64:  # the responses were built row by row: in bfloat16 the batch may disagree
            assert [c.kind for c in checked] == ["partial", "rejected", "verified"]
