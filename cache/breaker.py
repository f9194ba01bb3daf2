"""Circuit breaker: stop calling a failing server for a cool-down, then probe once.

closed     calls go through; `failure_threshold` consecutive failures open it
open       calls are skipped (cost ~0) until `cooldown_s` has passed
half-open  exactly one probe call goes through; success closes, failure re-opens
"""

from __future__ import annotations

import threading
import time
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Thread-safe breaker shared by every caller of one server in a process."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold={failure_threshold} must be >= 1")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s={cooldown_s} must be >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self.times_opened = 0

    def after_fork(self) -> None:
        """In a forked child: a new lock (another thread may have held the old one at the fork),
        and no probe outstanding (the thread running it does not exist here)."""
        self._lock = threading.Lock()
        self._probe_out = False

    @property
    def state(self) -> str:
        """'closed', 'open' or 'half-open' (an open breaker past its cool-down reads half-open)."""
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
                return HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """May a call go to the server now?"""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN:
                if self._clock() - self._opened_at < self.cooldown_s:
                    return False
                self._state = HALF_OPEN
                self._probe_out = False
            if self._probe_out:  # half-open: one probe at a time
                return False
            self._probe_out = True
            return True

    def record_success(self) -> None:
        """A call succeeded: close the breaker."""
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._probe_out = False

    def record_failure(self) -> None:
        """A call failed: count it, and open the breaker at the threshold or after a failed probe."""
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                if self._state != OPEN:
                    self.times_opened += 1
                self._state = OPEN
                self._opened_at = self._clock()
                self._probe_out = False
