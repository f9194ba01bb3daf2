"""Canonical keys: one spelling per value, distinct parts give distinct keys (property tests)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from specdec.cache.keys import (
    canonical_json,
    canonicalize,
    digest,
    key_kind,
    namespace_pattern,
    response_key,
    response_material,
    validate_namespace,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=8), children, max_size=5),
    ),
    max_leaves=20,
)


def _shuffled(obj, rng):
    """The same value with every dict's insertion order shuffled."""
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_shuffled(v, rng) for v in obj]
    return obj


@settings(max_examples=200, deadline=None)
@given(json_values, st.integers(0, 2**32))
def test_dict_order_does_not_change_the_key(value, seed):
    assert digest(_shuffled(value, random.Random(seed))) == digest(value)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_canonical_json_is_a_fixed_point(value):
    import json

    once = canonical_json(value)
    assert canonical_json(json.loads(once)) == once


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_distinct_values_give_distinct_keys(a, b):
    assume(canonicalize(a) != canonicalize(b))
    assert digest(a) != digest(b)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_spelling_does_not_change_the_key(x):
    # The same float written differently (repr, str, exponent form, via numpy) keys the same.
    np = pytest.importorskip("numpy")

    spellings = [x, float(repr(x)), float(f"{x:.17e}"), np.float64(x)]
    keys = {digest({"temperature": s}) for s in spellings}
    assert len(keys) == 1


def test_numbers_canonicalise():
    np = pytest.importorskip("numpy")

    assert digest({"t": -0.0}) == digest({"t": 0.0})
    assert digest({"k": np.int64(5)}) == digest({"k": 5})
    assert digest({"p": (1, 2)}) == digest({"p": [1, 2]})
    assert digest({"s": {3, 1, 2}}) == digest({"s": [1, 2, 3]})
    # ints and floats are different types in the key: 1 is not 1.0
    assert digest({"n": 1}) != digest({"n": 1.0})
    assert digest({"n": True}) != digest({"n": 1})
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="non-finite"):
            digest({"t": bad})
    with pytest.raises(TypeError, match="str keys"):
        digest({1: "a"})
    with pytest.raises(TypeError, match="cannot put"):
        digest({"o": object()})


def _material(**overrides):
    base = dict(
        namespace="ns",
        epoch=0,
        model="m" * 32,
        model_epoch=0,
        tokenizer="t" * 32,
        normalization={"version": 1, "unicode_form": "NFKC", "whitespace": "collapse", "casefold": False},
        prompt_ids=[1, 2, 3],
        sampling={"mode": "greedy", "ignore_eos": False},
        seed=None,
        max_new_tokens=16,
        stop_token_ids=(),
    )
    base.update(overrides)
    return response_material(**base)


@pytest.mark.parametrize(
    "change",
    [
        {"namespace": "other"},
        {"epoch": 1},
        {"model": "n" * 32},
        {"model_epoch": 1},
        {"tokenizer": "u" * 32},
        {"normalization": {"version": 2, "unicode_form": "NFKC", "whitespace": "collapse", "casefold": False}},
        {"normalization": {"version": 1, "unicode_form": "NFKC", "whitespace": "collapse", "casefold": True}},
        {"prompt_ids": [1, 2, 4]},
        {"prompt_ids": [1, 2]},
        {"sampling": {"mode": "greedy", "ignore_eos": True}},
        {"seed": 0},
        {"max_new_tokens": 17},
        {"stop_token_ids": (5,)},
        {"extra_models": {"d" * 32: 0}},
    ],
)
def test_every_key_part_changes_the_key(change):
    assert digest(_material(**change)) != digest(_material())


def test_stop_token_order_and_duplicates_do_not_matter():
    assert digest(_material(stop_token_ids=(7, 3, 7))) == digest(_material(stop_token_ids=[3, 7]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), max_size=30), st.lists(st.integers(0, 2**31 - 1), max_size=30))
def test_distinct_prompts_give_distinct_keys(a, b):
    assume(a != b)
    assert digest(_material(prompt_ids=a)) != digest(_material(prompt_ids=b))


def test_key_layout_and_namespaces():
    key = response_key("prod-1", "ab" * 32)
    assert key == "specdec:prod-1:resp:" + "ab" * 32
    assert key_kind(key) == "resp"
    assert key_kind("other:thing") == ""
    assert namespace_pattern("prod-1") == "specdec:prod-1:*"
    for bad in ("", "a:b", "a*", "a b", "x" * 65, "ns[1]"):
        with pytest.raises(ValueError, match="invalid cache namespace"):
            validate_namespace(bad)


# --------------------------------------------------------------------------- the key memo


def _response_cache(name: str = "keys"):
    from specdec.cache import get_store, parse_cache_url
    from specdec.cache.namespace import Namespace
    from specdec.cache.response_cache import ResponseCache

    store = get_store(parse_cache_url(f"memory://key-memo-{name}"))
    return ResponseCache(store, Namespace(store, "ns"), ttl_s=0, max_value_bytes=1 << 20), store


def _request(**overrides):
    from specdec.cache.response_cache import ResponseRequest

    base = dict(
        model="m" * 32, tokenizer="t" * 32, normalization={"version": 1, "casefold": False},
        prompt_ids=(1, 2, 3), sampling={"mode": "greedy", "ignore_eos": False, "extra": {}},
        seed=None, max_new_tokens=16, stop_token_ids=(2,), prompt_kind="text",
    )
    base.update(overrides)
    return ResponseRequest(**base)


def _direct_key(cache, request, epochs):
    """The key without any memo: the digest of the canonical material."""
    return response_key("ns", digest(request.material("ns", epochs)))


def test_the_key_memo_tells_equal_looking_values_apart_and_follows_the_epochs():
    from specdec.cache import release_store

    cache, store = _response_cache("apart")
    try:
        epochs = ["e0", "m0"]
        # Equal in Python (same hash, ==), spelled apart in the canonical JSON: 1, 1.0, True.
        variants = [
            _request(sampling={"mode": "sample", "temperature": 1, "extra": {}}),
            _request(sampling={"mode": "sample", "temperature": 1.0, "extra": {}}),
            _request(sampling={"mode": "sample", "temperature": True, "extra": {}}),
            _request(max_new_tokens=1), _request(max_new_tokens=True), _request(seed=0), _request(seed=False),
        ]
        for _ in range(2):  # the second pass is answered from the memo
            keys = [cache.key(r, epochs) for r in variants]
            assert keys == [_direct_key(cache, r, epochs) for r in variants]
        assert len(set(keys)) == len(keys)
        assert len(cache._keys) == len(variants)
        # New epochs (an invalidation) give new keys, never the memoised old ones.
        request = variants[0]
        assert cache.key(request, ["e1", "m0"]) == _direct_key(cache, request, ["e1", "m0"]) != keys[0]
        assert cache.key(request, ["e0", "m1"]) != keys[0]
        # A list and a tuple are the same JSON: separate memo entries, the same key.
        assert cache.key(_request(stop_token_ids=[2]), epochs) == cache.key(_request(stop_token_ids=(2,)), epochs)
    finally:
        release_store(store)


def test_the_key_memo_is_bounded_and_long_prompts_bypass_it():
    from specdec.cache import release_store
    from specdec.cache.response_cache import _KEY_MEMO_PROMPT_TOKENS, _KEY_MEMO_SIZE

    cache, store = _response_cache("bounded")
    try:
        for i in range(_KEY_MEMO_SIZE + 50):
            cache.key(_request(prompt_ids=(i,)), ["e", "m"])
        assert len(cache._keys) == _KEY_MEMO_SIZE
        cache._keys.clear()
        long = _request(prompt_ids=tuple(range(_KEY_MEMO_PROMPT_TOKENS + 1)))
        assert cache.key(long, ["e", "m"]) == _direct_key(cache, long, ["e", "m"])
        assert len(cache._keys) == 0
    finally:
        release_store(store)


_memo_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.0, -0.0, 1.0, 0.5]), st.text(max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(
    st.lists(st.integers(0, 5), max_size=4),
    st.dictionaries(st.sampled_from(["temperature", "top_k", "x"]), _memo_values, max_size=3),
    _memo_values,
    st.sampled_from([["e0", "m0"], ["e1", "m0"]]),
    st.booleans(),
), min_size=1, max_size=12))
def test_a_memoised_key_always_equals_the_digest_of_its_material(asks):
    """Whatever was asked before, in any order, the memo answers what the material hashes to."""
    from specdec.cache import release_store

    cache, store = _response_cache("property")
    try:
        for ids, sampling, seed, epochs, as_list in asks:
            request = _request(prompt_ids=list(ids) if as_list else tuple(ids), sampling=sampling, seed=seed)
            assert cache.key(request, epochs) == _direct_key(cache, request, epochs)
    finally:
        release_store(store)
