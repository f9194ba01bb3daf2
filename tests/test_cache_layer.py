"""The cache through the generator: response hits, key parts, normalisation, drafts from the store.

Every test runs on the in-process backend and on a real redis-server.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.caching import CacheLayer

PROMPT = "def add(a, b):"
NEW = 24
SECRET = "test-secret-0123456789abcdef"  # trusted mode in these tests
GREEDY = dict(max_new_tokens=NEW, ignore_eos=True, drafter="none")


@pytest.fixture(params=["memory", "redis"])
def cache_url(request, cache_namespace):
    """A fresh cache (own memory store / own Redis namespace) on each backend."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}?namespace={cache_namespace}"
    # Not a deadline test (those are in test_cache_failures): room for a stalled machine.
    return request.getfixturevalue("redis_server").url + f"?namespace={cache_namespace}&deadline_ms=10000"


def load(path, draft=None, cache=None) -> SpeculativeGenerator:
    return SpeculativeGenerator.from_pretrained(
        str(path), str(draft) if draft else None, dtype=torch.float64, cache=cache
    )


@pytest.fixture(scope="module")
def gen(cache_models):
    return load(cache_models.target)


@pytest.fixture(scope="module")
def gen_other(cache_models):
    return load(cache_models.other)


@pytest.fixture(scope="module")
def gen_draft(cache_models):
    return load(cache_models.target, cache_models.draft)


@pytest.fixture
def layer(cache_url, gen):
    layer = CacheLayer.open(cache_url, gen)
    yield layer
    layer.close()


def one(gen, prompt=PROMPT, **kwargs):
    return gen.generate(prompt, **kwargs)[0]


def test_repeated_greedy_request_is_served_from_cache(gen, layer):
    base = one(gen, cache=None, **GREEDY)
    first = one(gen, cache=layer, **GREEDY)
    assert not first.stats.cache_hit and first.token_ids == base.token_ids
    assert first.stats.target_forwards == NEW
    layer.flush()
    again = one(gen, cache=layer, **GREEDY)
    assert again.stats.cache_hit and again.stats.cache_kind == "verified"
    assert again.stats.target_forwards == 1  # the one forward that checks the cached response
    assert again.stats.cache_verified_tokens == NEW
    assert again.token_ids == base.token_ids and again.text == base.text
    assert again.finish_reason == base.finish_reason
    # Greedy output does not depend on the drafter, so other drafters hit too.
    via_ngram = one(gen, cache=layer, **{**GREEDY, "drafter": "ngram", "num_draft_tokens": 3})
    assert via_ngram.stats.cache_hit and via_ngram.token_ids == base.token_ids
    assert layer.counts()["hits"] == 2


def test_hit_straight_after_the_miss_without_waiting_for_the_writer(gen, layer):
    one(gen, cache=layer, **GREEDY)
    assert one(gen, cache=layer, **GREEDY).stats.cache_hit  # no flush(): the pending write answers


CHANGES = {
    "sampling params": dict(temperature=0.7, seed=1),
    "max_new_tokens": dict(max_new_tokens=NEW - 1),
    "stop tokens": dict(stop_token_ids=[5]),
    "ignore_eos": dict(ignore_eos=False),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_generation_parameter_misses(gen, layer, change):
    one(gen, cache=layer, **GREEDY)
    layer.flush()
    kwargs = {**GREEDY, **CHANGES[change]}
    got = one(gen, cache=layer, **kwargs)
    assert not got.stats.cache_hit
    assert got.token_ids == one(gen, cache=None, **kwargs).token_ids


@pytest.fixture
def trusted(cache_url, gen):
    layer = CacheLayer.open(cache_url, gen, secret=SECRET)
    yield layer
    layer.close()


def test_trusted_greedy_hit_needs_no_forward(gen, trusted):
    base = one(gen, cache=trusted, **GREEDY)
    trusted.flush()
    again = one(gen, cache=trusted, **GREEDY)
    assert again.stats.cache_hit and again.stats.cache_kind == "trusted" and again.stats.target_forwards == 0
    assert again.token_ids == base.token_ids and again.finish_reason == base.finish_reason
    # Served again, its text comes from the generator's memo of served texts: still the
    # decoded text of exactly these tokens.
    third = one(gen, cache=trusted, **GREEDY)
    assert third.stats.cache_kind == "trusted" and (len(gen.tokenizer), tuple(third.token_ids)) in gen._text_memo
    assert third.text == again.text == base.text == gen.tokenizer.decode(base.token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_served_only_in_trusted_mode(gen, layer):
    sampled = dict(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, seed=11, drafter="ngram", num_draft_tokens=3)
    one(gen, cache=layer, **sampled)
    layer.flush()
    again = one(gen, cache=layer, **sampled)
    assert not again.stats.cache_hit and again.stats.cache_kind is None  # one forward cannot verify a sample
    assert layer.counts().get("stores", 0) == 0  # nothing is written that nothing could use


def test_seed_is_a_key_part_for_sampling(gen, trusted):
    layer = trusted
    sampled = dict(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, drafter="ngram", num_draft_tokens=3)
    a = one(gen, cache=layer, seed=11, **sampled)
    layer.flush()
    again = one(gen, cache=layer, seed=11, **sampled)
    assert again.stats.cache_hit and again.stats.cache_kind == "trusted" and again.token_ids == a.token_ids
    other_seed = one(gen, cache=layer, seed=12, **sampled)
    assert not other_seed.stats.cache_hit
    assert other_seed.token_ids == one(gen, cache=None, seed=12, **sampled).token_ids
    # Under sampling the drafter and K decide which tokens a seed gives: they are key parts.
    for change in (dict(drafter="none"), dict(num_draft_tokens=2), dict(top_k=5), dict(top_p=0.9)):
        assert not one(gen, cache=layer, seed=11, **{**sampled, **change}).stats.cache_hit, change


def test_other_model_misses(gen, gen_other, cache_url):
    with CacheLayer.open(cache_url, gen) as a, CacheLayer.open(cache_url, gen_other) as b:
        assert a.model_id != b.model_id
        assert a.draft_store.vocab == b.draft_store.vocab  # same vocabulary: drafts are shared
        one(gen, cache=a, **GREEDY)
        a.flush()
        got = one(gen_other, cache=b, **GREEDY)
        assert not got.stats.cache_hit
        assert got.token_ids == one(gen_other, cache=None, **GREEDY).token_ids


def test_other_namespace_misses(gen, cache_url):
    with CacheLayer.open(cache_url, gen) as a, CacheLayer.open(cache_url, gen, namespace="elsewhere" + uuid.uuid4().hex[:6]) as b:
        one(gen, cache=a, **GREEDY)
        a.flush()
        assert not one(gen, cache=b, **GREEDY).stats.cache_hit
        assert one(gen, cache=a, **GREEDY).stats.cache_hit


@pytest.mark.parametrize("mode", ["verified", "trusted"])
def test_prompts_that_normalise_equal_are_drafts_never_answers(gen, cache_url, mode):
    # A whitespace or NFKC variant is a different token sequence: its answer may differ.
    # The normalised entry is only ever a draft, checked by the target, in both modes.
    with CacheLayer.open(cache_url, gen, **({"secret": SECRET} if mode == "trusted" else {})) as layer:
        one(gen, cache=layer, **GREEDY)
        layer.flush()
        for variant in ("  def add(a,   b):\n", "def\tadd(a, b):", "ｄｅｆ add(a, b):"):  # whitespace, tab, fullwidth
            got = one(gen, cache=layer, prompt=variant, **GREEDY)
            assert got.stats.cache_kind in ("verified", "partial", "rejected"), variant
            assert got.stats.target_forwards >= 1, variant
            assert got.token_ids == one(gen, cache=None, prompt=variant, **GREEDY).token_ids, variant
        for variant in ("DEF ADD(a, b):", "def add(a, c):"):  # case and content matter by default
            assert one(gen, cache=layer, prompt=variant, **GREEDY).stats.cache_kind is None, variant


def test_case_folding_option(gen, cache_url):
    with CacheLayer.open(cache_url, gen, casefold=True) as folded:
        base = one(gen, cache=folded, **GREEDY)
        folded.flush()
        got = one(gen, cache=folded, prompt="DEF ADD(A, B):", **GREEDY)
        assert got.stats.cache_kind is not None  # found through the folded key, as a draft
        assert got.token_ids == one(gen, cache=None, prompt="DEF ADD(A, B):", **GREEDY).token_ids
        assert base.token_ids == one(gen, cache=None, **GREEDY).token_ids
    # A layer without folding does not share entries with one that folds (options are key parts).
    with CacheLayer.open(cache_url, gen) as plain:
        assert plain.responses.key(plain.request_for([1], "x", one_params()), ["e", "m"]) != folded.responses.key(
            folded.request_for([1], "x", one_params()), ["e", "m"]
        )
        assert not one(gen, cache=plain, **GREEDY).stats.cache_hit


def test_chat_prompts_normalise_through_the_template(gen, layer):
    chat = [{"role": "user", "content": "Add  two numbers "}]
    base = one(gen, prompt=chat, cache=layer, **GREEDY)
    layer.flush()
    prompt = [{"role": "user", "content": "Add two numbers"}]
    same = one(gen, prompt=prompt, cache=layer, **GREEDY)
    assert same.stats.cache_kind is not None
    assert same.token_ids == one(gen, prompt=prompt, cache=None, **GREEDY).token_ids
    assert base.token_ids == one(gen, prompt=chat, cache=None, **GREEDY).token_ids
    other = one(gen, prompt=[{"role": "system", "content": "Add two numbers"}], cache=layer, **GREEDY)
    assert other.stats.cache_kind is None


def test_token_id_requests_key_on_ids(gen, layer):
    ids = gen.tokenizer(PROMPT)["input_ids"]
    base = gen.generate_ids(ids, cache=layer, **GREEDY)[0]
    layer.flush()
    hit = gen.generate_ids(ids, cache=layer, **GREEDY)[0]
    assert hit.stats.cache_hit and hit.token_ids == base.token_ids
    assert not gen.generate_ids(ids[:-1], cache=layer, **GREEDY)[0].stats.cache_hit


def test_batch_mixes_hits_and_misses(gen, layer):
    prompts = [PROMPT, "for i in range(10):", "class Point:"]
    expected = [one(gen, p, cache=None, **GREEDY).token_ids for p in prompts]
    one(gen, prompts[1], cache=layer, **GREEDY)
    layer.flush()
    results = gen.generate(prompts, cache=layer, **GREEDY)
    assert [r.token_ids for r in results] == expected
    assert [r.stats.cache_hit for r in results] == [False, True, False]


def test_unseeded_sampling_is_not_served_but_drafts_from_the_store(gen, layer):
    sampled = dict(max_new_tokens=NEW, ignore_eos=True, temperature=0.2, drafter="cache", num_draft_tokens=4)
    stores_before = layer.counts().get("stores", 0)
    one(gen, cache=layer, **sampled)
    layer.flush()
    assert layer.counts().get("stores", 0) == stores_before  # nothing went to the response cache
    drafted = accepted = 0
    for _ in range(3):
        got = one(gen, cache=layer, **sampled)
        assert not got.stats.cache_hit and got.stats.target_forwards > 0
        drafted += got.stats.drafted_tokens
        accepted += got.stats.accepted_tokens
        layer.flush()
    assert drafted > 0 and accepted > 0  # the earlier outputs came back as drafts and were accepted


def test_seeded_sampling_with_cache_drafter_is_not_served(gen, trusted):
    # Its tokens depend on what the draft store held at the time, not only on the key.
    layer = trusted
    kwargs = dict(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, seed=3, drafter="cache")
    one(gen, cache=layer, **kwargs)
    layer.flush()
    assert not one(gen, cache=layer, **kwargs).stats.cache_hit


def test_greedy_through_the_cache_drafter(gen, cache_url):
    with CacheLayer.open(cache_url, gen, response_cache=False) as layer:
        kwargs = dict(max_new_tokens=40, ignore_eos=True, drafter="cache", num_draft_tokens=8)
        base = one(gen, cache=None, max_new_tokens=40, ignore_eos=True, drafter="none")
        cold = one(gen, cache=layer, **kwargs)
        assert cold.token_ids == base.token_ids and cold.stats.accepted_tokens == 0
        layer.flush()
        lookups = layer.draft_store.lookups
        warm = one(gen, cache=layer, **kwargs)
        assert not warm.stats.cache_hit and warm.token_ids == base.token_ids
        assert warm.stats.acceptance_rate == 1.0
        assert warm.stats.target_forwards == -(-40 // 9)  # 8 drafts + 1 bonus token per forward
        # Continuations are fetched once and reused: one lookup per 32 stored tokens, not per step.
        assert layer.draft_store.lookups - lookups <= 2


def _poison(layer, sequence, rng):
    """Overwrite every context of `sequence` the drafter could look up with garbage."""
    vocab = layer.vocab_size
    ds = layer.draft_store
    for i in range(1, len(sequence) + 1):
        for n in ds.contexts:
            if n <= i:
                junk = [rng.randrange(vocab) for _ in range(8)] + [vocab + 5, -3]
                ds.put(sequence[i - n : i], junk)


def test_poisoned_draft_store_does_not_change_greedy_output(gen, cache_url):
    import random

    with CacheLayer.open(cache_url, gen, response_cache=False) as layer:
        kwargs = dict(max_new_tokens=NEW, ignore_eos=True, drafter="cache", num_draft_tokens=4)
        base = one(gen, cache=None, **GREEDY)
        prompt_ids = gen.tokenizer(PROMPT)["input_ids"]
        _poison(layer, prompt_ids + base.token_ids, random.Random(0))
        got = one(gen, cache=layer, **kwargs)
        assert got.token_ids == base.token_ids
        assert got.stats.drafted_tokens > 0 and got.stats.acceptance_rate < 0.5
        batch = gen.generate([PROMPT, "class Point:"], cache=layer, **kwargs)
        assert batch[0].token_ids == base.token_ids
        assert batch[1].token_ids == one(gen, "class Point:", cache=None, **GREEDY).token_ids


def test_poisoned_response_is_not_served(gen, layer):
    one(gen, cache=layer, **GREEDY)
    layer.flush()
    key_request = layer.request_for(gen.tokenizer(PROMPT)["input_ids"], PROMPT, one_params(**GREEDY))
    epochs = layer.namespace.fetch_epochs(key_request.model_ids)
    key = layer.responses.key(key_request, epochs)
    layer.store.backend.set_many([(key, b"\x80\x04not a value", 60)])  # e.g. a pickle someone wrote
    corrupt = layer.counts().get("corrupt", 0)
    got = one(gen, cache=layer, **GREEDY)
    assert layer.counts()["corrupt"] == corrupt + 1  # the junk was read, refused, never decoded further
    assert got.token_ids == one(gen, cache=None, **GREEDY).token_ids


def one_params(**kwargs):
    from specdec.params import make_params

    return make_params(**kwargs)


def test_seeded_sampling_with_a_draft_model_keys_on_the_draft(gen_draft, cache_url):
    kwargs = dict(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, seed=5, drafter="model")
    with CacheLayer.open(cache_url, gen_draft, secret=SECRET) as layer:
        a = one(gen_draft, cache=layer, **kwargs)
        layer.flush()
        assert one(gen_draft, cache=layer, **kwargs).stats.cache_hit
        # Invalidating the draft model's fingerprint drops entries that depend on it.
        layer.invalidate_model(layer.draft_id)
        again = one(gen_draft, cache=layer, **kwargs)
        assert not again.stats.cache_hit and again.token_ids == a.token_ids


def test_invalidation_through_the_layer(gen, layer):
    one(gen, cache=layer, **GREEDY)
    layer.flush()
    assert layer.invalidate(PROMPT, **GREEDY) is True
    assert not one(gen, cache=layer, **GREEDY).stats.cache_hit
    layer.flush()
    layer.invalidate_model()
    assert not one(gen, cache=layer, **GREEDY).stats.cache_hit
    layer.flush()
    layer.invalidate_namespace()
    assert not one(gen, cache=layer, **GREEDY).stats.cache_hit


def test_stream_serves_hits(gen, layer):
    base = one(gen, cache=layer, **GREEDY)
    layer.flush()
    assert "".join(gen.stream(PROMPT, cache=layer, **GREEDY)) == base.text


def _streamed_result(gen, **kwargs):
    steps = gen.stream(PROMPT, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def test_stream_and_generate_report_a_hit_alike(gen, layer):
    one(gen, cache=layer, **GREEDY)
    layer.flush()
    streamed, generated = _streamed_result(gen, cache=layer, **GREEDY), one(gen, cache=layer, **GREEDY)
    assert streamed.token_ids == generated.token_ids and streamed.finish_reason == generated.finish_reason
    fields = ("prompt_tokens", "new_tokens", "target_forwards", "cache_hit", "cache_kind", "cache_verified_tokens")
    assert {f: getattr(streamed.stats, f) for f in fields} == {f: getattr(generated.stats, f) for f in fields}
    assert streamed.stats.cache_hit


def test_from_pretrained_wires_the_cache(cache_models, cache_url):
    g = load(cache_models.target, cache=cache_url)
    assert isinstance(g.cache_layer, CacheLayer)
    first = one(g, **GREEDY)
    g.cache_layer.flush()
    assert one(g, **GREEDY).stats.cache_hit
    assert not one(g, cache=None, **GREEDY).stats.cache_hit  # cache=None switches it off per call
    assert first.token_ids == one(g, cache=None, **GREEDY).token_ids
    g.cache_layer.close()


def test_open_accepts_layers_and_rebinds_to_other_generators(gen, gen_other, layer):
    assert CacheLayer.open(layer, gen) is layer
    rebound = CacheLayer.open(layer, gen_other)
    assert rebound is not layer and rebound.model_id != layer.model_id and rebound.store is layer.store
    rebound.close()
    with pytest.raises(TypeError, match="cache must be a URL"):
        CacheLayer.open(42, gen)
    with pytest.raises(ValueError, match="unknown cache URL option"):
        CacheLayer.open("memory://?colour=red", gen)


def test_cache_drafter_needs_a_cache(gen, cache_url):
    with pytest.raises(ValueError, match='drafter="cache" needs a cache'):
        gen.generate(PROMPT, drafter="cache", cache=None)
    with CacheLayer.open(cache_url, gen, draft_store=False) as layer:
        with pytest.raises(ValueError, match="draft_store=false"):
            gen.generate(PROMPT, drafter="cache", cache=layer)


def test_unknown_generation_parameters_are_key_parts(gen, layer):
    # A knob added to GenerationParams later must split the cache, not be ignored.
    from dataclasses import dataclass

    from specdec.params import GenerationParams

    @dataclass(frozen=True)
    class Extended(GenerationParams):
        repetition_penalty: float = 1.0

    ids = gen.tokenizer(PROMPT)["input_ids"]
    keys = {
        layer.responses.key(layer.request_for(ids, PROMPT, p), [0, 0])
        for p in (Extended(max_new_tokens=8), Extended(max_new_tokens=8, repetition_penalty=1.2))
    }
    assert len(keys) == 2
    same = {
        layer.responses.key(layer.request_for(ids, PROMPT, p), [0, 0])
        for p in (GenerationParams(max_new_tokens=8, seed=1), GenerationParams(max_new_tokens=8, seed=2, top_k=3))
    }
    assert len(same) == 1  # greedy: seed and top-k do not change the output, so not the key
