"""In-process backend: an LRU of bytes values with per-entry TTL, bounded by count and bytes.

`memory://` is one store per process; `memory://name` selects another named store, so
two caches in one process can be kept apart. Nothing is shared across processes.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections import OrderedDict
from typing import Iterator, Mapping, Sequence

from .backend import Backend, Write, check_value

_STORES: dict[str, "MemoryBackend"] = {}
_STORES_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """LRU + TTL dictionary; thread-safe (the write-behind thread writes concurrently)."""

    kind = "memory"

    def __init__(self, max_entries: int = 200_000, max_bytes: int = 256 << 20, clock=time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # No value outgrows the store itself; a reader narrows this with value_cap, as on Redis.
        self.max_value_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()  # key -> (value, expires_at)
        self._hashes: dict[str, dict[str, bytes]] = {}
        self._bytes = 0
        self.evictions = 0

    def after_fork(self) -> None:
        """In a forked child (which keeps a copy of the data): a new lock, in case a thread held the old one."""
        self._lock = threading.Lock()

    @classmethod
    def named(cls, name: str, max_entries: int, max_bytes: int) -> "MemoryBackend":
        """The process-wide store called `name` (created on first use)."""
        with _STORES_LOCK:
            store = _STORES.get(name)
            if store is None:
                store = _STORES[name] = cls(max_entries, max_bytes)
            return store

    # -- internals (call with the lock held) --

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._clock():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return value

    def _drop(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self._bytes -= len(key) + len(item[0])
        return True

    def _put(self, key: str, value: bytes, ttl: float | None) -> None:
        self._drop(key)
        expires = self._clock() + ttl if ttl else None
        self._data[key] = (value, expires)
        self._bytes += len(key) + len(value)
        while self._data and (len(self._data) > self.max_entries or self._bytes > self.max_bytes):
            old, (old_value, _) = self._data.popitem(last=False)
            self._bytes -= len(old) + len(old_value)
            self.evictions += 1

    # -- Backend --

    def get(self, key: str) -> bytes | None:
        cap = self.read_cap()
        with self._lock:
            return check_value(self._live(key), cap, "GET")

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        cap = self.read_cap()
        with self._lock:
            return [check_value(self._live(k), cap, "MGET") for k in keys]

    def set_many(self, writes: Sequence[Write]) -> None:
        with self._lock:
            for key, value, ttl in writes:
                self._put(key, bytes(value), ttl)

    def set_if_absent(self, key: str, value: bytes) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._put(key, bytes(value), None)
            return True

    def delete(self, keys: Sequence[str]) -> int:
        with self._lock:
            n = 0
            for key in keys:
                alive = self._live(key) is not None
                self._drop(key)
                n += alive
                n += self._hashes.pop(key, None) is not None
            return n

    def incr(self, key: str) -> int:
        with self._lock:
            current = self._live(key)
            item = self._data.get(key)
            value = int(current) + 1 if current is not None else 1
            expires = item[1] if item is not None else None
            ttl = None if expires is None else max(expires - self._clock(), 0.001)
            self._put(key, str(value).encode(), ttl)
            return value

    def hincrby_many(self, key: str, amounts: Mapping[str, int]) -> None:
        with self._lock:
            h = self._hashes.setdefault(key, {})
            for name, amount in amounts.items():
                h[name] = str(int(h.get(name, b"0")) + int(amount)).encode()

    def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        with self._lock:
            self._hashes.setdefault(key, {}).update({k: bytes(v) for k, v in mapping.items()})

    def hgetall(self, key: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._hashes.get(key, {}))

    def scan(self, pattern: str, count: int = 1000) -> Iterator[str]:
        # Redis glob and fnmatch agree on the patterns used here (*, ?, [..]).
        regex = re.compile(fnmatch.translate(pattern))
        with self._lock:
            keys = [k for k in list(self._data) + list(self._hashes) if regex.match(k)]
        yield from keys

    def ttl(self, key: str) -> float | None:
        with self._lock:
            if self._live(key) is None:
                return None
            expires = self._data[key][1]
            return None if expires is None else expires - self._clock()

    def ping(self) -> bool:
        return True

    def server_info(self) -> dict[str, object]:
        with self._lock:
            return {
                "backend": "memory",
                "entries": len(self._data),
                "bytes": self._bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
                "evictions": self.evictions,
            }

    def clear(self) -> None:
        """Drop everything (tests)."""
        with self._lock:
            self._data.clear()
            self._hashes.clear()
            self._bytes = 0
