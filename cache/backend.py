"""The storage interface every backend implements: a small subset of Redis.

Backends raise on failure (ConnectionError, TimeoutError, redis errors); deciding what
a failure means (skip, count, open the breaker) is the job of `specdec.cache.store`.
Keys are str, values bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Mapping, Sequence

from .config import CacheConfig

# (key, value, ttl in seconds; None or 0 = no expiry)
Write = tuple[str, bytes, "float | None"]


class Backend(ABC):
    """Key/value operations used by the response cache, draft store and invalidation."""

    kind: str = ""

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
