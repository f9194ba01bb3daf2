"""One contract, every backend: memory://, redis:// (TCP), rediss:// (TLS), unix://, Redis Cluster.

The same tests run against each backend through the public classes: raw storage
operations, the response cache, the draft store and invalidation.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from specdec.cache import (
    DraftStore,
    Namespace,
    NormalizationOptions,
    ResponseCache,
    ResponseRequest,
    get_store,
    parse_cache_url,
    release_store,
)
from specdec.cache.codec import KIND_DRAFT, encode_value

BACKENDS = ["memory", "redis", "rediss", "redis-unix", "redis-cluster"]


@pytest.fixture(params=BACKENDS)
def backend_url(request, cache_namespace):
    """A cache URL on one backend, with a namespace of its own."""
    kind = request.param
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}?namespace={cache_namespace}"
    if kind == "redis":
        return request.getfixturevalue("redis_server").url + f"?namespace={cache_namespace}"
    if kind == "rediss":
        return request.getfixturevalue("redis_tls").tls_url + f"&namespace={cache_namespace}"
    if kind == "redis-unix":
        return request.getfixturevalue("redis_server").unix_url + f"?namespace={cache_namespace}"
    return request.getfixturevalue("redis_cluster").cluster_url + f"?namespace={cache_namespace}"


@pytest.fixture
def store(backend_url):
    # Not a deadline test: a shared machine that stalls for seconds must not drop the writes
    # these contract tests read back (a call past its deadline fails open, by design).
    config = parse_cache_url(backend_url, deadline_ms=10000)
    s = get_store(config)
    yield s
    release_store(s)


@pytest.fixture
def ns(store):
    return Namespace(store, store.config.namespace)


def request_for(prompt=(1, 2, 3), **overrides) -> ResponseRequest:
    fields = dict(
        model="m" * 32,
        tokenizer="t" * 32,
        normalization=NormalizationOptions().spec(),
        prompt_ids=tuple(prompt),
        sampling={"mode": "greedy", "ignore_eos": False},
        seed=None,
        max_new_tokens=8,
    )
    fields.update(overrides)
    return ResponseRequest(**fields)


# ---------------------------------------------------------------- raw operations


def test_storage_operations(store, ns):
    b = store.backend
    p = f"specdec:{ns.name}:"
    b.set_many([(p + "a", b"1", None), (p + "b", b"\x00\xff", 60)])
    assert b.get(p + "a") == b"1"
    assert b.mget([p + "a", p + "b", p + "missing"]) == [b"1", b"\x00\xff", None]
    assert b.ttl(p + "a") is None and 0 < b.ttl(p + "b") <= 60
    assert b.incr(p + "n") == 1 and b.incr(p + "n") == 2
    b.hincrby_many(p + "h", {"x": 2, "y": 1})
    b.hincrby_many(p + "h", {"x": 3})
    assert {k: int(v) for k, v in b.hgetall(p + "h").items()} == {"x": 5, "y": 1}
    assert sorted(b.scan(p + "*")) == sorted(p + k for k in ("a", "b", "n", "h"))
    assert b.delete([p + "a", p + "zzz"]) == 1
    assert b.get(p + "a") is None
    assert b.ping()


def test_entries_expire(store, ns):
    # One write, two entries: the long-lived one shows the write landed; the short one must be
    # gone after its TTL. (Reading the short one back first would race its 50 ms on a busy machine.)
    short, long = f"specdec:{ns.name}:short", f"specdec:{ns.name}:long"
    store.backend.set_many([(short, b"x", 0.05), (long, b"y", 60)])
    time.sleep(0.2)
    assert store.backend.get(long) == b"y"
    assert store.backend.get(short) is None


# ---------------------------------------------------------------- response cache


def test_response_roundtrip_and_key_separation(store, ns):
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=1 << 20)
    req = request_for()
    assert rc.lookup(req) is None
    assert rc.put(req, [7, 8, 9], "length")
    assert rc.lookup(req).tokens == [7, 8, 9]  # served from the pending write, before the writer ran
    assert store.flush(5)
    hit = rc.lookup(req)
    assert (hit.tokens, hit.tail) == ([7, 8, 9], "length")
    for other in (
        request_for(prompt=(1, 2, 4)),
        request_for(max_new_tokens=9),
        request_for(model="n" * 32),
        request_for(sampling={"mode": "sample", "temperature": 0.5}, seed=1),
    ):
        assert rc.lookup(other) is None
    # The value is stored compactly under specdec:{ns}:resp:{sha256}.
    keys = [k for k in store.backend.scan(f"specdec:{ns.name}:resp:*")]
    assert len(keys) == 1 and len(keys[0].rsplit(":", 1)[1]) == 64
    assert len(store.backend.get(keys[0])) == 16 + 3 * 4 + len("length")


def test_write_completing_between_the_server_read_and_the_pending_read_is_not_missed(store, ns):
    """A write queued before a lookup must be found, even when the writer finishes it while
    the lookup is between its server read and its pending-map read (forced here: the
    writer is held until the server read has returned a miss, then drained)."""
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=1 << 20)
    req = request_for(prompt=(4, 5, 6))
    assert rc.lookup(req) is None  # learns the epochs, so put() can key the pending write
    gate = threading.Event()
    assert store.submit(lambda: gate.wait(5))  # the writer is busy until the gate opens
    assert rc.put(req, [1, 2], "stop")
    read = ns.read

    def read_then_let_the_writer_finish(*args, **kwargs):
        result = read(*args, **kwargs)
        assert result is not None and result[1] == [None]  # the server has no value yet
        gate.set()
        assert store.flush(5)  # the write lands and leaves the pending map
        return result

    ns.read = read_then_let_the_writer_finish
    try:
        hit = rc.lookup(req)
    finally:
        ns.read = read
        gate.set()
    assert hit is not None and (hit.tokens, hit.tail) == ([1, 2], "stop")


def test_no_read_across_namespaces(store, ns, backend_url):
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=1 << 20)
    rc.put(request_for(), [1], "stop")
    store.flush(5)
    other = Namespace(store, ns.name + "-b")
    assert ResponseCache(store, other, ttl_s=60, max_value_bytes=1 << 20).lookup(request_for()) is None
    # Even a value copied verbatim into the other namespace's key does not decode there.
    src = next(iter(store.backend.scan(f"specdec:{ns.name}:resp:*")))
    dst = ResponseCache(store, other, ttl_s=60, max_value_bytes=1 << 20).key(request_for(), other.fetch_epochs(["m" * 32]))
    store.backend.set_many([(dst, store.backend.get(src), 60)])
    before = store.counts().get("corrupt", 0)
    assert ResponseCache(store, other, ttl_s=60, max_value_bytes=1 << 20).lookup(request_for()) is None
    assert store.counts()["corrupt"] == before + 1


def test_ttl_is_applied(store, ns):
    rc = ResponseCache(store, ns, ttl_s=30, max_value_bytes=1 << 20)
    rc.put(request_for(), [1], "stop")
    store.flush(5)
    key = next(iter(store.backend.scan(f"specdec:{ns.name}:resp:*")))
    assert 25 < store.backend.ttl(key) <= 30


def test_size_cap(store, ns):
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=64)
    assert not rc.put(request_for(), list(range(100)), "length")
    assert store.counts()["oversize"] >= 1
    store.flush(5)
    assert rc.lookup(request_for()) is None


# ---------------------------------------------------------------- invalidation


def test_invalidation(store, ns):
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=1 << 20)
    a, b = request_for(prompt=(1,)), request_for(prompt=(2,), model="n" * 32)
    for req in (a, b):
        rc.lookup(req)  # learn the epochs
        rc.put(req, [5], "stop")
    store.flush(5)
    assert rc.lookup(a) and rc.lookup(b)

    # by model fingerprint: only that model's entries go
    ns.bump_model("m" * 32)
    assert rc.lookup(a) is None and rc.lookup(b) is not None

    # one key
    assert rc.invalidate(b) is True
    assert rc.lookup(b) is None and rc.invalidate(b) is False

    # the whole namespace, O(1): an epoch bump seen by a reader that cached the old epoch
    rc.put(a, [6], "stop")
    store.flush(5)
    assert rc.lookup(a).tokens == [6]
    other_reader = ResponseCache(store, Namespace(store, ns.name), ttl_s=60, max_value_bytes=1 << 20)
    before = ns.fetch_epochs()
    assert ns.bump() != before[0]
    assert other_reader.lookup(a) is None


def test_losing_the_epoch_key_never_revives_old_entries(store, ns):
    # Invalidate, then lose the epoch key (deleted by hand, or evicted): old entries stay dead.
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=1 << 20)
    a = request_for(prompt=(1,))
    rc.lookup(a)
    rc.put(a, [5], "stop")
    store.flush(5)
    assert rc.lookup(a).tokens == [5]
    ns.bump()
    assert rc.lookup(a) is None
    store.backend.delete([f"specdec:{ns.name}:epoch"])
    fresh = ResponseCache(store, Namespace(store, ns.name), ttl_s=60, max_value_bytes=1 << 20)
    assert rc.lookup(a) is None and fresh.lookup(a) is None
    # The key comes back as a new random token, different from every earlier one.
    token = store.backend.get(f"specdec:{ns.name}:epoch")
    assert token is not None and len(token) == 32
    rc.put(a, [7], "stop")
    store.flush(5)
    assert rc.lookup(a).tokens == [7] and fresh.lookup(a).tokens == [7]


def test_flush_deletes_one_namespace_by_scan(store, ns):
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=1 << 20)
    other = Namespace(store, ns.name + "-keep")
    rc_other = ResponseCache(store, other, ttl_s=60, max_value_bytes=1 << 20)
    for i in range(30):
        rc.put(request_for(prompt=(i,)), [i], "stop")
    rc_other.put(request_for(), [1], "stop")
    store.flush(5)
    assert ns.flush(dry_run=True) == 30
    assert ns.flush(batch=7) == 30
    assert list(store.backend.scan(f"specdec:{ns.name}:resp:*")) == []
    assert rc_other.lookup(request_for()).tokens == [1]
    assert ns.stats()["keys"].get("resp", 0) == 0


# ---------------------------------------------------------------- draft store


def test_draft_store_longest_context(store, ns):
    ds = DraftStore(store, ns, vocab="v" * 32, contexts=(8, 3), continuation=6, ttl_s=60, vocab_size=1000)
    seq = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    assert ds.add(seq)
    assert not ds.add(seq)  # the same sequence again is not rewritten
    store.flush(5)
    assert ds.lookup(seq[:9]) == [19, 20, 21, 22]  # an 8-token context
    assert ds.lookup([99, 99, 14, 15, 16]) == [17, 18, 19, 20, 21, 22]  # only the 3-token context matches
    assert ds.lookup([1, 2, 3]) == []
    # A second sequence that shares a 3-token context but not the 8-token one:
    ds.add([50, 51, 52, 53, 54, 14, 15, 16, 70, 71])
    store.flush(5)
    assert ds.lookup(seq[:8]) == [18, 19, 20, 21, 22]  # the longer context wins
    assert ds.lookup([0, 14, 15, 16]) == [70, 71]  # the short context was overwritten by the latest
    assert ds.lookup_many([seq[:9], [1, 2, 3], []]) == [[19, 20, 21, 22], [], []]
    # namespace epoch bump hides everything
    ns.bump()
    assert ds.lookup(seq[:9]) == []


def test_draft_store_rejects_poison(store, ns):
    ds = DraftStore(store, ns, vocab="v" * 32, contexts=(3,), continuation=8, ttl_s=60, vocab_size=100)
    ds.put([1, 2, 3], [4, 5, 100, 6])  # 100 is outside the vocabulary
    assert ds.lookup([1, 2, 3]) == [4, 5]
    ds.put([1, 2, 3], [-7, 5])
    assert ds.lookup([1, 2, 3]) == []
    epoch = ns.fetch_epochs()[0]
    key = ds.context_key([1, 2, 3], epoch)
    store.backend.set_many([(key, b"garbage that is not a value", 60)])
    assert ds.lookup([1, 2, 3]) == []
    # a valid value for another context, copied under this key, does not decode
    foreign = encode_value(KIND_DRAFT, [9, 9], ds.context_key([7, 7, 7], epoch), max_bytes=1 << 20)
    store.backend.set_many([(key, foreign, 60)])
    assert ds.lookup([1, 2, 3]) == []


def test_memory_backend_is_a_bounded_lru():
    from specdec.cache.memory_backend import MemoryBackend

    b = MemoryBackend(max_entries=3, max_bytes=1 << 20)
    b.set_many([("a", b"1", None), ("b", b"2", None), ("c", b"3", None)])
    assert b.get("a") == b"1"  # a is now most recent
    b.set_many([("d", b"4", None)])
    assert b.get("b") is None and b.get("a") == b"1" and b.evictions == 1
    small = MemoryBackend(max_entries=100, max_bytes=10)
    small.set_many([("k1", b"xxxx", None), ("k2", b"yyyy", None)])  # 2+4 bytes each: 12 > 10
    assert small.get("k1") is None and small.get("k2") == b"yyyy"
