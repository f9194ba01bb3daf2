"""Whatever answers on the cache port, the cache handles it inside the store.

A loopback server speaks enough of the protocol for redis-py's handshake and answers
every other command with seeded random replies of every RESP2/RESP3 type, size and
nesting (and, for MGET, well-formed values with wrong tokens). Nothing may raise out
of the store or out of `generate`, every reply of the wrong shape is a counted failed
call, and greedy output equals decoding without a cache. Replies that would take
megabytes, or never end, fail the call from what they announce, not at the deadline.
"""

from __future__ import annotations

import random
import socket
import threading
import uuid
from typing import Callable

import pytest
import redis
import torch

from specdec import SpeculativeGenerator
from specdec.cache.backend import BadReply
from specdec.cache.codec import KIND_DRAFT, KIND_RESPONSE, encode_value
from specdec.cache.config import parse_cache_url
from specdec.cache.draft_store import DraftStore
from specdec.cache.namespace import Namespace
from specdec.cache.store import CacheStore
from specdec.caching import CacheLayer

CRLF = b"\r\n"
HANDSHAKE = {b"HELLO", b"CLIENT", b"SELECT", b"AUTH", b"READONLY"}
HELLO_REPLY = (
    b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n$5\r\nproto\r\n:3\r\n"
    b"$2\r\nid\r\n:1\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n"
    b"$7\r\nmodules\r\n*0\r\n"
)
VOCAB = 320


# ---------------------------------------------------------------- a server that answers anything


class Stall(bytes):
    """A reply to send, after which the server sends nothing more and holds the connection open."""


class FakeServer:
    """A loopback TCP server: handshake answered as Redis does, every other command by `answer`.

    `answer(args)` returns the reply's bytes (a Stall: and then nothing, the connection
    held open). Each connection is served by its own thread.
    """

    def __init__(self, answer: Callable[[list[bytes]], bytes]) -> None:
        self.answer = answer
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = self.server.getsockname()[1]
        self.stopped = threading.Event()
        self.clients: list[socket.socket] = []
        self.commands: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, **options) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"redis://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle waits
            self.clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while not self.stopped.is_set():
                args = _read_command(reader)
                if args is None:
                    return
                name = args[0].upper()
                self.commands.append(name)
                if name == b"HELLO":
                    reply = HELLO_REPLY
                elif name in HANDSHAKE:
                    reply = b"+OK\r\n"
                else:
                    reply = self.answer(args)
                conn.sendall(reply)
                if isinstance(reply, Stall):
                    self.stopped.wait()
                    return
        except (OSError, ValueError):  # the client hung up (it may, on a reply it refused)
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self.stopped.set()
        self.server.close()
        for c in list(self.clients):
            try:
                c.close()
            except OSError:
                pass


def _read_command(reader) -> list[bytes] | None:
    line = reader.readline()
    if not line:
        return None
    if not line.startswith(b"*"):
        raise ValueError(f"not a command: {line!r}")
    args = []
    for _ in range(int(line[1:])):
        size = int(reader.readline()[1:])
        args.append(reader.read(size + 2)[:-2])
    return args


# ---------------------------------------------------------------- random replies


def _bulk(data: bytes, kind: bytes = b"$") -> bytes:
    return kind + str(len(data)).encode() + CRLF + data + CRLF


def _text(rng: random.Random, n: int) -> bytes:
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 :_-") for _ in range(n))


def random_value(rng: random.Random, depth: int = 0, count: int = 1) -> bytes:
    """One complete RESP2 or RESP3 value of a random type, size and nesting."""
    kinds = ["simple", "error", "blob_error", "int", "bignum", "double", "bool", "null", "null_bulk",
             "null_array", "bulk", "verbatim", "garbage", "attribute"]
    if depth < 3:
        kinds += ["array", "array", "set", "map", "push", "counted"]
    kind = rng.choice(kinds)
    if rng.random() < 0.03:
        kind = rng.choice(["huge_bulk", "long_line", "deep", "many"])
    if kind == "simple":
        return b"+" + _text(rng, rng.choice([0, 2, 30])) + CRLF
    if kind == "error":
        return b"-" + rng.choice([b"ERR ", b"WRONGTYPE ", b"MOVED 1 x:1", b"LOADING ", b""]) + _text(rng, 8) + CRLF
    if kind == "blob_error":
        return _bulk(b"ERR " + _text(rng, 10), b"!")
    if kind == "int":
        return b":" + str(rng.choice([0, 1, -1, 2**63 - 1, -(2**63), rng.randrange(-1000, 1000)])).encode() + CRLF
    if kind == "bignum":
        return b"(" + str(rng.randrange(10**30, 10**40)).encode() + CRLF
    if kind == "double":
        return b"," + rng.choice([b"1.5", b"inf", b"-inf", b"nan", b"1e308", b"-0.0"]) + CRLF
    if kind == "bool":
        return rng.choice([b"#t\r\n", b"#f\r\n"])
    if kind == "null":
        return b"_\r\n"
    if kind == "null_bulk":
        return b"$-1\r\n"
    if kind == "null_array":
        return b"*-1\r\n"
    if kind == "bulk":
        size = rng.choice([0, 1, 15, 16, 20, 100, 144, 1000, 1100, 5000, 70000])
        return _bulk(rng.randbytes(size))
    if kind == "verbatim":
        return _bulk(b"txt:" + _text(rng, rng.choice([0, 10, 200])), b"=")
    if kind == "garbage":
        return rng.choice([b"?what\r\n", b"$abc\r\n", b"*x\r\n", b":1.5\r\n", b"$-7\r\n", b"\r\n"])
    if kind == "attribute":  # RESP3 attributes: redis-py has no parser for them
        return b"|1\r\n+key\r\n+value\r\n" + random_value(rng, depth + 1)
    if kind in ("array", "set", "push", "counted"):
        n = rng.choice([0, 1, 2, 5]) if kind != "counted" else max(0, count + rng.choice([-1, 0, 0, 1]))
        prefix = {"array": b"*", "set": b"~", "push": b">", "counted": b"*"}[kind]
        body = b"".join(random_value(rng, depth + 1) for _ in range(n))
        value = prefix + str(n).encode() + CRLF + body
        # A push is out of band: the reply it precedes still follows it.
        return value + random_value(rng, depth + 1, count) if kind == "push" else value
    if kind == "map":
        n = rng.choice([0, 1, 3])
        return b"%" + str(n).encode() + CRLF + b"".join(random_value(rng, depth + 1) * 2 for _ in range(n))
    if kind == "huge_bulk":
        return _bulk(b"x" * (2 << 20))
    if kind == "long_line":
        return b"+" + b"y" * 200_000 + CRLF
    if kind == "deep":
        return b"*1\r\n" * 40 + b":1\r\n"
    if kind == "many":
        return b"*5000\r\n" + b":1\r\n" * 5000
    raise AssertionError(kind)


def crafted_mget(rng: random.Random, keys: list[bytes]) -> bytes:
    """An MGET reply of the right count whose items are nil, junk or well-formed wrong values."""
    items = []
    for key in keys:
        name = key.decode()
        choice = rng.random()
        if choice < 0.25:
            items.append(b"_\r\n" if rng.random() < 0.5 else b"$-1\r\n")
        elif ":epoch" in name or ":model-epoch" in name:
            items.append(_bulk(rng.randbytes(16).hex().encode()))
        elif choice < 0.5:
            items.append(random_value(rng, 2))
        else:
            n = rng.choice([0, 1, 4, 32, 40, 300])
            tokens = [rng.choice([rng.randrange(VOCAB), VOCAB + 3, -1, 2**31 - 1]) for _ in range(n)]
            kind = KIND_DRAFT if ":draft:" in name else KIND_RESPONSE
            tail = "" if kind == KIND_DRAFT else rng.choice(["length", "stop", "x"])
            items.append(_bulk(encode_value(kind, tokens, name, tail=tail, max_bytes=1 << 30)))
    return b"*" + str(len(keys)).encode() + CRLF + b"".join(items)


def fuzz_answer(seed: int) -> Callable[[list[bytes]], bytes]:
    rng = random.Random(seed)
    lock = threading.Lock()

    def answer(args: list[bytes]) -> bytes:
        with lock:  # the writer thread and the caller share the server
            if args[0].upper() == b"MGET" and rng.random() < 0.4:
                return crafted_mget(rng, args[1:])
            return random_value(rng, count=max(1, len(args) - 1))

    return answer


@pytest.fixture
def fuzz_server():
    servers: list[FakeServer] = []

    def start(answer) -> FakeServer:
        servers.append(FakeServer(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# ---------------------------------------------------------------- the store, op by op


def _open_store(url: str) -> CacheStore:
    # A generous deadline: nothing here may stall, and a stall must not pass for a bad reply.
    return CacheStore(parse_cache_url(url, deadline_ms=5000, breaker_failures=1000))


def _problems(store: CacheStore) -> int:
    c = store.counts()
    return c.get("errors", 0) + c.get("failures", 0) + c.get("short_circuits", 0)


@pytest.mark.parametrize("protocol", [3, 2])
def test_every_reply_is_handled_inside_the_store(fuzz_server, protocol):
    server = fuzz_server(fuzz_answer(1000 + protocol))
    store = _open_store(server.url(protocol=protocol))
    ns = Namespace(store, "fuzz")
    ds = DraftStore(store, ns, vocab="v" * 32, contexts=(8, 3), continuation=32, vocab_size=VOCAB)
    keys = ["specdec:fuzz:draft:a", "specdec:fuzz:draft:b", "specdec:fuzz:epoch"]
    seqs = [list(range(10)), [5, 6, 7], [1]]
    checks = {
        "mget": (lambda r: r is None or (isinstance(r, list) and len(r) == 3 and all(
            v is None or (type(v) is bytes and len(v) <= 1 << 20) for v in r))),
        "get": lambda r: r is None or (type(r) is bytes and len(r) <= 1 << 20),
        "set_many": lambda r: r is None or r is False,
        "set_if_absent": lambda r: r in (True, False, None),
        "incr": lambda r: r is None or type(r) is int,
        "hincrby_many": lambda r: r is None,
        "hset_many": lambda r: r is None,
        "hgetall": lambda r: r is None or (isinstance(r, dict) and all(
            type(k) is str and type(v) is bytes for k, v in r.items())),
        "ttl": lambda r: r is None or isinstance(r, float),
        "ping": lambda r: r in (True, False, None),
        "delete": lambda r: r is None or type(r) is int,
    }
    args = {
        "mget": (keys,), "get": (keys[0],), "set_many": ([(keys[0], b"v", 60), (keys[1], b"w", None)],),
        "set_if_absent": (keys[2], b"e"), "incr": ("n",), "hincrby_many": ("h", {"a": 1, "b": 2}),
        "hset_many": ("h", {"a": b"1"}), "hgetall": ("h",), "ttl": ("k",), "ping": (), "delete": (["k"],),
    }
    try:
        for case in range(150):
            for op, check in checks.items():
                default = False if op == "set_many" else None
                before = _problems(store)
                result = store.call(op, *args[op], default=default)
                assert check(result), (case, op, result)
                if result is default and op in ("mget", "set_many", "incr", "delete"):  # never a valid answer
                    assert _problems(store) > before, (case, op, "a failed call went uncounted")
            # Under a narrowed cap no longer value comes back, from any reply.
            with store.backend.value_cap(200):
                got = store.call("mget", keys)
            assert got is None or all(v is None or len(v) <= 200 for v in got), (case, got)
            found = ds.lookup_many(seqs)
            assert isinstance(found, list) and len(found) == len(seqs)
            for tokens in found:
                assert len(tokens) <= 32 and all(type(t) is int and 0 <= t < VOCAB for t in tokens), found
            # Admin reads may fail, but with a clear error, never a TypeError from deep inside.
            try:
                assert all(isinstance(k, str) for k in store.admin("scan", "specdec:fuzz:*", 10))
            except (BadReply, redis.exceptions.RedisError):
                pass
        counts = store.counts()
        assert counts["bad_replies"] > 100 and counts.get("deadline_misses", 0) == 0, counts
    finally:
        store.close()


# ---------------------------------------------------------------- through generate


@pytest.fixture(scope="module")
def gen(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)


PROMPTS = ["def add(a, b):", "class Point:"]
GREEDY = dict(max_new_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(gen):
    return [r.token_ids for r in gen.generate(PROMPTS, cache=None, drafter="none", **GREEDY)]


@pytest.mark.parametrize("protocol", [3, 2])
def test_generate_is_unchanged_by_any_reply(gen, expected, fuzz_server, protocol):
    server = fuzz_server(fuzz_answer(2000 + protocol))
    url = server.url(protocol=protocol, namespace="fuzz")
    layer = CacheLayer.open(url, gen, deadline_ms=5000, breaker_failures=1000)
    try:
        for round_ in range(2):  # every MGET, SET and HINCRBY of each step gets a random reply
            for drafter in ("cache", "auto"):
                got = gen.generate(PROMPTS, cache=layer, drafter=drafter, num_draft_tokens=4, **GREEDY)
                assert [r.token_ids for r in got] == expected, (round_, drafter)
        layer.flush(5)
        counts = layer.counts()
        assert counts["bad_replies"] > 10 and counts.get("deadline_misses", 0) == 0, counts
    finally:
        layer.close()


# ---------------------------------------------------------------- replies that never end


STALLING = {
    # a bulk string of 100 MB announced, a little of it sent, then nothing
    "huge bulk": b"*2\r\n$100000000\r\n" + b"z" * 1000,
    # a line with no end in sight
    "endless line": b"+" + b"y" * (64 << 10),
    # an array of a billion items, a few thousand of them sent
    "endless array": b"*1000000000\r\n" + b":1\r\n" * 4000,
    # nesting far deeper than any command's reply
    "deep nesting": b"*1\r\n" * 5000,
}


@pytest.mark.parametrize("case", sorted(STALLING))
def test_an_oversized_reply_fails_the_call_before_it_is_read(fuzz_server, case):
    # The server sends the start of the reply and then holds the connection open: a reader
    # that waits for all of it waits for the deadline, one that bounds it stops at once.
    server = fuzz_server(lambda args: Stall(STALLING[case]))
    store = CacheStore(parse_cache_url(server.url(), deadline_ms=3000, breaker_failures=1000))
    try:
        with store.backend.value_cap(144):  # a draft store's read
            assert store.call("mget", ["specdec:t:epoch", "specdec:t:draft:a"]) is None
        counts = store.counts()
        assert counts.get("bad_replies") == 1 and counts.get("deadline_misses", 0) == 0, counts
    finally:
        store.close()


def test_an_oversized_value_is_refused_unread_by_a_draft_read(fuzz_server):
    # A complete reply, but one value is far beyond what a draft read accepts: refused from
    # the announced length, and the connection (its stream now out of step) is replaced.
    value = b"x" * (1 << 20)
    server = fuzz_server(lambda args: b"*2\r\n_\r\n" + _bulk(value) if args[0].upper() == b"MGET" else b":1\r\n")
    store = CacheStore(parse_cache_url(server.url(), deadline_ms=5000, breaker_failures=1000))
    try:
        with store.backend.value_cap(144):
            assert store.call("mget", ["a", "b"]) is None
        assert store.counts()["bad_replies"] == 1
        # Outside the draft read, the backend's own cap (max_value_bytes, 1 MiB) still admits it.
        assert store.call("mget", ["a", "b"]) == [None, value]
        assert store.call("incr", "n") == 1  # the replaced connection works
    finally:
        store.close()


def test_memory_backend_applies_the_same_cap():
    store = CacheStore(parse_cache_url(f"memory://{uuid.uuid4().hex}"))
    try:
        store.backend.set_many([("a", b"x" * 500, None), ("b", b"y", None)])
        with store.backend.value_cap(144):
            assert store.call("mget", ["a", "b"]) is None
            assert store.call("mget", ["b"]) == [b"y"]
        assert store.call("mget", ["a", "b"]) == [b"x" * 500, b"y"]
        assert store.counts()["bad_replies"] == 1
    finally:
        store.close()


def test_value_cap_only_narrows_and_is_per_thread():
    store = CacheStore(parse_cache_url(f"memory://{uuid.uuid4().hex}"))
    backend = store.backend
    try:
        with backend.value_cap(100):
            with backend.value_cap(1000):
                assert backend.read_cap() == 100
            seen = []
            t = threading.Thread(target=lambda: seen.append(backend.read_cap()))
            t.start()
            t.join()
            assert seen == [backend.max_value_bytes]
        assert backend.read_cap() == backend.max_value_bytes
        with pytest.raises(ValueError):
            with backend.value_cap(-1):
                pass
    finally:
        store.close()
