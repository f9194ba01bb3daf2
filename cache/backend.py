"""The storage interface every backend implements: a small subset of Redis.

Backends raise on failure (ConnectionError, TimeoutError, redis errors); deciding what
a failure means (skip, count, open the breaker) is the job of `specdec.cache.store`.
Keys are str, values bytes.

Replies are checked here, at the boundary: whoever answers on the cache port (a real
server, a proxy, or anything that speaks the protocol), a backend returns exactly the
shape its signature promises, or raises BadReply. `mget(keys)` returns a list of
len(keys) items, each None or bytes of at most the read cap; a simple string, an
integer, an array, a map, a wrong count or an oversized value anywhere fails the whole
call. The read cap is `max_value_bytes` unless a caller narrows it for its own reads
(`with backend.value_cap(n): ...`, per thread): the draft store reads values of a few
hundred bytes and has no use for a megabyte one.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from .config import CacheConfig

# (key, value, ttl in seconds; None or 0 = no expiry)
Write = tuple[str, bytes, "float | None"]

_READ_CAP = threading.local()  # .nbytes: the cap a caller set for this thread's reads


class BadReply(Exception):
    """A reply of the wrong type, shape or size for the command that was sent.

    The server (or whatever answered in its place) is reachable but did not answer as
    Redis does: a failed call, counted apart from outages (store.py), never a value.
    """


def check_value(value: Any, cap: int, op: str) -> bytes | None:
    """`value` if it is None or bytes of at most `cap` bytes; BadReply otherwise."""
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise BadReply(f"{op} answered a {type(value).__name__} where a string value or nil belongs")
    if len(value) > cap:
        raise BadReply(f"{op} answered a value of {len(value)} bytes; the cap for this read is {cap} bytes")
    return value


def check_values(reply: Any, count: int, cap: int, op: str = "MGET") -> list[bytes | None]:
    """`reply` if it is a list of `count` values each passing check_value; BadReply otherwise."""
    if not isinstance(reply, list):
        raise BadReply(f"{op} answered a {type(reply).__name__} where a list of {count} values belongs")
    if len(reply) != count:
        raise BadReply(f"{op} answered {len(reply)} values for {count} keys")
    for value in reply:
        check_value(value, cap, op)
    return reply


def check_int(reply: Any, op: str) -> int:
    """`reply` if it is an int (not a bool); BadReply otherwise."""
    if type(reply) is not int:
        raise BadReply(f"{op} answered a {type(reply).__name__} where an integer belongs")
    return reply


class Backend(ABC):
    """Key/value operations used by the response cache, draft store and invalidation."""

    kind: str = ""
    max_value_bytes: int = 1 << 20  # read cap unless value_cap narrows it

    @staticmethod
    @contextmanager
    def value_cap(nbytes: int) -> Iterator[None]:
        """Within the block, this thread's reads fail (BadReply) on any value over `nbytes`.

        Only ever narrows the backend's own cap; the Redis backend checks the length a
        reply announces before reading the value, so an oversized value is never read.
        """
        if int(nbytes) < 0:
            raise ValueError(f"value_cap({nbytes!r}): a cap is a byte count >= 0")
        outer = getattr(_READ_CAP, "nbytes", None)
        _READ_CAP.nbytes = int(nbytes) if outer is None else min(outer, int(nbytes))
        try:
            yield
        finally:
            _READ_CAP.nbytes = outer

    def read_cap(self) -> int:
        """The largest value this thread may read now (max_value_bytes, or less under value_cap)."""
        narrowed = getattr(_READ_CAP, "nbytes", None)
        return self.max_value_bytes if narrowed is None else min(narrowed, self.max_value_bytes)

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """Value of one key, or None."""

    @abstractmethod
    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of several keys in one round trip (None where missing)."""

    @abstractmethod
    def set_many(self, writes: Sequence[Write]) -> None:
        """Store several values, each with its own TTL, in one round trip."""

    @abstractmethod
    def set_if_absent(self, key: str, value: bytes) -> bool:
        """Store `value` (no expiry) only if `key` does not exist (SET NX); True if it was stored."""

    @abstractmethod
    def delete(self, keys: Sequence[str]) -> int:
        """Delete keys; return how many existed."""

    @abstractmethod
    def incr(self, key: str) -> int:
        """Atomically increment an integer counter (missing = 0) and return the new value."""

    @abstractmethod
    def hincrby_many(self, key: str, amounts: Mapping[str, int]) -> None:
        """Add to several integer fields of a hash."""

    @abstractmethod
    def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        """Set several fields of a hash."""

    @abstractmethod
    def hgetall(self, key: str) -> dict[str, bytes]:
        """All fields of a hash."""

    @abstractmethod
    def scan(self, pattern: str, count: int = 1000) -> Iterator[str]:
        """Iterate keys matching a glob pattern without blocking the server (SCAN)."""

    @abstractmethod
    def ttl(self, key: str) -> float | None:
        """Seconds until the key expires; None if it has no expiry or does not exist."""

    @abstractmethod
    def ping(self) -> bool:
        """True if the server answers."""

    @abstractmethod
    def server_info(self) -> dict[str, object]:
        """A few facts about the server for `specdec cache stats`."""

    def close(self) -> None:
        """Release connections."""


def open_backend(config: CacheConfig) -> Backend:
    """A new backend for `config` (callers share it through specdec.cache.store)."""
    if config.backend == "memory":
        from .memory_backend import MemoryBackend

        return MemoryBackend.named(config.url, config.memory_max_entries, config.memory_max_bytes)
    if config.backend == "redis":
        from .redis_backend import RedisBackend

        return RedisBackend(config)
    raise ValueError(f"unknown cache backend {config.backend!r}; allowed: memory, redis")
