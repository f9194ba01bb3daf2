"""Redis backend (redis-py): standalone over TCP, TLS or a unix socket, or Redis Cluster.

Failure behaviour is set here once: socket connect and read/write timeouts equal the
deadline, connections are deadline-aware (specdec.cache.deadline: the store bounds
each whole call, handshake included), and redis-py's own retries are switched off
(its default retries ten times with backoff, which would turn one dead server into
seconds of latency). The client
is created on first use, so an unreachable server fails a call rather than the
constructor. Callers share one instance per process and URL (specdec.cache.store),
hence one connection pool per process.

Replies are bounded and checked here (see "bounded replies" below): each call states
the longest string and the bytes in all it may read, the parser refuses more as it
reads, and each method returns the shape its signature promises or raises BadReply.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import redis
from redis._parsers import _RESP2Parser, _RESP3Parser
from redis.backoff import NoBackoff
from redis.retry import Retry

from urllib.parse import urlsplit

from .backend import Backend, BadReply, Write, check_int, check_value, check_values
from .config import CacheConfig
from .deadline import connection_class

# ---------------------------------------------------------------- bounded replies
#
# redis-py reads a reply to the end before returning it: a bulk string of the length it
# announces, arrays of any count and depth, a line until its CRLF. Whatever answers on
# the cache port decides those sizes, so each call states what it may read, and the
# parser holds it to that while it reads (within the call's deadline):
#   - no string longer than `max_string` (checked on the announced length: never read);
#   - no more than `total` bytes off the socket for the whole call (lines and counts
#     included: a line without an end or an array of a billion items stops there);
#   - no nesting deeper than _MAX_DEPTH.
# A reply over a limit fails the call with BadReply and the connection is dropped (its
# stream is out of step). The connection handshake (HELLO, CLIENT SETINFO, SELECT) reads
# under limits of its own.

_MAX_DEPTH = 16  # MGET needs 2, HELLO 4
_SHORT = 256  # a status, integer or error reply, generously
_HANDSHAKE_STRING, _HANDSHAKE_BYTES = 4 << 10, 16 << 10
_CLUSTER_STRING, _CLUSTER_BYTES = 4 << 10, 256 << 10  # a slot-map refresh may run inside any call
_LIMITS = threading.local()  # .current: the limits of the reply this thread is reading


def _values_bytes(count: int, cap: int) -> int:
    """Bytes a reply of `count` values of at most `cap` bytes takes on the wire, framing included."""
    return 32 + count * (cap + 32)


def _describe(reply: Any) -> str:
    kind = type(reply).__name__
    return f"a {kind} of {len(reply)} items" if isinstance(reply, (list, dict)) else f"a {kind}"


class _ReplyLimits:
    __slots__ = ("max_string", "bytes_left")

    def __init__(self, max_string: int, total: int | None) -> None:
        self.max_string = max_string
        self.bytes_left = total  # None: no total (admin reads of unknown size)


@contextmanager
def _limits(max_string: int, total: int | None) -> Iterator[_ReplyLimits]:
    outer = getattr(_LIMITS, "current", None)
    _LIMITS.current = limits = _ReplyLimits(max_string, total)
    try:
        yield limits
    finally:
        _LIMITS.current = outer


@contextmanager
def _checked_call(op: str, max_string: int, total: int | None) -> Iterator[None]:
    """Run one call under reply limits; a reply redis-py cannot make sense of becomes BadReply.

    Connection errors, timeouts and error replies (ResponseError) pass unchanged: the
    store tells outages from answers by them.
    """
    with _limits(max_string, total):
        try:
            yield
        except BadReply:
            raise
        except redis.exceptions.InvalidResponse as exc:
            raise BadReply(f"{op}: {exc}") from None
        except (redis.exceptions.RedisError, OSError):
            raise
        except Exception as exc:
            # redis-py's reply callbacks assume Redis's reply shapes (a pair of a cursor and
            # keys for SCAN, pairs for HGETALL under RESP2, ...); whatever else came back
            # breaks them with TypeError, ValueError, OverflowError and the like.
            raise BadReply(f"{op} answered a reply of the wrong shape ({type(exc).__name__}: {exc})") from None


class _MeteredSocket:
    """The socket as the reply parser sees it: every recv is charged to the call's byte total."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        object.__setattr__(self, "_sock", sock)

    def recv(self, bufsize: int, *flags: Any) -> bytes:
        limits = getattr(_LIMITS, "current", None)
        left = None if limits is None else limits.bytes_left
        if left is not None:
            if left <= 0:
                raise BadReply("the reply is longer than the command can answer")
            bufsize = min(bufsize, left)
        data = self._sock.recv(bufsize, *flags)
        if left is not None:
            limits.bytes_left = left - len(data)  # type: ignore[union-attr]
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._sock, name, value)


class _CheckedBuffer:
    """redis-py's socket buffer, refusing a string longer than the limit before reading it."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)

    def read(self, length: int, *args: Any, **kwargs: Any) -> bytes:
        limits = getattr(_LIMITS, "current", None)
        if length == -1:  # a RESP2 null in a RESP3 stream (the RESP2 parser never asks)
            return None  # type: ignore[return-value]
        if length < 0:
            raise BadReply(f"a string of length {length}")
        if limits is not None and length > limits.max_string:
            raise BadReply(f"a string of {length} bytes; at most {limits.max_string} bytes may be read here")
        return self._inner.read(length, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # redis-py sets socket_timeout here
        setattr(self._inner, name, value)


class _CheckedParser:
    """Mixin over redis-py's pure-Python parsers: metered socket, checked lengths, bounded depth."""

    _depth = 0

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[misc]
        buffer = self._buffer  # type: ignore[has-type]
        if hasattr(buffer, "_sock"):
            buffer._sock = _MeteredSocket(buffer._sock)
        self._buffer = _CheckedBuffer(buffer)

    def _read_response(self, *args: Any, **kwargs: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise BadReply(f"a reply nested more than {_MAX_DEPTH} levels deep")
            return super()._read_response(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._depth -= 1


class _CheckedRESP2Parser(_CheckedParser, _RESP2Parser):
    pass


class _CheckedRESP3Parser(_CheckedParser, _RESP3Parser):
    pass


class _CheckedConnection:
    """Connection mixin: replies are read by a checked parser, the handshake under its own limits.

    redis-py swaps parsers while it connects (RESP2 <-> RESP3, by class); every swap goes
    through set_parser, so every parser it installs is a checked one. hiredis (C) reads
    outside Python where no limit applies: the pure-Python parser of the same protocol
    stands in for it.
    """

    def set_parser(self, parser_class: type) -> None:
        if not issubclass(parser_class, _CheckedParser):
            if issubclass(parser_class, _RESP3Parser):
                parser_class = _CheckedRESP3Parser
            elif issubclass(parser_class, _RESP2Parser):
                parser_class = _CheckedRESP2Parser
            else:
                three = str(getattr(self, "protocol", 2)) == "3"
                parser_class = _CheckedRESP3Parser if three else _CheckedRESP2Parser
        super().set_parser(parser_class)  # type: ignore[misc]

    def on_connect(self, *args: Any, **kwargs: Any) -> Any:
        with _limits(_HANDSHAKE_STRING, _HANDSHAKE_BYTES):
            return super().on_connect(*args, **kwargs)  # type: ignore[misc]

    def on_connect_check_health(self, *args: Any, **kwargs: Any) -> Any:  # redis-py >= 6 calls this one
        with _limits(_HANDSHAKE_STRING, _HANDSHAKE_BYTES):
            return super().on_connect_check_health(*args, **kwargs)  # type: ignore[misc]


_CHECKED_CLASSES: dict[type, type] = {}


def checked_connection_class(base: type) -> type:
    """`base` (a redis-py connection class) reading every reply under the current call's limits."""
    cls = _CHECKED_CLASSES.get(base)
    if cls is None:
        cls = _CHECKED_CLASSES[base] = type(f"Checked{base.__name__}", (_CheckedConnection, base), {})
    return cls



class RedisBackend(Backend):
    """Backend over redis-py with deadline-sized socket timeouts and no retries."""

    kind = "redis"

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.cluster = config.cluster
        self.max_value_bytes = config.max_value_bytes
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The redis-py client (Redis or RedisCluster), created on first use."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
                client = self._client
        return client

    def after_fork(self) -> None:
        """In a forked child: forget the parent's client (its pool, sockets and locks); the next call connects anew."""
        self._lock = threading.Lock()
        self._client = None

    def _connect(self) -> Any:
        timeout = self.config.deadline_ms / 1000.0
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "connection_class": checked_connection_class(connection_class(urlsplit(self.config.url).scheme)),
        }
        if self.cluster:
            # Cluster discovery runs here; a failure propagates and the next call tries again.
            return redis.RedisCluster.from_url(self.config.url, **kwargs)
        pool = redis.ConnectionPool.from_url(self.config.url, **kwargs)
        return redis.Redis(connection_pool=pool)

    # -- reads and writes: each runs under reply limits and returns what its signature says --

    def _reply(self, op: str, max_string: int, total: int | None):
        """Limits for one call's replies (see _ReplyLimits), widened for cluster topology reads."""
        if self.cluster:  # a call may refresh the slot map (CLUSTER SLOTS) on the same thread
            max_string = max(max_string, _CLUSTER_STRING)
            total = None if total is None else total + _CLUSTER_BYTES
        return _checked_call(op, max_string, total)

    def get(self, key: str) -> bytes | None:
        client, cap = self.client, self.read_cap()
        with self._reply("GET", cap, _values_bytes(1, cap)):
            return check_value(client.get(key), cap, "GET")

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        client, cap = self.client, self.read_cap()
        with self._reply("MGET", cap, _values_bytes(len(keys), cap)):
            if self.cluster:  # keys of different slots: one request per node
                reply = client.mget_nonatomic(list(keys))
            else:
                reply = client.mget(list(keys))
            return check_values(reply, len(keys), cap)

    def set_many(self, writes: Sequence[Write]) -> None:
        if not writes:
            return
        client = self.client
        with self._reply("SET", _SHORT, _SHORT * len(writes)):
            pipe = client.pipeline(transaction=False)
            for key, value, ttl in writes:
                if ttl:
                    pipe.set(key, value, px=max(1, int(ttl * 1000)))
                else:
                    pipe.set(key, value)
            replies = pipe.execute()
        # redis-py turns +OK into True; anything else means the value was not stored.
        if not isinstance(replies, list) or len(replies) != len(writes) or any(r is not True for r in replies):
            raise BadReply(f"SET answered {_describe(replies)} for {len(writes)} writes, not OK each")

    def set_if_absent(self, key: str, value: bytes) -> bool:
        client = self.client
        with self._reply("SET NX", _SHORT, _SHORT):
            reply = client.set(key, value, nx=True)
        if reply is not True and reply is not None and reply is not False:  # OK, or nil when the key exists
            raise BadReply(f"SET NX answered {_describe(reply)}, not OK or nil")
        return reply is True

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        client = self.client
        with self._reply("UNLINK", _SHORT, _SHORT):
            # UNLINK frees memory off the server's main thread.
            return check_int(client.unlink(*keys), "UNLINK")

    def incr(self, key: str) -> int:
        client = self.client
        with self._reply("INCR", _SHORT, _SHORT):
            return check_int(client.incr(key), "INCR")

    def hincrby_many(self, key: str, amounts: Mapping[str, int]) -> None:
        if not amounts:
            return
        client = self.client
        with self._reply("HINCRBY", _SHORT, _SHORT * len(amounts)):
            pipe = client.pipeline(transaction=False)
            for name, amount in amounts.items():
                pipe.hincrby(key, name, int(amount))
            replies = pipe.execute()
        if not isinstance(replies, list) or len(replies) != len(amounts):
            raise BadReply(f"HINCRBY answered {_describe(replies)} for {len(amounts)} fields")
        for reply in replies:
            check_int(reply, "HINCRBY")

    def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        if mapping:
            client = self.client
            with self._reply("HSET", _SHORT, _SHORT):
                check_int(client.hset(key, mapping=dict(mapping)), "HSET")

    def hgetall(self, key: str) -> dict[str, bytes]:
        client, cap = self.client, self.read_cap()
        with self._reply("HGETALL", cap, None):
            raw = client.hgetall(key)
            if not isinstance(raw, dict):
                raise BadReply(f"HGETALL answered {_describe(raw)}, not a hash")
            out = {}
            for field, value in raw.items():
                if not isinstance(field, (bytes, str)):
                    raise BadReply(f"HGETALL answered a field of type {type(field).__name__}")
                out[field.decode() if isinstance(field, bytes) else field] = check_value(value, cap, "HGETALL")
            if any(v is None for v in out.values()):
                raise BadReply("HGETALL answered a nil field value")
            return out  # type: ignore[return-value]

    def scan(self, pattern: str, count: int = 1000) -> Iterator[str]:
        client, cap = self.client, self.read_cap()
        keys = client.scan_iter(match=pattern, count=count)
        while True:
            with self._reply("SCAN", cap, None):  # one page read at a time, each checked
                try:
                    key = next(keys)
                except StopIteration:
                    return
                if not isinstance(key, (bytes, str)):
                    raise BadReply(f"SCAN answered a key of type {type(key).__name__}")
                key = key.decode() if isinstance(key, bytes) else key
            yield key

    def ttl(self, key: str) -> float | None:
        client = self.client
        with self._reply("PTTL", _SHORT, _SHORT):
            ms = check_int(client.pttl(key), "PTTL")
        return None if ms < 0 else ms / 1000.0

    def ping(self) -> bool:
        client = self.client
        with self._reply("PING", _SHORT, _SHORT):
            return client.ping() is True

    def server_info(self) -> dict[str, object]:
        client = self.client
        with self._reply("INFO", self.max_value_bytes, None):
            info = client.info()
        if not isinstance(info, dict):
            raise BadReply(f"INFO answered {_describe(info)}, not a section map")
        if self.cluster:  # {node: info}; report the first node and the node count
            nodes = list(info.values()) if info and isinstance(next(iter(info.values())), dict) else [info]
            first = nodes[0] if nodes else {}
            return {
                "backend": "redis-cluster",
                "nodes": len(nodes),
                "redis_version": first.get("redis_version"),
                "used_memory_human": first.get("used_memory_human"),
            }
        return {
            "backend": "redis",
            "redis_version": info.get("redis_version"),
            "used_memory_human": info.get("used_memory_human"),
            "maxmemory_policy": info.get("maxmemory_policy"),
            "db_keys": {k: v for k, v in info.items() if str(k).startswith("db") and isinstance(v, dict)},
        }

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken connection must not raise
                pass
