"""A process forked after the cache was opened writes to it: threads do not survive fork.

The parent opens the cache (a generator with a cache, or a store that has already
written), which starts its writer thread; a child forked afterwards (os.fork or
multiprocessing's "fork") must get a writer, a breaker and connections of its own, and
its writes must reach the real redis-server, where the parent then finds them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.cache import Namespace, NormalizationOptions, ResponseCache, ResponseRequest, get_store, parse_cache_url
from specdec.cache.store import release_store

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

GREEDY = dict(max_new_tokens=8, ignore_eos=True, drafter="none")


def _wait(pid: int, timeout: float = 60.0) -> int:
    """The exit status of child `pid`; kills it (and fails) if it runs past `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} did not finish in {timeout} s")


def _child(body) -> int:
    """Fork; the child runs body() -> exit code and leaves through os._exit (no pytest teardown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            torch.set_num_threads(1)
            code = body()
        finally:
            os._exit(code)
    return _wait(pid)


def test_generator_forked_after_creation_writes_to_the_cache(redis_server, cache_namespace, cache_models):
    url = f"{redis_server.url}?namespace={cache_namespace}&deadline_ms=10000"
    gen = SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64, cache=url)
    layer = gen.cache_layer
    # The parent has used the cache: its writer thread runs (generator creation alone starts it).
    gen.generate("for i in range(3):", **GREEDY)
    assert layer.flush(10)
    prompt = "def add(a, b):"

    def body() -> int:
        result = gen.generate(prompt, **GREEDY)[0]
        if result.stats.cache_hit:
            return 4  # the parent never wrote this prompt
        return 0 if layer.flush(10) else 1

    assert _child(body) == 0, "the forked child's writes never reached the cache"
    again = gen.generate(prompt, **GREEDY)[0]
    assert again.stats.cache_hit and again.stats.cache_kind == "verified"
    layer.close()


def _request(j: int) -> ResponseRequest:
    return ResponseRequest(
        model="m" * 32, tokenizer="t" * 32, normalization=NormalizationOptions().spec(), prompt_ids=(j, j + 1),
        sampling={"mode": "greedy", "ignore_eos": False}, seed=None, max_new_tokens=8,
    )


def _write_in_child(store, namespace: str, queue) -> None:
    rc = ResponseCache(store, Namespace(store, namespace), ttl_s=60, max_value_bytes=1 << 20)
    rc.put(_request(7), [7, 8, 9], "stop")
    queue.put((store.flush(10), store.breaker.state, store.writer.dropped))


def test_store_in_multiprocessing_fork_child(redis_server, cache_namespace):
    store = get_store(parse_cache_url(redis_server.url, namespace=cache_namespace, deadline_ms=10000))
    try:
        rc = ResponseCache(store, Namespace(store, cache_namespace), ttl_s=60, max_value_bytes=1 << 20)
        rc.lookup(_request(1))  # epochs known, connection open
        rc.put(_request(1), [1], "stop")
        assert store.flush(10)  # the parent's writer thread has run
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_write_in_child, args=(store, cache_namespace, queue))
        child.start()
        flushed, breaker, dropped = queue.get(timeout=60)
        child.join(30)
        assert child.exitcode == 0
        assert flushed and breaker == "closed" and dropped == 0
        found = ResponseCache(store, Namespace(store, cache_namespace), ttl_s=60, max_value_bytes=1 << 20)
        hit = found.lookup(_request(7))
        assert hit is not None and hit.tokens == [7, 8, 9]
    finally:
        release_store(store)


def test_child_shares_one_store_per_connection(redis_server, cache_namespace):
    """get_store in the child returns the inherited store (one pool and writer per process),
    and the child's writer is its own thread, not a copy of the parent's."""
    config = parse_cache_url(redis_server.url, namespace=cache_namespace, deadline_ms=10000)
    store = get_store(config)
    try:
        store.submit(lambda: None)
        assert store.flush(10)
        parent_writer = store.writer

        def body() -> int:
            again = get_store(config)
            try:
                same = again is store and store.writer is parent_writer
                ran = []
                store.submit(lambda: ran.append(os.getpid()))
                ok = store.flush(10) and ran == [os.getpid()]
                return 0 if same and ok else 1
            finally:
                release_store(again)

        assert _child(body) == 0
    finally:
        release_store(store)


def test_fork_during_a_write_job_leaves_no_lock_held_in_the_child(redis_server, cache_namespace):
    """A job running on the writer thread at the fork (here: holding a lock, as a response
    cache's job holds its pending-writes lock) finishes before the fork happens, so the child
    never inherits that lock held."""
    import threading

    store = get_store(parse_cache_url(redis_server.url, namespace=cache_namespace, deadline_ms=10000))
    try:
        lock, started = threading.Lock(), threading.Event()

        def job() -> None:
            with lock:
                started.set()
                time.sleep(0.3)

        assert store.submit(job)
        assert started.wait(10)  # the job runs and holds the lock now

        def body() -> int:
            if not lock.acquire(timeout=2):
                return 1  # inherited held: every later job needing it would hang
            lock.release()
            ran = []
            store.submit(lambda: ran.append(True))
            return 0 if store.flush(10) and ran == [True] else 2

        assert _child(body) == 0
        assert store.flush(10)
    finally:
        release_store(store)


def test_a_probe_in_flight_at_the_fork_does_not_block_the_child(redis_server, cache_namespace):
    """The parent's breaker has let one half-open probe out (its thread will report back, in
    the parent only): the child's breaker must not wait for that report for ever."""
    config = parse_cache_url(redis_server.url, namespace=cache_namespace, deadline_ms=10000, breaker_cooldown_s=0)
    store = get_store(config)
    try:
        for _ in range(config.breaker_failures):
            store.breaker.record_failure()
        assert store.breaker.allow()  # the probe: half-open, one call out
        assert not store.breaker.allow()

        def body() -> int:
            ok = store.call("ping", default=False) is True
            return 0 if ok and store.counts().get("short_circuits", 0) == 0 else 1

        assert _child(body) == 0
        store.breaker.record_success()
    finally:
        release_store(store)
