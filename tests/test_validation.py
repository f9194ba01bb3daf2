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
    (dict(seed=2**63), ValueError, r"seed must be <= 9223372036854775807, got 9223372036854775808"),
    (dict(seed=[0, 2**64 + 5]), ValueError, r"seed must be <= 9223372036854775807"),
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


# --------------------------------------------------------------------------- transformers habits

HABITS = [
    (dict(max_length=50), TypeError, r"max_length=50 is not a specdec option: .*pass max_new_tokens="),
    (dict(num_beams=4), TypeError, r"num_beams=4 is not a specdec option: beam search is not supported"),
    (dict(stop_strings=["\n"]), TypeError, r"pass stop=\[...\]"),
    (dict(frobnicate=1), TypeError, r"unknown generation option 'frobnicate'; allowed: max_new_tokens, "),
    (dict(do_sample="yes"), TypeError, r"do_sample must be a bool, got str"),
    (dict(do_sample=False, temperature=0.7), ValueError, r"do_sample=False with temperature=0.7 is contradictory"),
    (dict(do_sample=True, temperature=0), ValueError, r"do_sample=True with temperature=0 is contradictory"),
    (dict(eos_token_id="</s>"), TypeError, r"eos_token_id must be an int or a list of ints, got str"),
    (dict(stop_token_ids=5.0), TypeError, r"stop_token_ids must be an int or a list of ints, got float 5.0"),
    (dict(stop_token_ids=[5.0]), ValueError, r"stop_token_ids must be non-negative ints, got \[5.0\]"),
    (dict(stop_token_ids=[100_000]), ValueError,
     r"stop_token_ids \[100000\] are outside the model's vocabulary \[0, \d+\), so they could never stop a row"),
    (dict(stop=""), ValueError, r"stop holds an empty string"),
    (dict(stop=[3]), TypeError, r"stop must hold strings, got int 3; for token ids use stop_token_ids="),
    (dict(stop=5), TypeError, r"stop must be a str or a list of str, got int"),
    (dict(stop=["\ud800"]), ValueError, r"stop string holds a character that is not valid Unicode text"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", HABITS, ids=[str(c[0]) for c in HABITS])
def test_transformers_habits_and_stops_refused_clearly(gen, no_forward, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gen.generate_ids([[5, 6, 7]], **kwargs)
    with pytest.raises(exc, match=pattern):
        gen.generate("def f():", **kwargs)


def test_generation_config_with_unsupported_field(gen, no_forward):
    from transformers import GenerationConfig

    with pytest.raises(ValueError, match=r"generation_config sets num_beams=3: beam search is not supported"):
        gen.generate("def f():", generation_config=GenerationConfig(num_beams=3))
    with pytest.raises(ValueError, match=r"generation_config sets max_length=9: max_length counts the prompt"):
        gen.generate("def f():", generation_config=GenerationConfig(max_length=9))
    with pytest.raises(TypeError, match=r"generation_config must be a transformers GenerationConfig, got dict"):
        gen.generate("def f():", generation_config={"max_new_tokens": 3})


def test_transformers_habits_are_mapped(gen):
    """do_sample / eos_token_id / GenerationConfig give what the specdec names give."""
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=8, ignore_eos=True, seed=3)
    assert (gen.generate("x = ", do_sample=True, **kw)[0].token_ids
            == gen.generate("x = ", temperature=1.0, **kw)[0].token_ids)
    assert (gen.generate("x = ", do_sample=False, max_new_tokens=8, ignore_eos=True)[0].token_ids
            == gen.generate("x = ", max_new_tokens=8, ignore_eos=True)[0].token_ids)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, max_new_tokens=6)
    via_config = gen.generate("x = ", generation_config=config, seed=4, ignore_eos=True)[0]
    direct = gen.generate("x = ", temperature=0.7, top_k=5, max_new_tokens=6, seed=4, ignore_eos=True)[0]
    assert via_config.token_ids == direct.token_ids and len(direct.token_ids) == 6
    # eos_token_id adds stop ids: the row stops at the first occurrence of that token.
    plain = gen.generate("x = ", max_new_tokens=12, ignore_eos=True)[0].token_ids
    stop_at = plain[3]
    stopped = gen.generate("x = ", max_new_tokens=12, ignore_eos=True, eos_token_id=stop_at)[0]
    assert stopped.token_ids == plain[: plain.index(stop_at) + 1] and stopped.finish_reason == "stop"


# --------------------------------------------------------------------------- chat messages and text

CHATS = [
    ([{}], ValueError, r"prompt 0, message 0 has no 'role' and no 'content' \(keys: \[\]\); every chat message"),
    ([{"role": "user"}], ValueError, r"prompt 0, message 0 has no 'content'"),
    ([{"content": "hi"}], ValueError, r"prompt 0, message 0 has no 'role'"),
    ([{"role": "user", "content": 5}], TypeError, r"prompt 0, message 0: content must be a str, got int 5"),
    ([{"role": "user", "content": ["a"]}], TypeError, r"content must be a str, got list"),
    ([{"role": "", "content": "hi"}], ValueError, r"role must be a non-empty str"),
    ([{"role": "user", "content": "hi"}, "oops"], TypeError, r"prompt 0, message 1 is a str; every chat message"),
    ([{"role": "user", "content": "a\udc80b"}], ValueError,
     r"prompt 0, message 0 holds a character that is not valid Unicode text \('\\udc80' at index 1"),
]


@pytest.mark.parametrize("messages,exc,pattern", CHATS, ids=[repr(c[0])[:40] for c in CHATS])
def test_malformed_chat_messages(gen, no_forward, messages, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gen.generate([messages])
    with pytest.raises(exc, match=pattern):
        gen.generate(messages)


def test_lone_surrogate_in_a_prompt(gen, no_forward):
    with pytest.raises(ValueError, match=r"prompt 1 holds a character that is not valid Unicode text "
                                         r"\('\\ud83d' at index 2, a lone surrogate\); fix how the text"):
        gen.generate(["ok", "ab\ud83d"])


def test_stop_strings_need_a_tokenizer(gen):
    bare = SpeculativeGenerator(gen.target_model)
    with pytest.raises(ValueError, match=r"stop strings need a tokenizer"):
        bare.generate_ids([[1, 2]], stop=["\n"])


# --------------------------------------------------------------------------- loading

def test_from_pretrained_none_is_a_type_error():
    with pytest.raises(TypeError, match=r"from_pretrained needs a target model: a hub id, a local path, or "
                                        r"\"bundled\""):
        SpeculativeGenerator.from_pretrained(None)


def test_from_pretrained_takes_path_objects(llama_pair):
    g = SpeculativeGenerator.from_pretrained(llama_pair.target, llama_pair.drafts["partial"], dtype=torch.float64)
    assert g.draft_model is not None and g.target_dtype == torch.float64


@pytest.mark.parametrize("as_path", [True, False])
def test_missing_local_path_says_so(tmp_path, as_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"target .*no-such-model.*: no such local folder"):
        SpeculativeGenerator.from_pretrained(missing if as_path else str(missing))
    with pytest.raises(FileNotFoundError, match=r"no such local folder"):
        SpeculativeGenerator.from_pretrained("./relative/missing")


def test_a_file_instead_of_a_folder(llama_pair):
    with pytest.raises(ValueError, match=r"is a file; pass the folder that holds config.json"):
        SpeculativeGenerator.from_pretrained(llama_pair.target / "config.json")


def test_uncached_hub_id_offline_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(OSError, match=r"target 'specdec-tests/no-such-model' is not in the local Hugging Face "
                                      r"cache and HF_HUB_OFFLINE is set"):
        SpeculativeGenerator.from_pretrained("specdec-tests/no-such-model")
    assert time.perf_counter() - t0 < 15  # retries took about 46 s; a starved CI machine is slow, not that slow


def test_uncached_hub_id_without_a_route_fails_fast(monkeypatch):
    """An endpoint nobody listens on stands for a machine without network: one probe, no retries."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    t0 = time.perf_counter()
    with pytest.raises(OSError, match=r"is not in the local Hugging Face cache and the hub cannot be reached "
                                      r"\(127.0.0.1:9: "):
        SpeculativeGenerator.from_pretrained("specdec-tests/no-such-model")
    assert time.perf_counter() - t0 < 15  # retries took about 46 s; a starved CI machine is slow, not that slow
