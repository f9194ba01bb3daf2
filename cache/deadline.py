"""A deadline for a whole Redis call: connect, TLS and protocol handshake, every read and write.

redis-py's socket_timeout bounds each socket read, not a call: a peer that answers one
byte at a time keeps a call alive for as long as it drips. Here the calling thread
runs the call as usual (no thread hop on the hot path) inside `watchdog.watch(s)`;
the connection classes below report every socket the call touches (a new socket right
after it connects, before the TLS and protocol handshakes; a pooled one at each
command). One watchdog thread per process sleeps until the earliest deadline; a call
still running then has its sockets shut down, which makes the blocked read return at
once, so redis-py raises ConnectionError and drops the connection. The call then
counts as a deadline miss (store.py), like any connection failure, for the breaker.

Cost on the hot path: one lock, a heap push and (only when the watchdog is idle) one
notify per call.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import socket
import threading
import time
import weakref
from typing import Any

import redis

_MAX_WAIT_S = 60.0  # the watchdog thread's longest single sleep


class _Call:
    __slots__ = ("deadline", "sockets", "done", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.sockets: list[socket.socket] = []
        self.done = False
        self.expired = False


class Watchdog:
    """Shuts down the sockets of calls that outlive their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Call]] = []
        self._seq = itertools.count()
        self._local = threading.local()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.killed: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()  # shut down by a deadline
        # socket -> the call using it now. A pooled socket moves to the next call as soon as
        # the last one releases it, which may be before that call's watch has ended: only
        # the current owner's deadline may shut it down.
        self._owner: "weakref.WeakKeyDictionary[socket.socket, _Call]" = weakref.WeakKeyDictionary()
        self.expired_calls = 0

    def after_fork(self) -> None:
        """In a forked child: a new lock, no calls, no thread (started by the next call).
        The parent's thread does not exist here and may have held the lock at the fork."""
        self._cond = threading.Condition()
        self._heap = []
        self._local = threading.local()
        self._thread = None
        self._owner = weakref.WeakKeyDictionary()

    def watch(self, seconds: float) -> "_Watch":
        """Context manager bounding everything the current thread does with Redis to `seconds`."""
        return _Watch(self, seconds)

    def current(self) -> _Call | None:
        """The call the current thread is running under a deadline, if any."""
        return getattr(self._local, "call", None)

    def remaining(self) -> float | None:
        """Seconds left to the current call's deadline (None outside a watched call)."""
        call = self.current()
        return None if call is None else call.deadline - time.monotonic()

    def attach(self, sock: socket.socket | None) -> None:
        """Put `sock` under the current call's deadline (no-op outside a watched call)."""
        call = self.current()
        if call is None or sock is None:
            return
        with self._cond:
            self._owner[sock] = call
            if call.expired:
                self._kill(sock)
            elif not any(s is sock for s in call.sockets):
                call.sockets.append(sock)

    def _start(self, call: _Call) -> None:
        self._local.call = call
        with self._cond:
            if self._thread is None or self._pid != _getpid() or not self._thread.is_alive():
                self._pid = _getpid()  # a forked child needs its own thread
                self._thread = threading.Thread(target=self._run, name="specdec-cache-watchdog", daemon=True)
                self._thread.start()
            wake = not self._heap or call.deadline < self._heap[0][0]
            heapq.heappush(self._heap, (call.deadline, next(self._seq), call))
            if wake:
                self._cond.notify()

    def _end(self, call: _Call) -> bool:
        self._local.call = None
        with self._cond:
            call.done = True  # removed lazily from the heap
            return call.expired

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, call = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    # Bounded: Condition.wait raises OverflowError past threading.TIMEOUT_MAX,
                    # which would kill this thread; a long wait simply wakes up and waits again.
                    self._cond.wait(min(wait, _MAX_WAIT_S))
                    continue
                heapq.heappop(self._heap)
                call.expired = True
                self.expired_calls += 1
                for sock in call.sockets:
                    if self._owner.get(sock) is call:
                        self._kill(sock)

    def _kill(self, sock: socket.socket) -> None:
        # The plain socket's shutdown (not SSLSocket's, which touches TLS state another
        # thread is using): the file descriptor stops, a blocked recv returns at once.
        self.killed.add(sock)
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class _Watch:
    def __init__(self, watchdog: Watchdog, seconds: float) -> None:
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"a call deadline must be a finite number of seconds > 0, got {seconds!r}")
        self.watchdog = watchdog
        self.call = _Call(time.monotonic() + seconds)

    def __enter__(self) -> _Call:
        self.watchdog._start(self.call)
        return self.call

    def __exit__(self, *exc: Any) -> None:
        self.watchdog._end(self.call)


def _getpid() -> int:
    return os.getpid()


WATCHDOG = Watchdog()
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=WATCHDOG.after_fork)


def _check_deadline() -> None:
    """Raise if the current call is past its deadline: never start a connect or a command then.

    Without this, a connection whose socket the watchdog shut down would reconnect, have
    the new socket shut down at once (the call has expired), reconnect again, and so on.
    """
    call = WATCHDOG.current()
    if call is not None and (call.expired or call.deadline <= time.monotonic()):
        raise redis.exceptions.TimeoutError("the whole-call deadline passed")


class _DeadlineMixin:
    """Reports the connection's sockets to the watchdog and caps connect at the time left."""

    def _connect(self):  # type: ignore[override]
        _check_deadline()
        left = WATCHDOG.remaining()
        configured = self.socket_connect_timeout  # type: ignore[has-type]
        if left is not None:
            # The connect syscall cannot be interrupted from outside: bound it directly.
            self.socket_connect_timeout = max(0.001, min(configured or left, left))
        try:
            sock = super()._connect()  # type: ignore[misc]
        finally:
            self.socket_connect_timeout = configured
        WATCHDOG.attach(sock)
        return sock

    def _wrap_socket_with_ssl(self, sock):  # SSLConnection only: watch the raw socket before the TLS handshake
        WATCHDOG.attach(sock)
        return super()._wrap_socket_with_ssl(sock)  # type: ignore[misc]

    def send_packed_command(self, command, check_health=True):  # type: ignore[override]
        _check_deadline()
        sock = self._sock  # type: ignore[attr-defined]
        if sock is not None and sock in WATCHDOG.killed:
            self.disconnect()  # type: ignore[attr-defined]  # shut down by an earlier deadline: reconnect
        else:
            WATCHDOG.attach(sock)
        return super().send_packed_command(command, check_health)  # type: ignore[misc]


class DeadlineConnection(_DeadlineMixin, redis.Connection):
    """redis.Connection whose calls obey the watchdog's whole-call deadline."""


class DeadlineSSLConnection(_DeadlineMixin, redis.SSLConnection):
    """redis.SSLConnection whose calls (TLS handshake included) obey the whole-call deadline."""


class DeadlineUnixConnection(_DeadlineMixin, redis.UnixDomainSocketConnection):
    """redis.UnixDomainSocketConnection whose calls obey the whole-call deadline."""


def connection_class(scheme: str) -> type:
    """The deadline-aware connection class for a URL scheme (redis, rediss, unix)."""
    return {"rediss": DeadlineSSLConnection, "unix": DeadlineUnixConnection}.get(scheme, DeadlineConnection)
