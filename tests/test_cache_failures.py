"""Redis failing under the generator: never started, killed mid-run, paused (SIGSTOP).

Every generation must complete with exactly the output it has without a cache; the
failures show up in stats.cache_errors; a call costs about one deadline until the
breaker opens and ~0 after. Timing assertions are deliberately loose (shared CI cores).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fixtures_redis import BackendCalls, timer_lateness
from specdec import SpeculativeGenerator
from specdec.caching import CacheLayer
from specdec.params import make_params

NEW = 16
WORKLOAD = [
    ("def add(a, b):", dict(drafter="none")),
    ("def add(a, b):", dict(drafter="cache", num_draft_tokens=4)),
    ("class Point:", dict(drafter="ngram", num_draft_tokens=3)),
    ("for i in range(10):", dict(temperature=0.9, seed=7, drafter="ngram", num_draft_tokens=3)),
    ("import os", dict(temperature=0.9, seed=8, drafter="none")),
]
# Without a cache: greedy output is the same whatever the drafter, so "cache" becomes "none".
UNCACHED = [(p, {**kw, "drafter": "none"} if kw["drafter"] == "cache" else kw) for p, kw in WORKLOAD]


@pytest.fixture(scope="module")
def gen(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)


@pytest.fixture(scope="module")
def expected(gen):
    """Outputs of the workload without any cache."""
    return [gen.generate(p, max_new_tokens=NEW, ignore_eos=True, cache=None, **kw)[0].token_ids for p, kw in UNCACHED]


def run_workload(gen, layer):
    return [gen.generate(p, max_new_tokens=NEW, ignore_eos=True, cache=layer, **kw)[0] for p, kw in WORKLOAD]


def timed_lookup(layer, gen) -> float:
    ids = gen.tokenizer("def add(a, b):")["input_ids"]
    params = make_params(max_new_tokens=NEW, ignore_eos=True)
    start = time.perf_counter()
    assert layer.lookup(ids, "def add(a, b):", params) is None
    return time.perf_counter() - start


def skips_the_server(layer, gen) -> bool:
    """A lookup and three record() calls with no server round trip on the calling thread:
    an open breaker answers lookups at once and writes are only queued. Counted, not timed
    (a starved machine can take 10 ms for anything)."""
    ids = gen.tokenizer("x")["input_ids"]
    with BackendCalls(layer.store) as calls:
        assert layer.lookup(ids, "x", make_params(max_new_tokens=NEW, ignore_eos=True)) is None
        for i in range(3):
            layer.record(ids, "x", make_params(), [1, 2, 3 + i], "length")
        layer.flush()  # the writer runs the queued writes; the open breaker skips them too
    return calls.ops == []


def test_never_started(gen, expected, dead_redis_url):
    layer = CacheLayer.open(dead_redis_url, gen, deadline_ms=50, breaker_failures=2, breaker_cooldown_s=60)
    try:
        results = run_workload(gen, layer)
        assert [r.token_ids for r in results] == expected
        assert not any(r.stats.cache_hit for r in results)
        assert results[0].stats.cache_errors > 0
        assert layer.store.breaker.state == "open"
        assert skips_the_server(layer, gen)  # breaker open: no network at all
    finally:
        layer.close()


def test_killed_mid_run(gen, expected, redis_process):
    layer = CacheLayer.open(redis_process.url, gen, deadline_ms=100, breaker_failures=2, breaker_cooldown_s=0.3)
    # Same server, response cache off: every request decodes and the drafter reads Redis per step.
    decoding = CacheLayer.open(redis_process.url, gen, response_cache=False, deadline_ms=100, breaker_failures=2, breaker_cooldown_s=0.3)
    try:
        assert [r.token_ids for r in run_workload(gen, layer)] == expected  # fills the cache
        layer.flush()
        # Healthy so far, apart from a call that a starved machine let miss its deadline.
        healthy_errors = layer.error_count()
        killer = threading.Timer(0.05, redis_process.kill)
        killer.start()
        outputs = [[r.token_ids for r in run_workload(gen, decoding)] for _ in range(2)]  # dies in here
        killer.join()
        assert redis_process.proc.poll() is not None  # really killed
        assert all(o == expected for o in outputs)
        after = run_workload(gen, layer)
        assert [r.token_ids for r in after] == expected and not any(r.stats.cache_hit for r in after)
        assert layer.error_count() > healthy_errors
        # Back up (empty: nothing persisted): after the cool-down the cache works again.
        redis_process.restart()
        time.sleep(0.4)
        # Writes racing the breaker's single half-open probe may be skipped: allow a few rounds.
        hit = False
        for _ in range(3):
            assert [r.token_ids for r in run_workload(gen, layer)] == expected
            layer.flush()
            again = run_workload(gen, layer)
            assert [r.token_ids for r in again] == expected
            hit = again[0].stats.cache_hit
            if hit:
                break
        assert hit
    finally:
        decoding.close()
        layer.close()


def test_paused(gen, expected, redis_process):
    # The deadline bounds a whole call (connect, handshake, every read): keep it well above
    # a loopback round trip on a loaded CI machine, so only the pause makes calls miss it.
    deadline = 0.25
    layer = CacheLayer.open(redis_process.url, gen, deadline_ms=deadline * 1000, breaker_failures=3, breaker_cooldown_s=60)
    try:
        run_workload(gen, layer)
        layer.flush()
        assert run_workload(gen, layer)[0].stats.cache_hit
        redis_process.pause()
        # A lookup against a stopped server waits about one deadline, not longer.
        late = timer_lateness()
        first = timed_lookup(layer, gen)
        late = max(late, timer_lateness())
        assert 0.5 * deadline < first < 10 * deadline + 10 * late, (first, late)
        results = run_workload(gen, layer)
        assert [r.token_ids for r in results] == expected
        assert not any(r.stats.cache_hit for r in results)
        assert sum(r.stats.cache_errors for r in results) > 0
        assert layer.store.breaker.state == "open"
        assert skips_the_server(layer, gen)  # once open: no added latency, no wait on the server
    finally:
        redis_process.resume()
        layer.close()
