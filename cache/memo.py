"""A small, thread-safe LRU memo for the request path's repeated work (keys, token ids, texts).

Bounded by entry count; callers bound the size of what they store (long prompts skip the
memo), so the memory stays small whatever the traffic.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LruMemo(Generic[V]):
    """`memo.get(key, compute)`: the stored value, or compute() stored under key (LRU, `size` entries)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size={size}; a memo holds at least one entry")
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        with self._lock:
            found = self._items.get(key, _MISSING)
            if found is not _MISSING:
                self._items.move_to_end(key)
                return found  # type: ignore[return-value]
        value = compute()  # outside the lock: concurrent misses may both compute, never block
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_MISSING = object()
