"""Failure handling below the generator: breaker, write-behind, deadlines against a real server."""

from __future__ import annotations

import threading
import time

import pytest

from specdec.cache import CircuitBreaker, get_store, parse_cache_url, release_store
from specdec.cache.writer import WriteBehind

from fixtures_redis import BackendCalls, timer_lateness


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_states():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state == "closed"
    b.record_success()  # a success resets the count
    for _ in range(3):
        b.record_failure()
    assert b.state == "open" and not b.allow() and b.times_opened == 1
    clock.now = 9.9
    assert not b.allow()
    clock.now = 10.0
    assert b.state == "half-open"
    assert b.allow()  # one probe
    assert not b.allow()  # and only one at a time
    b.record_failure()  # failed probe: open again for a full cool-down
    assert b.state == "open" and not b.allow()
    clock.now = 20.0
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


def test_write_behind_is_bounded_and_never_blocks():
    w = WriteBehind(max_queue=2)
    gate = threading.Event()
    ran = []
    assert w.submit(gate.wait)  # occupies the thread
    time.sleep(0.05)
    assert w.submit(lambda: ran.append(1)) and w.submit(lambda: ran.append(2))
    # Full: dropped at once. The gate is still shut, so a submit that waited for room would
    # never return (the suite's timeout would fail it), whatever the machine's speed.
    assert not w.submit(lambda: ran.append(3))
    assert w.dropped == 1 and not w.flush(timeout=0.05)
    gate.set()
    assert w.flush(timeout=2) and ran == [1, 2]
    w.submit(lambda: 1 / 0)  # a failing job is counted, the thread survives
    w.submit(lambda: ran.append(4))
    assert w.flush(timeout=2) and w.failed == 1 and ran == [1, 2, 4]
    w.close()
    assert not w.submit(lambda: None)


def _store(url: str, **opts):
    return get_store(parse_cache_url(url, **opts))


def test_never_started_server_fails_fast_and_trips_the_breaker(dead_redis_url):
    s = _store(dead_redis_url, deadline_ms=50, breaker_failures=2, breaker_cooldown_s=60)
    try:
        for _ in range(2):
            start = time.perf_counter()
            assert s.call("get", "k", default="fallback") == "fallback"
            took = time.perf_counter() - start
            # Connection refused: no waiting (beyond how late this machine's timers run now).
            assert took < 0.5 + 10 * timer_lateness(), took
        assert s.breaker.state == "open"
        with BackendCalls(s) as calls:
            for _ in range(100):
                assert s.call("mget", ["a"], default=None) is None
        assert calls.ops == []  # skipped without touching the network
        counts = s.counts()
        assert counts["failures"] == 2 and counts["short_circuits"] == 100
        assert s.error_count() == 102
        with pytest.raises(Exception):
            s.admin("ping")  # admin calls report the failure
    finally:
        release_store(s)


def _until_healthy(s, seconds: float = 10.0) -> None:
    """Write and read back "k" until both succeed: on a starved machine a healthy loopback
    call can still miss a 100 ms deadline now and then (and open the breaker for its cool-down)."""
    deadline = time.monotonic() + seconds
    while True:
        if s.call("set_many", [("k", b"v", 60)], default=False) is None and s.call("get", "k", default=None) == b"v":
            return
        assert time.monotonic() < deadline, "the server never answered within the deadline"
        time.sleep(s.config.breaker_cooldown_s)


def test_paused_server_costs_one_deadline_per_call_until_the_breaker_opens(redis_process):
    s = _store(redis_process.url, deadline_ms=100, breaker_failures=3, breaker_cooldown_s=0.5)
    try:
        _until_healthy(s)
        redis_process.pause()
        times = []
        late = timer_lateness()
        for _ in range(3):
            start = time.perf_counter()
            assert s.call("get", "k", default="fallback") == "fallback"
            times.append(time.perf_counter() - start)
        late = max(late, timer_lateness())
        # Each call waited about one deadline (connect succeeds: the kernel still accepts); the
        # upper margin grows with how late this machine's timers run now.
        assert all(0.05 < t < 1.0 + 10 * late for t in times), (times, late)
        assert s.breaker.state == "open"
        with BackendCalls(s) as calls:
            for _ in range(3):
                assert s.call("get", "k", default="fallback") == "fallback"
        assert calls.ops == []  # breaker open: no round trip, against one deadline per call before
        redis_process.resume()
        time.sleep(0.6)  # cool-down passes; the next call is the probe
        _until_healthy(s)
        assert s.breaker.state == "closed"
    finally:
        redis_process.resume()
        release_store(s)


def test_killed_and_restarted_server(redis_process):
    s = _store(redis_process.url, deadline_ms=100, breaker_failures=1, breaker_cooldown_s=0.2)
    try:
        s.call("set_many", [("k", b"v", 60)])
        redis_process.kill()
        start = time.perf_counter()
        assert s.call("get", "k", default="down") == "down"
        assert time.perf_counter() - start < 0.5 + 10 * timer_lateness()  # refused: no waiting
        assert s.breaker.state == "open"
        redis_process.restart()
        time.sleep(0.3)
        # A fresh server (nothing persisted): reachable again, the key is gone. (A starved
        # machine may let a healthy call miss the deadline: the breaker then cools down again.)
        until = time.monotonic() + 10
        while (value := s.call("get", "k", default="down")) == "down" and time.monotonic() < until:
            time.sleep(0.3)
        assert value is None
        assert s.breaker.state == "closed"
    finally:
        release_store(s)


def test_one_store_per_process_and_connection():
    a = _store("memory://shared-test", namespace="a")
    b = _store("memory://shared-test", namespace="b")
    c = _store("memory://shared-test", deadline_ms=7)
    try:
        assert a is b  # namespace is not part of the connection
        assert a is not c
        assert a.backend is c.backend  # the named in-process store is shared
    finally:
        for s in (a, b, c):
            release_store(s)
