"""One process-wide handle per cache server: backend, circuit breaker, write-behind, counters.

Hot-path code calls `store.call(...)`, which never raises: a connection failure, a
timeout or a missed whole-call deadline (connect and handshake included, see
deadline.py) counts a failure and feeds the breaker; any other error counts an error;
an open breaker skips the call and counts a short circuit. Each returns the caller's
default. Admin code (CLI, invalidation) calls `store.admin(...)`, which
raises, because a person asked for it and should hear that it failed.

Everyone in a process who opens the same URL with the same settings gets the same
CacheStore (`get_store`), so there is one connection pool, one breaker and one writer
thread per process and server.

Fork: threads do not survive os.fork (multiprocessing's "fork" start method included),
and a lock another thread held at that moment stays held in the child for ever. A child
keeps using the stores it inherited (a generator made before the fork holds one), so
an at-fork hook gives every live store new locks, a new writer thread (started on the
first write), a breaker without the parent's outstanding probe, and a backend that
opens its own connections; the parent's queued writes stay the parent's. A fork waits
for a write job that is running (each of its calls is bounded by the deadline), so no
lock a job takes is copied into the child held.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import Counter
from typing import Any, Callable

from .backend import Backend, BadReply, open_backend
from .breaker import CircuitBreaker
from .config import CacheConfig
from .deadline import WATCHDOG
from .keys import stats_key
from .writer import WriteBehind

log = logging.getLogger("specdec.cache")

_STORES: dict[tuple, "CacheStore"] = {}
_STORES_LOCK = threading.Lock()
_LIVE: "weakref.WeakSet[CacheStore]" = weakref.WeakSet()  # every store of this process, for the fork hook
_SHARED_STATS_INTERVAL_S = 1.0


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    try:
        from redis import exceptions as rex

        types += [rex.ConnectionError, rex.TimeoutError]
        for name in ("ClusterDownError", "ClusterError", "MaxConnectionsError", "SlotNotCoveredError"):
            if hasattr(rex, name):
                types.append(getattr(rex, name))
    except ImportError:  # pragma: no cover - redis is a hard dependency
        pass
    return tuple(types)


_CONNECTION_ERRORS = _connection_error_types()


class CacheStore:
    """Backend + breaker + writer + counters for one server, shared in a process."""

    def __init__(self, config: CacheConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend if backend is not None else open_backend(config)
        # In-process backends cannot hang; only network calls run under the watchdog.
        self._deadline_s = config.deadline_ms / 1000.0 if self.backend.kind == "redis" else None
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self.writer = WriteBehind(config.queue_size)
        self.epochs: dict[str, int] = {}  # epoch key -> last value seen (optimistic reads)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._shared: dict[str, Counter[str]] = {}  # namespace -> counters not yet in Redis
        self._shared_flush_queued = False
        self._last_shared_flush = 0.0
        self._last_log = 0.0
        self.refs = 0
        _LIVE.add(self)

    def _after_fork(self) -> None:
        """Make this store usable in a forked child (see the module docstring)."""
        self._lock = threading.Lock()
        self._shared = {}  # the parent's pending counters: the parent writes them
        self._shared_flush_queued = False
        self.writer.after_fork()
        self.breaker.after_fork()
        after_fork = getattr(self.backend, "after_fork", None)
        if after_fork is not None:
            after_fork()

    # -- counters --

    def count(self, name: str, n: int = 1) -> None:
        """Add to a local counter."""
        with self._lock:
            self._counts[name] += n

    def counts(self) -> dict[str, int]:
        """A copy of the local counters (plus the writer's)."""
        with self._lock:
            out = dict(self._counts)
        out["writes_dropped"] = self.writer.dropped
        out["write_jobs_failed"] = self.writer.failed
        return out

    def error_count(self) -> int:
        """Failures + errors + short circuits + corrupt values + dropped writes, cumulative."""
        with self._lock:
            c = self._counts
            total = c["failures"] + c["errors"] + c["short_circuits"] + c["corrupt"]
        return total + self.writer.dropped + self.writer.failed

    def count_shared(self, namespace: str, name: str, n: int = 1) -> None:
        """Add to a counter kept in the server's `specdec:{ns}:stats` hash (written behind)."""
        with self._lock:
            self._shared.setdefault(namespace, Counter())[name] += n
            due = (
                not self._shared_flush_queued
                and time.monotonic() - self._last_shared_flush >= _SHARED_STATS_INTERVAL_S
            )
            if due:
                self._shared_flush_queued = True
        if due and not self.writer.submit(self.flush_shared_counts):
            with self._lock:
                self._shared_flush_queued = False

    def flush_shared_counts(self) -> None:
        """Write the pending shared counters (runs on the writer thread)."""
        with self._lock:
            pending, self._shared = self._shared, {}
            self._shared_flush_queued = False
            self._last_shared_flush = time.monotonic()
        for namespace, counts in pending.items():
            self.call("hincrby_many", stats_key(namespace), dict(counts))

    # -- calls --

    def _log(self, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_log > 10.0:  # one line per 10 s, not one per request
            self._last_log = now
            log.warning("%s (%s: %s); generation continues without it", message, type(exc).__name__, exc)

    def call(self, op: str, *args: Any, default: Any = None) -> Any:
        """Run backend.op(*args) under the breaker; never raise, return `default` on failure."""
        if not self.breaker.allow():
            self.count("short_circuits")
            return default
        watched = None
        try:
            if self._deadline_s is None:
                result = getattr(self.backend, op)(*args)
            else:
                with WATCHDOG.watch(self._deadline_s) as watched:
                    result = getattr(self.backend, op)(*args)
                if watched.expired:  # answered, but too late: a miss all the same
                    raise TimeoutError(f"cache call {op} exceeded its deadline of {self.config.deadline_ms:g} ms")
        except Exception as exc:
            # Final once the watch has ended: the watchdog never touches a finished call.
            expired = watched is not None and _missed(watched)
            if expired or isinstance(exc, _CONNECTION_ERRORS):
                self.breaker.record_failure()
                self.count("failures")
                if expired:
                    self.count("deadline_misses")
                self._log(f"cache server {self.config.describe()} unreachable or too slow", exc)
            else:  # the server answered with an error: not an outage
                self.breaker.record_success()
                self.count("errors")
                if isinstance(exc, BadReply):  # an answer of the wrong type, shape or size
                    self.count("bad_replies")
                self._log(f"cache call {op} failed", exc)
            return default
        self.breaker.record_success()
        return result

    def admin(self, op: str, *args: Any) -> Any:
        """Run backend.op(*args) directly and let errors propagate (CLI, invalidation)."""
        return getattr(self.backend, op)(*args)

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue a write-behind job; False if it was dropped."""
        return self.writer.submit(job)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Write pending counters and wait for the write-behind queue to drain."""
        with self._lock:
            has_shared = any(self._shared.values())
        if has_shared:
            self.writer.submit(self.flush_shared_counts)
        return self.writer.flush(timeout)

    def close(self) -> None:
        """Drain (briefly), stop the writer thread and close connections."""
        self.flush(timeout=2.0)
        self.writer.close(timeout=2.0)
        self.backend.close()


def _missed(call) -> bool:
    """Whether a failed watched call outlived its deadline: the watchdog expired it, or the calling
    thread itself found the deadline passed (on a starved machine it may notice before the
    watchdog thread wakes; deadline.py refuses to start a connect or command then)."""
    return call.expired or time.monotonic() >= call.deadline


def get_store(config: CacheConfig) -> CacheStore:
    """The process's shared CacheStore for `config`'s connection (created on first use)."""
    key = (os.getpid(), config.connection_id)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = CacheStore(config)
        store.refs += 1
        return store


def release_store(store: CacheStore) -> None:
    """Drop one reference; the last one closes the store."""
    with _STORES_LOCK:
        store.refs -= 1
        if store.refs > 0:
            return
        for key, value in list(_STORES.items()):
            if value is store:
                del _STORES[key]
    store.close()


def _before_fork() -> None:
    """os.register_at_fork hook: no write job runs across the fork (see WriteBehind.hold_for_fork)."""
    for store in list(_LIVE):
        store.writer.hold_for_fork()


def _after_fork_in_parent() -> None:
    for store in list(_LIVE):
        store.writer.release_after_fork()


def _after_fork_in_child() -> None:
    """os.register_at_fork hook: every store inherited from the parent works in the child."""
    global _STORES_LOCK
    _STORES_LOCK = threading.Lock()
    pid = os.getpid()
    # The inherited stores are this process's now: get_store finds them, atexit drains them.
    for key in list(_STORES):
        _STORES[(pid, key[1])] = _STORES.pop(key)
    for store in list(_LIVE):
        store._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
    )


@atexit.register
def _drain_at_exit() -> None:
    # Give queued writes a short chance to land; never hold up interpreter exit for long.
    pid = os.getpid()
    deadline = time.monotonic() + 3.0
    for (owner, _), store in list(_STORES.items()):
        if owner == pid:
            store.flush(timeout=max(0.0, deadline - time.monotonic()))
