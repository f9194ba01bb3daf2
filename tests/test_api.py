"""The public generate / generate_ids / stream API and the stats it reports."""

from __future__ import annotations

import pytest
import torch

from specdec import GenerationResult, SpeculativeGenerator


@pytest.fixture(scope="module")
def gen(llama_pair):
    return SpeculativeGenerator.from_pretrained(str(llama_pair.target), str(llama_pair.drafts["partial"]),
                                                dtype=torch.float64)


def test_generate_text_round_trip(gen):
    results = gen.generate(["def add(a, b):", "for i in"], max_new_tokens=12, ignore_eos=True)
    assert len(results) == 2 and all(isinstance(r, GenerationResult) for r in results)
    for r in results:
        assert r.text == gen.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert len(r.token_ids) == 12 and r.finish_reason == "length"
    single = gen.generate("def add(a, b):", max_new_tokens=12, ignore_eos=True)
    assert single[0].token_ids == results[0].token_ids


def test_generate_matches_generate_ids(gen):
    ids = gen.tokenizer("class Point:")["input_ids"]
    a = gen.generate("class Point:", max_new_tokens=10, ignore_eos=True)[0].token_ids
    b = gen.generate_ids(ids, max_new_tokens=10, ignore_eos=True)[0].token_ids
    c = gen.generate_ids(torch.tensor([ids]), max_new_tokens=10, ignore_eos=True)[0].token_ids
    assert a == b == c


def test_a_repeated_prompt_is_tokenized_once_and_added_tokens_are_seen(llama_pair):
    gen = SpeculativeGenerator.from_pretrained(str(llama_pair.target), dtype=torch.float64)
    calls = []
    tokenizer_call = type(gen.tokenizer).__call__

    class Counting(type(gen.tokenizer)):
        def __call__(self, *args, **kwargs):
            calls.append(args[0])
            return tokenizer_call(self, *args, **kwargs)

    gen.tokenizer.__class__ = Counting
    text = "def add(a, b): return a + b"
    first = gen._encode(text)
    assert gen._encode(text) == first == list(tokenizer_call(gen.tokenizer, text)["input_ids"])
    assert calls == [text]  # the second call came from the memo
    gen.tokenizer.add_tokens(["return a + b"])  # the encoding changes: the memo must not answer
    after = gen._encode(text)
    assert after == list(tokenizer_call(gen.tokenizer, text)["input_ids"]) and after != first
    assert calls == [text, text]


def test_stream_yields_the_same_text(gen):
    full = gen.generate("import os\n", max_new_tokens=20, ignore_eos=True)[0].text
    deltas = list(gen.stream("import os\n", max_new_tokens=20, ignore_eos=True))
    assert "".join(deltas) == full
    assert len(deltas) > 1  # text arrives step by step, not all at the end


def test_stream_sampled_is_seed_reproducible(gen):
    kw = dict(max_new_tokens=15, temperature=0.8, seed=3, ignore_eos=True)
    assert "".join(gen.stream("x = ", **kw)) == gen.generate("x = ", **kw)[0].text


def test_chat_messages_use_the_chat_template(gen):
    messages = [{"role": "user", "content": "add two numbers"}]
    rendered = gen.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    a = gen.generate([messages], max_new_tokens=8, ignore_eos=True)[0].token_ids
    b = gen.generate(rendered, max_new_tokens=8, ignore_eos=True)[0].token_ids
    assert a == b


def test_stats_are_consistent(gen):
    k = 3
    r = gen.generate_ids([[5, 6, 7, 8]], max_new_tokens=20, num_draft_tokens=k, ignore_eos=True)[0]
    s = r.stats
    assert s.new_tokens == len(r.token_ids) == 20
    assert s.prompt_tokens == 4
    assert s.target_forwards >= 20 / (k + 1)
    assert s.mean_accepted_length == pytest.approx(20 / s.target_forwards)
    assert s.accepted_tokens <= s.drafted_tokens
    assert s.acceptance_rate == pytest.approx(s.accepted_tokens / s.drafted_tokens)
    assert len(s.per_position_acceptance) == k
    assert all(0.0 <= a <= 1.0 for a in s.per_position_acceptance)
    # Position i can only be accepted if position i-1 was.
    assert s.accepted_per_position == sorted(s.accepted_per_position, reverse=True)
    assert s.cache_hit is False and s.wall_time_s > 0 and s.tokens_per_second > 0
    d = s.to_dict()
    for key in ("target_forwards", "drafted_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_length",
                "per_position_acceptance", "cache_hit", "wall_time_s", "tokens_per_second"):
        assert key in d


def test_baseline_stats(gen):
    r = gen.generate_ids([[5, 6, 7, 8]], max_new_tokens=9, drafter="none", ignore_eos=True)[0]
    assert r.stats.target_forwards == 9 and r.stats.drafted_tokens == 0 and r.stats.mean_accepted_length == 1.0


def test_num_draft_tokens_zero_is_plain_decoding(gen):
    a = gen.generate_ids([[9, 9, 1]], max_new_tokens=10, num_draft_tokens=0, ignore_eos=True)[0]
    b = gen.generate_ids([[9, 9, 1]], max_new_tokens=10, drafter="none", ignore_eos=True)[0]
    assert a.token_ids == b.token_ids and a.stats.target_forwards == 10


@pytest.mark.parametrize("placement", [dict(device="cpu"), dict(device_map="auto")])
def test_from_pretrained_placement(llama_pair, gen, placement):
    """device= and device_map="auto" (accelerate) load the same models and decode the same."""
    placed = SpeculativeGenerator.from_pretrained(str(llama_pair.target), str(llama_pair.drafts["partial"]),
                                                  dtype="float64", **placement)
    assert placed.device.type == "cpu" and placed.target_dtype == torch.float64
    kw = dict(max_new_tokens=10, ignore_eos=True)
    assert placed.generate("x = 1", **kw)[0].token_ids == gen.generate("x = 1", **kw)[0].token_ids


# --------------------------------------------------------------------------- stop strings


def _stop_string_of(gen, prompt: str, n: int = 10) -> tuple[list[int], str, str]:
    """The plain continuation of `prompt` and a stop string that first appears in its middle."""
    full = gen.generate(prompt, max_new_tokens=n, ignore_eos=True, drafter="none")[0]
    text = full.text
    for start in range(len(text) // 3, len(text) - 2):
        stop = text[start:start + 2]
        if text.find(stop) == start and stop.strip():
            return full.token_ids, text, stop
    pytest.skip("no usable stop string in this continuation")


@pytest.mark.parametrize("drafter", ["none", "model", "ngram"])
def test_stop_string_cuts_text_and_tokens(gen, drafter):
    tokens, text, stop = _stop_string_of(gen, "def add(a, b):", 24)
    r = gen.generate("def add(a, b):", max_new_tokens=24, ignore_eos=True, drafter=drafter, stop=[stop])[0]
    at = text.find(stop)
    assert r.text == text[:at] and r.finish_reason == "stop"
    # token_ids end with the first token whose text completes the stop string.
    n = next(i for i in range(1, len(tokens) + 1) if stop in gen.tokenizer.decode(tokens[:i], skip_special_tokens=True))
    assert r.token_ids == tokens[:n]
    assert r.stats.new_tokens == n
    # The loop stopped early instead of decoding all 24 tokens.
    assert r.stats.target_forwards < 24 if drafter == "none" else True
    # Several stop strings: the earliest match wins, wherever it is in the list.
    later = text[at + 3: at + 5] if text[at + 3: at + 5].strip() else "\x00never"
    both = gen.generate("def add(a, b):", max_new_tokens=24, ignore_eos=True, drafter=drafter, stop=[later, stop])[0]
    assert both.text == r.text and both.token_ids == r.token_ids


def test_stop_string_never_met_changes_nothing(gen):
    kw = dict(max_new_tokens=12, ignore_eos=True)
    a = gen.generate("for i in", **kw)[0]
    b = gen.generate("for i in", stop=["\x00not-there"], **kw)[0]
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)


def test_stop_string_in_stream_and_generate_ids(gen):
    tokens, text, stop = _stop_string_of(gen, "import os\n", 24)
    expected = gen.generate("import os\n", max_new_tokens=24, ignore_eos=True, stop=stop)[0]
    deltas = list(gen.stream("import os\n", max_new_tokens=24, ignore_eos=True, stop=stop))
    assert "".join(deltas) == expected.text and stop not in "".join(deltas)
    ids = gen.tokenizer("import os\n")["input_ids"]
    by_ids = gen.generate_ids(ids, max_new_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert by_ids.token_ids == expected.token_ids and by_ids.text == expected.text


def test_stop_string_sampled_matches_the_uncut_row(gen):
    """Cutting is exact: a sampled row stopped early equals the same seeded row decoded in full, then cut."""
    kw = dict(max_new_tokens=30, ignore_eos=True, temperature=0.9, seed=11)
    full = gen.generate("x = ", **kw)[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 1]
    if not stop.strip():
        pytest.skip("the middle character is blank")
    r = gen.generate("x = ", stop=[stop], **kw)[0]
    assert r.text == full.text[: full.text.find(stop)]
    assert full.token_ids[: len(r.token_ids)] == r.token_ids
