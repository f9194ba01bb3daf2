"""The serving scheduler (specdec.serving.scheduler): requests submitted from several threads
join one running batch between steps and get exactly what in-process generate() gives them
alone; cancelled and late rows leave at the next step; a full queue refuses; shutdown
finishes or cancels what is in flight. The bundled pair in float64, so batching cannot move
a near-tie."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.serving import Failed, Finished, QueueFull, Scheduler, SchedulerClosed, TextDelta

REQUESTS = [
    ("def fib(n):", dict(max_new_tokens=300, ignore_eos=True)),  # still decoding when the others arrive
    ("import os\n", dict(max_new_tokens=30, temperature=0.7, seed=3)),
    ("class Stack:", dict(max_new_tokens=40, stop=["\n\n"])),
    ("for i in range(10):", dict(max_new_tokens=36)),
    ("x = [", dict(max_new_tokens=12, temperature=0.7, seed=5)),
    ("def main():", dict(max_new_tokens=20, drafter="ngram", num_draft_tokens=3)),
    ("def add(a, b):", dict(max_new_tokens=28, stop_token_ids=[25])),
    ("import sys\n", dict(max_new_tokens=18, temperature=0.9, top_k=20, top_p=0.9, seed=3)),
]


@pytest.fixture(scope="module")
def gen():
    return SpeculativeGenerator.from_pretrained("bundled", dtype=torch.float64)


@pytest.fixture(scope="module")
def alone(gen):
    """Each request by in-process generate(), alone."""
    return [gen.generate(p, **kw)[0] for p, kw in REQUESTS]


class Collector:
    """A request's events, in order, with an Event set when it ends."""

    def __init__(self) -> None:
        self.events: list = []
        self.ended = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.ended.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def test_concurrent_requests_share_a_batch_and_equal_generate_alone(gen, alone):
    """Eight requests from eight threads, arriving while others decode: greedy, seeded
    sampled, stop strings and stop ids, other drafters. Rows of the same settings run in one
    batch (rows joined a running one), and every output, streamed text included, equals
    generate() for that request alone."""
    scheduler = Scheduler(gen, max_batch=8).start()
    collectors = [Collector() for _ in REQUESTS]
    tickets: list = [None] * len(REQUESTS)

    def send(i: int) -> None:
        prompt, kw = REQUESTS[i]
        tickets[i] = scheduler.submit(prompt, on_event=collectors[i], **kw)

    # The first request starts alone; the others arrive while it decodes (greedy ones join its
    # batch, whatever their stop rules; seeded sampled ones share theirs, each with its settings).
    send(0)
    first = collectors[0]
    deadline = time.monotonic() + 60
    while not any(isinstance(e, TextDelta) for e in first.events) and time.monotonic() < deadline:
        time.sleep(0.005)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(1, len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ticket in enumerate(tickets):
        result = ticket.wait(120)
        assert result.token_ids == alone[i].token_ids, REQUESTS[i]
        assert result.text == alone[i].text == collectors[i].text
        assert result.finish_reason == alone[i].finish_reason
        assert isinstance(collectors[i].events[-1], Finished)
    assert scheduler.counts["rows_joined"] >= 1
    assert scheduler.shutdown(timeout=30)


def started_stream(scheduler, max_new_tokens: int):
    """A long request, once its first text has arrived: (ticket, its events)."""
    events = Collector()
    ticket = scheduler.submit("def fib(n):", on_event=events, max_new_tokens=max_new_tokens, ignore_eos=True)
    deadline = time.monotonic() + 60
    while not events.text and time.monotonic() < deadline:
        time.sleep(0.005)
    return ticket, events


def test_a_cancelled_row_leaves_at_the_next_step(gen):
    scheduler = Scheduler(gen).start()
    ticket, events = started_stream(scheduler, 400)
    ticket.cancel()
    result = ticket.wait(30)
    assert result.finish_reason == "cancelled" and 0 < len(result.token_ids) < 400
    assert result.text == events.text  # what was streamed before it left
    assert scheduler.running == 0
    assert scheduler.shutdown(timeout=30)


def test_a_request_past_its_deadline_ends_with_what_it_has(gen):
    scheduler = Scheduler(gen).start()
    ticket = scheduler.submit("def fib(n):", deadline_s=0.05, max_new_tokens=900, ignore_eos=True)
    result = ticket.wait(60)
    assert result.finish_reason == "deadline" and len(result.token_ids) < 900
    assert scheduler.shutdown(timeout=30)


def test_a_full_queue_refuses_and_shutdown_cancels_what_waits(gen):
    scheduler = Scheduler(gen, max_queue=2)  # not started: requests wait
    waiting = [scheduler.submit("def f():", max_new_tokens=4) for _ in range(2)]
    with pytest.raises(QueueFull) as refused:
        scheduler.submit("def f():", max_new_tokens=4)
    assert refused.value.retry_after >= 1
    assert scheduler.queue_length == 2
    assert scheduler.shutdown(timeout=5)
    assert [t.wait(5).finish_reason for t in waiting] == ["cancelled", "cancelled"]
    with pytest.raises(SchedulerClosed):
        scheduler.submit("def f():", max_new_tokens=4)


def test_bad_requests_fail_before_they_queue(gen):
    scheduler = Scheduler(gen, max_queue=1)
    for kwargs in (dict(temperature=-1), dict(max_new_tokens="many"), dict(top_p=0), dict(drafter="nope")):
        with pytest.raises((ValueError, TypeError)):
            scheduler.submit("def f():", **kwargs)
    with pytest.raises(ValueError):
        scheduler.submit("", max_new_tokens=4)
    with pytest.raises(ValueError):
        scheduler.submit("def f():", deadline_s=0)
    assert scheduler.queue_length == 0
    scheduler.shutdown(timeout=5)


def test_graceful_shutdown_finishes_rows_in_flight(gen, alone):
    scheduler = Scheduler(gen).start()
    tickets = [scheduler.submit(p, **kw) for p, kw in REQUESTS[:3]]
    assert scheduler.shutdown(cancel=False, timeout=120)
    for i, ticket in enumerate(tickets):
        assert ticket.done and ticket.result.token_ids == alone[i].token_ids


def test_shutdown_with_cancel_ends_rows_now(gen):
    scheduler = Scheduler(gen).start()
    ticket, _ = started_stream(scheduler, 900)
    assert scheduler.shutdown(cancel=True, timeout=30)
    assert ticket.wait(5).finish_reason == "cancelled"


def test_cache_hits_are_answered_before_joining(gen, redis_server, cache_namespace):
    """With a response cache, a repeated greedy request is a verified hit (its checking
    forward confirms it to the end), answered without joining a batch, and equal."""
    cached = SpeculativeGenerator(gen.target_model, gen.tokenizer, gen.draft_model, draft_head=gen.draft_head,
                                  cache=f"{redis_server.url}?namespace={cache_namespace}")
    scheduler = Scheduler(cached).start()
    first = scheduler.submit("def fib(n):", max_new_tokens=16).wait(60)
    cached.cache_layer.flush(timeout=10)
    started = scheduler.counts["batches_started"]
    second = scheduler.submit("def fib(n):", max_new_tokens=16).wait(60)
    assert second.token_ids == first.token_ids and second.stats.cache_kind == "verified"
    assert scheduler.counts["batches_started"] == started
    assert scheduler.shutdown(timeout=30)


def test_redis_killed_and_restarted_mid_run_changes_nothing(gen, alone, redis_process, cache_namespace):
    """Requests in flight while the cache's Redis dies and comes back: none fails, none changes
    (their outputs equal generate() alone), and the cache serves hits again afterwards."""
    cached = SpeculativeGenerator(gen.target_model, gen.tokenizer, gen.draft_model, draft_head=gen.draft_head,
                                  cache=f"{redis_process.url}?namespace={cache_namespace}&deadline_ms=200")
    scheduler = Scheduler(cached).start()
    first = [scheduler.submit(p, **kw) for p, kw in REQUESTS[1:5]]
    for ticket in first[:1]:
        ticket.wait(120)
    redis_process.kill()  # while the others decode (and write behind)
    second = [scheduler.submit(p, **kw) for p, kw in REQUESTS[5:]]
    for i, ticket in enumerate(first + second, start=1):
        result = ticket.wait(120)
        assert result.token_ids == alone[i].token_ids and result.text == alone[i].text, REQUESTS[i]
    redis_process.restart()
    after = [scheduler.submit(p, **kw).wait(120) for p, kw in REQUESTS[5:]]
    assert [r.token_ids for r in after] == [alone[i].token_ids for i in range(5, len(REQUESTS))]
    assert scheduler.shutdown(timeout=30)


def test_requests_on_the_generic_kv_path_run_as_their_own_batches(gen, alone):
    """A model on the generic KV path cannot merge batches: each admission round runs as its
    own batch, stepped in turn with the others, and every output still equals generate()."""
    generic = SpeculativeGenerator(gen.target_model, gen.tokenizer, gen.draft_model, engine="generic",
                                   draft_head=gen.draft_head)
    scheduler = Scheduler(generic).start()
    tickets = [scheduler.submit(p, **kw) for p, kw in REQUESTS[1:6]]
    for i, ticket in enumerate(tickets, start=1):
        assert ticket.wait(120).token_ids == alone[i].token_ids, REQUESTS[i]
    assert scheduler.counts["rows_joined"] == 0
    assert scheduler.shutdown(timeout=30)


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(gen, alone, monkeypatch):
    """An error inside a decoding step ends that batch's requests with Failed (the server would
    answer 500); the scheduler keeps serving the next ones, unchanged."""
    from specdec.engine import DecodeBatch

    real_step = DecodeBatch.step
    broken = {"on": True}

    def step(self):
        if broken["on"]:
            raise RuntimeError("a kernel failed")
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", step)
    scheduler = Scheduler(gen).start()
    events = Collector()
    ticket = scheduler.submit(*REQUESTS[3][:1], on_event=events, **REQUESTS[3][1])
    assert events.ended.wait(60) and isinstance(events.events[-1], Failed)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        ticket.wait(5)
    broken["on"] = False
    assert scheduler.submit(*REQUESTS[3][:1], **REQUESTS[3][1]).wait(60).token_ids == alone[3].token_ids
    assert scheduler.running == 0
    assert scheduler.shutdown(timeout=30)


def test_a_merge_that_breaks_midway_fails_both_batches_and_the_server_goes_on(gen, alone, monkeypatch):
    """A merge that raises after it began (not a refusal) may have left either batch half
    changed: the rows of both end with Failed, none hangs, and later requests are served."""
    from specdec.engine import DecodeBatch

    def merge(self, other):
        raise RuntimeError("buffers out of step")

    monkeypatch.setattr(DecodeBatch, "merge", merge)
    scheduler = Scheduler(gen)
    joined = []

    def join(event) -> None:  # the second request queues on the first one's first text
        if not joined:
            joined.append(scheduler.submit("def add(a, b):", max_new_tokens=20))

    first = scheduler.submit("def fib(n):", on_event=join, max_new_tokens=300, ignore_eos=True)
    scheduler.start()
    with pytest.raises(RuntimeError, match="buffers out of step"):
        first.wait(60)
    assert joined  # queued on the first's first text, so the merge was tried with it
    with pytest.raises(RuntimeError, match="buffers out of step"):
        joined[0].wait(60)
    monkeypatch.undo()
    assert scheduler.submit(*REQUESTS[3][:1], **REQUESTS[3][1]).wait(60).token_ids == alone[3].token_ids
    assert scheduler.shutdown(timeout=30)
