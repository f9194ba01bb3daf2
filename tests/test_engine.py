"""Greedy speculative decoding equals plain greedy decoding, token for token (float64)."""

from __future__ import annotations

import pytest
import torch

from specdec import SpeculativeGenerator

PROMPTS = [
    [5, 17, 42, 9, 100, 7, 33],
    [61],
    [3, 9, 11, 2 + 200, 2 + 200, 15, 15, 15, 8, 1, 40, 4, 90, 91, 92],
    [250, 251],
]
NEW = 24


@pytest.fixture(autouse=True)
def _both_paths(engine_path):
    """Every test here runs on the static and on the generic engine path."""


def load(pair, draft: str | None) -> SpeculativeGenerator:
    return SpeculativeGenerator.from_pretrained(
        str(pair.target), str(pair.drafts[draft]) if draft else None, dtype=torch.float64
    )


def ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def baselines(tiny_pair):
    """Plain greedy decoding (drafter "none"), each prompt alone."""
    gen = load(tiny_pair, None)
    return {
        tiny_pair.family: [
            gen.generate_ids([p], max_new_tokens=NEW, drafter="none", ignore_eos=True)[0].token_ids for p in PROMPTS
        ]
    }


def test_baseline_matches_huggingface_greedy(tiny_pair):
    """The loop with drafter "none" is plain greedy decoding: HF generate agrees."""
    gen = load(tiny_pair, None)
    for prompt in PROMPTS[:2]:
        ours = gen.generate_ids([prompt], max_new_tokens=NEW, drafter="none", ignore_eos=True)[0].token_ids
        hf = gen.target_model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW, pad_token_id=0
        )[0, len(prompt):].tolist()
        assert ours == hf


@pytest.mark.parametrize("draft", ["same", "random", "partial"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_model_drafter_equals_baseline(tiny_pair, baselines, draft, k):
    gen = load(tiny_pair, draft)
    expected = baselines[tiny_pair.family]
    batch = gen.generate_ids(PROMPTS, max_new_tokens=NEW, drafter="model", num_draft_tokens=k, ignore_eos=True)
    assert ids(batch) == expected  # a batch of ragged prompts: every row equals its solo baseline
    solo = gen.generate_ids([PROMPTS[0]], max_new_tokens=NEW, drafter="model", num_draft_tokens=k, ignore_eos=True)
    assert solo[0].token_ids == expected[0]
    stats = batch[0].stats
    if draft == "same":
        assert stats.acceptance_rate == 1.0
        assert stats.target_forwards == -(-NEW // (k + 1))  # every step emits k + 1 tokens
    if draft == "random":
        assert stats.acceptance_rate < 0.5
    assert all(len(r.token_ids) == NEW and r.finish_reason == "length" for r in batch)


def test_partial_draft_really_is_partial(tiny_pair):
    gen = load(tiny_pair, "partial")
    res = gen.generate_ids(PROMPTS, max_new_tokens=NEW, drafter="model", num_draft_tokens=4, ignore_eos=True)
    rates = [r.stats.acceptance_rate for r in res]
    assert 0.0 < sum(rates) / len(rates) < 1.0


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_ngram_drafter_equals_baseline(tiny_pair, baselines, k):
    gen = load(tiny_pair, None)
    res = gen.generate_ids(PROMPTS, max_new_tokens=NEW, drafter="ngram", num_draft_tokens=k, ignore_eos=True)
    assert ids(res) == baselines[tiny_pair.family]


def test_auto_drafter_combines_model_and_ngram(tiny_pair, baselines):
    """drafter="auto" (the default) with a draft model drafts from both sources, per row and
    step; without one it is prompt lookup. Output is the baseline's either way."""
    with_draft = load(tiny_pair, "same")
    res = with_draft.generate_ids(PROMPTS[:1], max_new_tokens=NEW, num_draft_tokens=4, ignore_eos=True)
    assert res[0].token_ids == baselines[tiny_pair.family][0]
    assert res[0].stats.drafter_steps.get("model", 0) > 0 and res[0].stats.draft_forwards > 0
    without = load(tiny_pair, None)
    res = without.generate_ids(PROMPTS[:1], max_new_tokens=NEW, ignore_eos=True)
    assert res[0].stats.draft_forwards == 0 and set(res[0].stats.drafter_steps) <= {"ngram"}
    assert res[0].token_ids == baselines[tiny_pair.family][0]


def test_stop_token_inside_accepted_draft(tiny_pair, baselines):
    """All K drafts accepted, but a stop token sits in the middle of them."""
    expected = baselines[tiny_pair.family][0]
    stop_at = 5
    stop = expected[stop_at]
    first = expected.index(stop)
    gen = load(tiny_pair, "same")
    res = gen.generate_ids([PROMPTS[0]], max_new_tokens=NEW, drafter="model", num_draft_tokens=8,
                           stop_token_ids=[stop], ignore_eos=True)[0]
    assert res.token_ids == expected[: first + 1]
    assert res.finish_reason == "stop"
    base = load(tiny_pair, None).generate_ids([PROMPTS[0]], max_new_tokens=NEW, drafter="none",
                                              stop_token_ids=[stop], ignore_eos=True)[0]
    assert base.token_ids == res.token_ids


def test_per_row_stops_and_lengths_in_a_batch(tiny_pair, baselines):
    """Rows finish at different steps; the others go on and still match."""
    expected = baselines[tiny_pair.family]
    stop = expected[2][3]
    gen = load(tiny_pair, "partial")
    res = gen.generate_ids(PROMPTS, max_new_tokens=NEW, num_draft_tokens=3, stop_token_ids=[stop], ignore_eos=True)
    for row, r in zip(expected, res):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert r.token_ids == row[:cut]
        assert r.finish_reason == ("stop" if stop in row else "length")


def test_eos_stops_unless_ignored(llama_pair):
    gen = load(llama_pair, "same")
    base = gen.generate_ids([PROMPTS[0]], max_new_tokens=NEW, drafter="none", ignore_eos=True)[0].token_ids
    eos = base[4]
    gen.eos_token_ids = frozenset({eos})
    res = gen.generate_ids([PROMPTS[0]], max_new_tokens=NEW, num_draft_tokens=4)[0]
    assert res.token_ids == base[: base.index(eos) + 1] and res.finish_reason == "stop"
    res = gen.generate_ids([PROMPTS[0]], max_new_tokens=NEW, num_draft_tokens=4, ignore_eos=True)[0]
    assert res.token_ids == base


def test_max_new_tokens_edges(llama_pair):
    gen = load(llama_pair, "same")
    assert gen.generate_ids([PROMPTS[0]], max_new_tokens=0)[0].token_ids == []
    for n in (1, 2, 5):
        res = gen.generate_ids([PROMPTS[0]], max_new_tokens=n, num_draft_tokens=8, ignore_eos=True)[0]
        assert len(res.token_ids) == n and res.finish_reason == "length"


def test_prompt_at_position_limit(llama_pair):
    gen = load(llama_pair, "partial")
    limit = gen.max_positions
    prompt = [7] * (limit - 6)
    base = gen.generate_ids([prompt], max_new_tokens=6, drafter="none", ignore_eos=True)[0].token_ids
    res = gen.generate_ids([prompt], max_new_tokens=6, num_draft_tokens=8, ignore_eos=True)[0].token_ids
    assert res == base and len(res) == 6


def test_constructor_with_loaded_models(llama_pair, tiny_tokenizer):
    loaded = load(llama_pair, "partial")
    gen = SpeculativeGenerator(loaded.target_model, None, loaded.draft_model)
    res = gen.generate_ids(PROMPTS[:2], max_new_tokens=8, ignore_eos=True)
    assert res[0].text is None
    assert ids(res) == ids(loaded.generate_ids(PROMPTS[:2], max_new_tokens=8, ignore_eos=True))


def test_the_kv_cache_goes_by_the_keyword_the_model_takes(tiny_pair, baselines):
    """transformers 5.25 renamed forward's `past_key_values` to `cache` (the old name warns on
    every call and goes in 5.40): every forward of target and draft uses the name the model's
    forward declares, and the output is unchanged."""
    import inspect

    from specdec.kv import cache_keyword

    gen = load(tiny_pair, "same")
    seen = []
    for model in (gen.target_model, gen.draft_model):
        declared = inspect.signature(type(model).forward).parameters
        assert cache_keyword(model) == ("cache" if "cache" in declared else "past_key_values")
        forward = model.forward

        def spy(*args, _forward=forward, **kwargs):
            seen.append({"cache", "past_key_values"} & kwargs.keys())
            return _forward(*args, **kwargs)

        model.forward = spy
    out = gen.generate_ids([PROMPTS[0]], max_new_tokens=NEW, drafter="model", num_draft_tokens=3, ignore_eos=True)
    assert out[0].token_ids == baselines[tiny_pair.family][0]
    keyword = cache_keyword(gen.target_model)
    assert seen and all(names == {keyword} for names in seen)


BF16_PROMPTS = 12


def _bf16_prompts(vocab: int) -> list[list[int]]:
    """Prompts of 5-99 tokens: attention over lengths that are mostly not multiples of 16."""
    rng = torch.Generator().manual_seed(21)
    lengths = torch.randint(5, 100, (BF16_PROMPTS,), generator=rng).tolist()
    return [torch.randint(3, vocab, (n,), generator=rng).tolist() for n in lengths]


def test_bf16_logits_equal_transformers_generate(llama_pair, engine_path, monkeypatch):
    """bfloat16, greedy, each prompt alone: the logits every step verifies are transformers'
    `generate` logits bit for bit on the generic path, and on the first step (computed by the
    forward over the whole prompt) on the static path too. In bf16 two top logits are often
    exactly tied, so any other order of operations can flip a greedy token."""
    import specdec.engine

    gen = SpeculativeGenerator.from_pretrained(str(llama_pair.target), dtype=torch.bfloat16, device="cpu")
    seen = []

    def verify(state, proposal, logits, num_draft):
        seen.append(logits[0, 0].float())  # [V]: drafter "none" verifies one position a step
        return verify_(state, proposal, logits, num_draft)

    verify_ = specdec.engine._verify
    monkeypatch.setattr(specdec.engine, "_verify", verify)
    for prompt in _bf16_prompts(gen.vocab_size):
        hf = gen.target_model.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
        seen.clear()
        ours = gen.generate_ids([prompt], max_new_tokens=16, drafter="none")[0].token_ids
        assert torch.equal(seen[0], hf.logits[0][0]), f"first step, prompt of {len(prompt)} tokens"
        if engine_path == "generic":
            assert ours == hf.sequences[0, len(prompt):].tolist()
            assert all(torch.equal(a, b[0]) for a, b in zip(seen, hf.logits))


def test_step_outcome_reads_every_field_in_one_copy(monkeypatch):
    import specdec.engine as eng

    copies = []
    real = eng._to_host
    monkeypatch.setattr(eng, "_to_host", lambda packed: copies.append(packed.shape) or real(packed))
    tokens = torch.tensor([[5, 6, -1], [7, -1, -1]])  # [B=2, k+1=3]
    out = eng.StepOutcome.read(
        tokens, num_accepted=torch.tensor([1, 0]), num_draft=torch.tensor([2, 1]), kept=torch.tensor([2, 1]),
        reason=torch.tensor([eng._RUNNING, eng._LENGTH]), confidence=torch.tensor([[0.5, 0.25, 0.9], [1.0, 0.0, 0.0]]),
    )
    assert copies == [(2, 3 + 4 + 2)]
    assert out.tokens == [[5, 6, -1], [7, -1, -1]]
    assert (out.accepted, out.drafted, out.kept, out.reason) == ([1, 0], [2, 1], [2, 1], [eng._RUNNING, eng._LENGTH])
    assert out.confidence == [[0.5, 0.25], [1.0, 0.0]]
    assert eng.StepOutcome.read(tokens, torch.tensor([1, 0]), torch.tensor([2, 1]), torch.tensor([2, 1]),
                                torch.tensor([0, 2]), None).confidence is None


def test_ragged_prefill_keeps_logits_only_at_each_rows_last_slot(llama_pair, engine_path):
    """The prefill computes logits at the rows' last prompt slots only ([B, distinct lengths,
    V]), never at every slot between the shortest and the longest prompt."""
    gen = SpeculativeGenerator.from_pretrained(str(llama_pair.target), device="cpu")
    prompts = [[5, 6, 7], list(range(3, 90)), [9, 8, 7], list(range(4, 40))]  # lengths 3, 87, 3, 36
    shapes = []
    handle = gen.target_model.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.logits.shape)))
    try:
        batched = gen.generate_ids(prompts, max_new_tokens=6, drafter="none", ignore_eos=True)
    finally:
        handle.remove()
    assert shapes[0] == (4, 3, gen.vocab_size)  # three distinct prompt lengths
    for prompt, res in zip(prompts, batched):
        assert res.token_ids == gen.generate_ids([prompt], max_new_tokens=6, drafter="none", ignore_eos=True)[0].token_ids
