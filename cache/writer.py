"""Write-behind: a bounded queue drained by one daemon thread, so writes never block a response.

A full queue drops the new job and counts it: under a slow or dead server the cache
loses writes, never latency. `flush()` waits for the queue to drain (tests, shutdown).
A forked child starts its own thread (`after_fork`, called by specdec.cache.store).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

log = logging.getLogger("specdec.cache")
# The longest a fork waits for a running write job (each Redis call in one is bounded by its deadline).
_FORK_WAIT_S = 5.0


class WriteBehind:
    """One background thread running submitted jobs in order."""

    def __init__(self, max_queue: int = 1024, name: str = "specdec-cache-writer") -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self.max_queue = max_queue
        self.name = name
        self._jobs: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # Held while a job runs. A fork waits for it (hold_for_fork), so that no lock a job
        # takes (the store's, a backend's, a response cache's) is copied into the child held.
        self._gate = threading.Lock()
        self._gate_held = False
        self.dropped = 0
        self.failed = 0
        self.done = 0

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue `job`; return False (and count a drop) if the queue is full or closed."""
        with self._cond:
            if self._closed or len(self._jobs) >= self.max_queue:
                self.dropped += 1
                return False
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def hold_for_fork(self, timeout: float = _FORK_WAIT_S) -> None:
        """Before a fork: wait for the running job to end (at most `timeout`) and keep the next
        one from starting until release_after_fork (parent) or after_fork (child)."""
        if self._thread is threading.current_thread():  # a job that forks: it holds the gate itself
            return
        self._gate_held = self._gate.acquire(timeout=timeout)

    def release_after_fork(self) -> None:
        """In the parent after a fork: let the writer go on."""
        if self._gate_held:
            self._gate_held = False
            self._gate.release()

    def after_fork(self) -> None:
        """In a forked child: threads do not survive fork, so start over with new locks and a new
        thread (started on the next submit). Jobs queued before the fork belong to the parent,
        which runs them; running them here too would write everything twice."""
        self._jobs = deque()
        self._cond = threading.Condition()
        self._gate = threading.Lock()
        self._gate_held = False
        self._busy = False
        self._thread = None

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._jobs) + self._busy

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every queued job has run; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout=timeout)

    def close(self, timeout: float | None = 2.0) -> None:
        """Run what is queued (up to `timeout`), then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._jobs.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if self._closed and not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                with self._gate:
                    job()
                self.done += 1
            except Exception:  # a job failing must not kill the writer
                self.failed += 1
                log.debug("cache write-behind job failed", exc_info=True)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
