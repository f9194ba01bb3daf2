"""What a poisoned draft store can cost: a bounded amount of work per decoding step.

Anyone who can write to the Redis can replace every draft entry with a well-formed
value (the codec is public, the CRC computable) of any length and any tokens. It never
changes an answer (the target verifies every draft); here we check that it cannot make
a step read or decode more than the bound in specdec.cache.draft_store's docstring:
per lookup, at most rows x contexts values decoded of at most 16 + 4 * continuation
bytes each, at most `continuation` tokens per row, and no value in the reply longer
than max(16 + 4 * continuation, 1 KiB). Work is counted in bytes and tokens, not time.
"""

from __future__ import annotations

import random

import pytest
import redis
import torch

import specdec.cache.draft_store as draft_store_module
from specdec import SpeculativeGenerator
from specdec.cache.codec import HEADER, KIND_DRAFT, encode_value
from specdec.caching import CacheLayer

PROMPTS = ["def add(a, b):", "class Point:"]
GREEDY = dict(max_new_tokens=24, ignore_eos=True)
CACHED = dict(GREEDY, drafter="cache", num_draft_tokens=4)
EPOCH_FLOOR = 1024  # the MGET carries the epoch token too: values up to this size are read


@pytest.fixture(scope="module")
def gen(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)


class Meter:
    """Counts, per draft lookup, what it read from the backend and what it decoded."""

    def __init__(self, layer, monkeypatch) -> None:
        self.lookups: list[dict] = []  # one per lookup_many call
        self.mgets: list[tuple[int, int, int]] = []  # (keys, bytes returned, longest value)
        self._current: dict | None = None
        ds = layer.draft_store
        real_lookup, real_decode, backend = ds.lookup_many, draft_store_module.decode_value, layer.store.backend
        meter = self

        def lookup_many(sequences):
            meter._current = {"rows": len(sequences), "bytes": 0, "tokens": 0}
            found = real_lookup(sequences)
            meter._current["returned"] = max((len(t) for t in found), default=0)
            meter.lookups.append(meter._current)
            meter._current = None
            return found

        def decode_value(data, key, **kwargs):
            value = real_decode(data, key, **kwargs)  # a value that does not decode raises here
            if meter._current is not None:
                meter._current["bytes"] += len(data)
                meter._current["tokens"] += len(value.tokens)
            return value

        class MeteredBackend:
            def __getattr__(self, name):
                return getattr(backend, name)

            def mget(self, keys):
                values = backend.mget(keys)
                sizes = [len(v) for v in values if v is not None]
                meter.mgets.append((len(keys), sum(sizes), max(sizes, default=0)))
                return values

        monkeypatch.setattr(ds, "lookup_many", lookup_many)
        monkeypatch.setattr(draft_store_module, "decode_value", decode_value)
        monkeypatch.setattr(layer.store, "backend", MeteredBackend())


def poison(url: str, namespace: str, vocab: int, make_tokens) -> int:
    """Overwrite every draft entry of the namespace with a well-formed value of make_tokens(i)."""
    client = redis.Redis.from_url(url.split("?")[0])
    n = 0
    for i, key in enumerate(sorted(client.scan_iter(match=f"specdec:{namespace}:draft:*"))):
        key = key.decode()
        client.set(key, encode_value(KIND_DRAFT, make_tokens(i), key, max_bytes=1 << 30))
        n += 1
    client.close()
    return n


def _fill(gen, url):
    """A layer whose draft store indexes the outputs of PROMPTS (a drafter that reads it hits)."""
    layer = CacheLayer.open(url, gen, response_cache=False)
    gen.generate(PROMPTS, cache=layer, **CACHED)
    assert layer.flush(10)
    return layer


def _check_bounds(meter: Meter, continuation: int, contexts: int) -> None:
    value_cap = HEADER.size + 4 * continuation
    assert meter.lookups, "the drafter never asked the store"
    for lookup in meter.lookups:
        # rows x contexts values at most, each at most a draft's size: O(rows x contexts x L)
        assert lookup["bytes"] <= lookup["rows"] * contexts * value_cap, lookup
        assert lookup["tokens"] <= lookup["rows"] * contexts * continuation, lookup
        assert lookup["returned"] <= continuation, lookup
    for keys, total, longest in meter.mgets:
        assert longest <= max(value_cap, EPOCH_FLOOR), (keys, total, longest)
        assert total <= keys * max(value_cap, EPOCH_FLOOR), (keys, total, longest)


@pytest.fixture
def url(redis_server, cache_namespace):
    # Not a deadline test: room for a stalled machine.
    return redis_server.url + f"?namespace={cache_namespace}&deadline_ms=10000"


def test_long_poisoned_drafts_are_never_decoded_in_full(gen, url, cache_namespace, monkeypatch):
    base = [r.token_ids for r in gen.generate(PROMPTS, cache=None, drafter="none", **GREEDY)]
    layer = _fill(gen, url)
    try:
        ds = layer.draft_store
        vocab = layer.vocab_size
        rng = random.Random(0)
        # Values that fit the read floor but hold 240 tokens (a draft holds 32): well-formed,
        # wrong; every other one a draft-sized value of wrong and out-of-vocabulary ids.
        def tokens(i):
            if i % 2:
                return [rng.randrange(vocab) for _ in range(240)]
            return [rng.choice([rng.randrange(vocab), vocab + 7, -1]) for _ in range(ds.continuation)]

        assert poison(url, cache_namespace, vocab, tokens) > 10
        meter = Meter(layer, monkeypatch)
        got = gen.generate(PROMPTS, cache=layer, **CACHED)
        assert [r.token_ids for r in got] == base
        _check_bounds(meter, ds.continuation, len(ds.contexts))
        assert sum(lookup["tokens"] for lookup in meter.lookups) > 0  # the draft-sized ones were read
        # The store's own counters agree with what was measured from outside.
        assert ds.decoded_bytes >= sum(lookup["bytes"] for lookup in meter.lookups) > 0
    finally:
        layer.close()


def test_megabyte_poisoned_drafts_are_refused_unread(gen, url, cache_namespace, monkeypatch):
    base = [r.token_ids for r in gen.generate(PROMPTS, cache=None, drafter="none", **GREEDY)]
    layer = _fill(gen, url)
    try:
        ds = layer.draft_store
        vocab = layer.vocab_size
        huge = (1 << 20) // 4 - 4  # a value just under the 1 MiB max_value_bytes
        assert poison(url, cache_namespace, vocab, lambda i: [(i + t) % vocab for t in range(huge)]) > 10
        meter = Meter(layer, monkeypatch)
        got = gen.generate(PROMPTS, cache=layer, **CACHED)
        assert [r.token_ids for r in got] == base
        _check_bounds(meter, ds.continuation, len(ds.contexts))
        counts = layer.counts()
        assert counts["bad_replies"] >= 1 and counts.get("deadline_misses", 0) == 0, counts
    finally:
        layer.close()
