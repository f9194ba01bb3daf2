"""Chat prompts in the response cache: the near key normalises each message, then applies the template.

With a template that closes a message right after its content (SmolLM2's ChatML,
`...2022.<|im_end|>`), normalising the rendered text cannot make a chat with trailing or
doubled spaces meet the clean one: `2022.  <|im_end|>` only shrinks to `2022. <|im_end|>`.
Every test runs on the in-process backend and on a real redis-server.
"""

from __future__ import annotations

import uuid

import pytest
import torch
from specdec.cache.normalize import NormalizationOptions, render_prompt

from specdec import SpeculativeGenerator
from specdec.caching import CacheLayer

# SmolLM2-135M-Instruct's chat template, as its tokenizer_config.json ships it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NEW = 16
GREEDY = dict(max_new_tokens=NEW, ignore_eos=True, drafter="none")
SECRET = "test-secret-0123456789abcdef"
CLEAN = [{"role": "user", "content": "What happened in 2022."}]
NOISY = [{"role": "user", "content": "What  happened in 2022.  "}]  # doubled and trailing spaces


@pytest.fixture(scope="module")
def gen(cache_models, tiny_tokenizer):
    g = SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)
    assert g.tokenizer is not tiny_tokenizer  # its own copy: setting the template touches no other test
    g.tokenizer.chat_template = SMOLLM2_TEMPLATE
    return g


@pytest.fixture(params=["memory", "redis"])
def cache_url(request, cache_namespace):
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}?namespace={cache_namespace}"
    return request.getfixturevalue("redis_server").url + f"?namespace={cache_namespace}&deadline_ms=10000"


@pytest.fixture
def layer(cache_url, gen):
    with CacheLayer.open(cache_url, gen) as layer:
        yield layer


def one(gen, prompt, **kwargs):
    return gen.generate(prompt, **kwargs)[0]


def test_rendered_text_normalisation_would_not_meet(gen):
    # The failure this module guards against, in the terms of the template itself.
    clean = gen.tokenizer.apply_chat_template(CLEAN, tokenize=False, add_generation_prompt=True)
    noisy = gen.tokenizer.apply_chat_template(NOISY, tokenize=False, add_generation_prompt=True)
    assert "2022.<|im_end|>" in clean and "2022.  <|im_end|>" in noisy
    assert render_prompt(CLEAN, gen.tokenizer) == render_prompt(NOISY, gen.tokenizer) == clean


@pytest.mark.parametrize("first, second", [(CLEAN, NOISY), (NOISY, CLEAN)], ids=["clean-first", "noisy-first"])
def test_near_duplicate_chat_meets_the_cached_chat(gen, layer, first, second):
    expected = one(gen, second, cache=None, **GREEDY)
    one(gen, first, cache=layer, **GREEDY)
    layer.flush()
    got = one(gen, second, cache=layer, **GREEDY)
    assert got.stats.cache_kind in ("verified", "partial")  # found through the near key
    assert got.stats.cache_verified_tokens > 0
    assert got.stats.target_forwards >= 1  # a near entry is a draft, checked by the target
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert layer.counts()["hits"] == 1


def test_near_duplicate_chat_through_stream(gen, layer):
    expected = one(gen, NOISY, cache=None, **GREEDY)
    one(gen, CLEAN, cache=layer, **GREEDY)
    layer.flush()
    steps = gen.stream(NOISY, cache=layer, **GREEDY)
    text = ""
    while True:
        try:
            text += next(steps)
        except StopIteration as done:
            result = done.value
            break
    assert result.stats.cache_kind in ("verified", "partial")
    assert result.token_ids == expected.token_ids and text == expected.text


def test_near_chat_entry_is_never_served_unchecked(gen, cache_url):
    # Trusted mode serves authenticated entries under the EXACT key only: the exact key
    # stays on the exact ids, so a near-duplicate chat is still checked by a forward.
    with CacheLayer.open(cache_url, gen, secret=SECRET) as layer:
        one(gen, CLEAN, cache=layer, **GREEDY)
        layer.flush()
        got = one(gen, NOISY, cache=layer, **GREEDY)
        assert got.stats.cache_kind in ("verified", "partial") and got.stats.target_forwards >= 1
        assert got.token_ids == one(gen, NOISY, cache=None, **GREEDY).token_ids
        layer.flush()
        again = one(gen, CLEAN, cache=layer, **GREEDY)
        assert again.stats.cache_kind == "trusted"  # the exact entry of the clean chat itself


def test_different_chats_do_not_meet(gen, layer):
    one(gen, CLEAN, cache=layer, **GREEDY)
    layer.flush()
    for other in (
        [{"role": "user", "content": "What happened in 2023."}],  # content matters
        [{"role": "system", "content": "What happened in 2022."}],  # so does the role
        [{"role": "user", "content": "What happened in"}, {"role": "user", "content": "2022."}],  # and the turns
    ):
        assert one(gen, other, cache=layer, **GREEDY).stats.cache_kind is None, other


def test_invalidating_a_chat_removes_its_near_entry(gen, layer):
    one(gen, CLEAN, cache=layer, **GREEDY)
    layer.flush()
    assert layer.invalidate(CLEAN, **GREEDY) is True
    assert one(gen, NOISY, cache=layer, **GREEDY).stats.cache_kind is None


def test_near_key_of_a_chat_is_its_normalised_messages_through_the_template(gen, layer):
    ids = gen.tokenizer(gen.tokenizer.apply_chat_template(NOISY, tokenize=False, add_generation_prompt=True))[
        "input_ids"
    ]
    clean_text = gen.tokenizer.apply_chat_template(CLEAN, tokenize=False, add_generation_prompt=True)
    assert layer.near_ids(ids, NOISY) == tuple(gen.tokenizer(clean_text)["input_ids"])
    assert layer.near_ids(ids, NOISY) == layer.near_ids(ids, NOISY)  # memoised: the same ids again
    # Text prompts keep their rule: the whole text normalised, then encoded.
    text = "What  happened in 2022.  "
    assert layer.near_ids(gen.tokenizer(text)["input_ids"], text) == tuple(gen.tokenizer("What happened in 2022.")["input_ids"])
    lines = NormalizationOptions(whitespace="lines")
    assert render_prompt([{"role": "user", "content": "a  \n  b "}], gen.tokenizer, lines).count("a\nb<|im_end|>") == 1
