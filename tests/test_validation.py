"""Bad input gets a clear ValueError/TypeError, raised before any model forward."""

from __future__ import annotations

import pytest
import torch

from fixtures_models import build_tokenizer, make_model, save
from specdec import MAX_DRAFT_TOKENS, SpeculativeGenerator


@pytest.fixture(scope="module")
def gen(llama_pair):
    g = SpeculativeGenerator.from_pretrained(str(llama_pair.target), str(llama_pair.drafts["partial"]),
                                             dtype=torch.float64)
    return g


@pytest.fixture
def no_forward(gen, monkeypatch):
    """Fail the test if any model runs a forward pass."""
    calls = []

    def forbid(model):
        original = model.forward

        def wrapped(*a, **k):
            calls.append(type(model).__name__)
            return original(*a, **k)

        monkeypatch.setattr(model, "forward", wrapped)

    forbid(gen.target_model)
    forbid(gen.draft_model)
    yield
    assert calls == [], f"a model ran before the error: {calls}"


CASES = [
    # (kwargs, exception, message pattern)
    (dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be >= 0, got -1"),
    (dict(max_new_tokens=2.5), TypeError, r"max_new_tokens must be an int, got float"),
    (dict(temperature=-0.5), ValueError, r"temperature must be >= 0, got -0.5; use 0 for greedy"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be finite"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-1), ValueError, r"top_k must be >= 0, got -1; use 0 to disable"),
    (dict(num_draft_tokens=-2), ValueError, r"num_draft_tokens must be >= 0, got -2"),
    (dict(num_draft_tokens=10_000), ValueError,
     rf"num_draft_tokens=10000 is larger than the supported maximum of {MAX_DRAFT_TOKENS}"),
    (dict(drafter="medusa"), ValueError, r"unknown drafter 'medusa'; choose one of .*model.*ngram.*none"),
    (dict(seed=-3), ValueError, r"seed must be >= 0, got -3"),
    (dict(seed=[1, 2, 3]), ValueError, r"seed has 3 entries but there are 1 prompts"),
    (dict(stop_token_ids=[-1]), ValueError, r"stop_token_ids must be non-negative ints"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", CASES, ids=[str(c[0]) for c in CASES])
def test_bad_generation_arguments(gen, no_forward, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gen.generate_ids([[5, 6, 7]], **kwargs)
    with pytest.raises(exc, match=pattern):
        gen.generate("def f():", **kwargs)


def test_empty_prompts(gen, no_forward):
    with pytest.raises(ValueError, match=r"prompt 0 is empty; every prompt needs at least one"):
        gen.generate("")
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        gen.generate_ids([[3], []])
    with pytest.raises(ValueError, match=r"no prompts given"):
        gen.generate([])
    with pytest.raises(ValueError, match=r"no prompts given"):
        gen.generate_ids([])


def test_prompt_plus_new_tokens_beyond_positions(gen, no_forward):
    limit = gen.max_positions
    with pytest.raises(ValueError, match=rf"prompt 0 has {limit - 3} tokens and max_new_tokens=10: "
                                         rf"{limit + 7} positions, but the model supports {limit}"):
        gen.generate_ids([[5] * (limit - 3)], max_new_tokens=10)


def test_token_ids_outside_vocabulary(gen, no_forward):
    with pytest.raises(ValueError, match=rf"outside the model's vocabulary \[0, {gen.vocab_size}\)"):
        gen.generate_ids([[1, gen.vocab_size + 5]])
    with pytest.raises(TypeError, match=r"prompt 0 must be a list of ints"):
        gen.generate_ids([["a", "b"]])


def test_model_drafter_without_draft(llama_pair):
    g = SpeculativeGenerator.from_pretrained(str(llama_pair.target), dtype=torch.float64)
    with pytest.raises(ValueError, match=r'drafter="model" needs a draft model, but none is loaded'):
        g.generate_ids([[1, 2]], drafter="model")


def test_text_prompt_without_tokenizer(gen):
    bare = SpeculativeGenerator(gen.target_model)
    with pytest.raises(ValueError, match=r"needs a tokenizer .* use generate_ids"):
        bare.generate("hello")


def test_models_on_different_devices(gen):
    draft_on_meta = make_model("llama", gen.vocab_size, seed=3).to("meta")
    with pytest.raises(ValueError, match=r"different devices \(target inputs on cpu, draft on meta\)"):
        SpeculativeGenerator(gen.target_model, gen.tokenizer, draft_on_meta)


def test_draft_vocabulary_larger_than_target(gen):
    big = make_model("llama", gen.vocab_size + 64, seed=3)
    with pytest.raises(ValueError, match=rf"draft vocabulary \({gen.vocab_size + 64} tokens\) is larger than "
                                         rf"the target's \({gen.vocab_size}\)"):
        SpeculativeGenerator(gen.target_model, gen.tokenizer, big)


def test_draft_vocabulary_too_small_for_tokenizer(gen):
    small = make_model("llama", gen.vocab_size - 10, seed=3)
    with pytest.raises(ValueError, match=rf"draft vocabulary \({gen.vocab_size - 10} tokens\) cannot represent "
                                         rf"the tokenizer's {len(gen.tokenizer)} tokens"):
        SpeculativeGenerator(gen.target_model, gen.tokenizer, small)


def test_draft_vocabulary_prefix_of_padded_target(tmp_path, tiny_tokenizer):
    """A target with a padded embedding table and a draft of the tokenizer's size: fine."""
    vocab = len(tiny_tokenizer)
    target = save(make_model("llama", vocab + 60, seed=0), tiny_tokenizer, tmp_path / "t")
    draft = save(make_model("llama", vocab, seed=1, layers=1), tiny_tokenizer, tmp_path / "d")
    g = SpeculativeGenerator.from_pretrained(str(target), str(draft), dtype=torch.float64)
    greedy = g.generate_ids([[4, 5, 6]], max_new_tokens=10, ignore_eos=True)[0].token_ids
    assert greedy == g.generate_ids([[4, 5, 6]], max_new_tokens=10, drafter="none", ignore_eos=True)[0].token_ids
    sampled = g.generate_ids([[4, 5, 6]], max_new_tokens=10, temperature=1.0, seed=0, ignore_eos=True)[0]
    assert len(sampled.token_ids) == 10


def test_mismatched_tokenizers(tmp_path, llama_pair):
    other = build_tokenizer()
    vocab = other.get_vocab()
    # Same size, different ids: swap two tokens.
    swapped = {**vocab}
    a, b = "<s>", "</s>"
    swapped[a], swapped[b] = vocab[b], vocab[a]
    from tokenizers import Tokenizer
    import json

    raw = json.loads(other.backend_tokenizer.to_str())
    raw["added_tokens"] = [dict(t, id=swapped[t["content"]]) for t in raw["added_tokens"]]
    raw["model"]["vocab"] = {t: swapped.get(t, i) for t, i in raw["model"]["vocab"].items()}
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)))
    draft_dir = tmp_path / "draft"
    save(make_model("llama", len(other), seed=5, layers=1), tok, draft_dir)
    with pytest.raises(ValueError, match=r"draft tokenizer \(\d+ tokens\) does not match the target tokenizer "
                                         r"\(\d+ tokens\): 2 tokens differ"):
        SpeculativeGenerator.from_pretrained(str(llama_pair.target), str(draft_dir), dtype=torch.float64)


def test_from_pretrained_argument_errors(llama_pair):
    with pytest.raises(ValueError, match=r"either device= or device_map="):
        SpeculativeGenerator.from_pretrained(str(llama_pair.target), device="cpu", device_map="auto")
    with pytest.raises(ValueError, match=r"unknown dtype 'float13'"):
        SpeculativeGenerator.from_pretrained(str(llama_pair.target), dtype="float13")
    with pytest.raises(TypeError, match=r"target must be a hub id or a local path"):
        SpeculativeGenerator.from_pretrained(42)


def test_constructor_type_errors():
    with pytest.raises(TypeError, match=r"target_model must be a transformers causal LM"):
        SpeculativeGenerator("not a model")
