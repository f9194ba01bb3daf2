"""The scheduler: requests arrive from any thread, one thread runs the model.

    submit() (caller's thread)           scheduler thread, between two decoding steps
    ---------------------------          ---------------------------------------------
    validate, tokenize, queue   ---->    admit: cache lookup (a hit is answered here and
    (QueueFull when the queue is         never joins), else prefill and join the running
    full: the caller answers 429)        batch; step the batch once; hand each row its
                                         text deltas; finished, cancelled and late rows
                                         leave the batch

A request's events go to its `on_event` callback, called on the scheduler thread (keep it
cheap: the server hands them to its event loop): TextDelta(text) as the target accepts
tokens, then exactly one Finished(result) or Failed(error).

Exactness: a row's tokens never depend on the other rows of the batch (greedy: plain greedy
decoding; seeded: the counter-based noise is keyed on the row's seed and length), so a
request's output is what `SpeculativeGenerator.generate` gives for it alone.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..drafters.base import row_settings
from ..engine import DecodeBatch, RowOutput
from ..stats import GenerationResult, GenerationStats

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 64


@dataclass
class TextDelta:
    """New text of a request, as the target accepted it (stop strings held back until decided)."""

    text: str


@dataclass
class Finished:
    """The request is done. finish_reason: "stop", "length", or "cancelled" (the caller
    cancelled it, or the scheduler shut down without finishing it), or "deadline" (its
    deadline passed); the last two carry what was generated before."""

    result: GenerationResult


@dataclass
class Failed:
    """The request failed after it was accepted (an internal error); nothing more follows."""

    error: BaseException


Event = TextDelta | Finished | Failed


class QueueFull(RuntimeError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, size: int, retry_after: float) -> None:
        super().__init__(f"the request queue is full ({size} waiting); retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down or stopped: it takes no new requests."""


class NoEngineWorker(SchedulerClosed):
    """No engine worker is running (specdec.serving.workers: they all exited): nothing can
    answer requests."""


def check_count(name: str, value: Any) -> int:
    """`value` as a count option (an int >= 1), or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Ticket:
    """A submitted request: cancel() it, or wait() for its result."""

    def __init__(self, request_id: int, on_event: Callable[[Event], None]) -> None:
        self.id = request_id
        self._on_event = on_event
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Stop the request: its row leaves the batch at the next step (a client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """The result (blocks until the request finishes); raises the request's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _emit(self, event: Event) -> None:
        if isinstance(event, Finished):
            self.result = event.result
        elif isinstance(event, Failed):
            self.error = event.error
        try:
            self._on_event(event)
        except Exception:  # a broken callback must not stop the scheduler
            logger.exception("on_event of request %d raised", self.id)
        if isinstance(event, (Finished, Failed)):
            self._done.set()


@dataclass
class _Pending:
    ticket: Ticket
    prompt: Any  # text or chat messages
    kwargs: dict  # generate() keyword arguments
    deadline: float | None  # time.monotonic() after which the request is ended
    queued_at: float


class Scheduler:
    """Runs a SpeculativeGenerator for many concurrent requests (see the module docstring).

    max_batch: rows decoded together at most; max_queue: requests waiting to join at most
    (submit raises QueueFull beyond it). metrics: an object with the hooks of
    specdec.serving.metrics.ServerMetrics, or None. after_step: called on the scheduler thread
    after each decoding step and at the end of each round of admitting and stepping (an engine
    worker sends the events of the step to the server process in one message there), or None.
    """

    def __init__(
        self,
        generator,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        metrics: Any = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        check_count("max_batch", max_batch)
        check_count("max_queue", max_queue)
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.after_step = after_step
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._batches: list[_Batch] = []  # running batches (one per batch_key, or more where rows cannot merge)
        self._row_ids = itertools.count()
        self._cancel_now = False
        # Rows that joined a running batch, and batches started (one per admission round and key).
        self.counts = {"rows_joined": 0, "batches_started": 0}
        self._closing = False
        self._cancel_on_close = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.05  # a moving estimate, for Retry-After

    # ------------------------------------------------------------------ callers' side

    def start(self) -> "Scheduler":
        """Start the scheduler thread (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="specdec-scheduler", daemon=True)
                self._thread.start()
        return self

    def submit(
        self,
        prompt,
        *,
        on_event: Callable[[Event], None] = lambda event: None,
        deadline_s: float | None = None,
        **kwargs,
    ) -> Ticket:
        """Queue one request: `prompt` is text or chat messages, kwargs are generate()'s.

        Everything that can be wrong with the request raises here (ValueError / TypeError),
        before it is queued; a full queue raises QueueFull, a closing scheduler SchedulerClosed.
        """
        if deadline_s is not None and (isinstance(deadline_s, bool) or not deadline_s > 0):
            raise ValueError(f"deadline_s must be a number of seconds > 0, got {deadline_s!r}")
        self.generator.check_request(prompt, **kwargs)
        now = time.monotonic()
        with self._lock:
            if self._closing:
                raise SchedulerClosed("the server is shutting down; it takes no new requests")
            if len(self._queue) >= self.max_queue:
                if self.metrics is not None:
                    self.metrics.on_rejected()
                raise QueueFull(len(self._queue), self._retry_after())
            ticket = Ticket(next(self._ids), on_event)
            self._queue.append(_Pending(ticket, prompt, dict(kwargs), now + deadline_s if deadline_s else None, now))
            if self.metrics is not None:
                self.metrics.on_queued()
            self._wake.notify()
        return ticket

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests decoding now (rows in the running batches)."""
        return sum(len(b.rows) for b in list(self._batches))

    def shutdown(self, *, cancel: bool = False, timeout: float | None = 60.0) -> bool:
        """Stop taking requests; finish the queued and running ones (cancel=True: end them now,
        as "cancelled"), then flush the cache's pending writes. True when all of it finished
        within `timeout`."""
        with self._lock:
            self._closing = True
            self._cancel_on_close = cancel
            self._wake.notify()
            thread = self._thread
        if thread is None:  # never started: end what is queued
            self._drain_queue("cancelled")
            finished = True
        else:
            thread.join(timeout)
            finished = not thread.is_alive()
        layer = getattr(self.generator, "cache_layer", None)
        if layer is not None:
            finished = layer.flush(timeout=5.0) and finished
        return finished

    # ------------------------------------------------------------------ the scheduler thread

    def _retry_after(self) -> float:
        return max(1.0, round(self._step_seconds * (len(self._queue) + 1)))

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._batches and not self._closing:
                    self._wake.wait()
                if self._closing and (self._cancel_on_close or (not self._queue and not self._batches)):
                    break
                admitted = []
                while self._queue and self.running + len(admitted) < self.max_batch:
                    admitted.append(self._queue.popleft())
            start = time.perf_counter()
            try:
                joining = [live for live in map(self._admit, admitted) if live is not None]
                if joining:
                    self._join(joining)
                self._step()
            except Exception:  # noqa: BLE001 - never leave the thread: requests would hang
                logger.exception("scheduler iteration failed")
            if admitted or self._batches:
                self._step_seconds = 0.8 * self._step_seconds + 0.2 * (time.perf_counter() - start)
            self._after_step()
        self._cancel_now = True
        for running in list(self._batches):
            self._end_late_rows(running)
            running.batch.close()
        self._batches = []
        self._drain_queue("cancelled")

    def _after_step(self) -> None:
        if self.after_step is not None:
            try:
                self.after_step()
            except Exception:  # noqa: BLE001 - never leave the thread
                logger.exception("after_step failed")

    def _drain_queue(self, reason: str) -> None:
        with self._lock:
            waiting, self._queue = list(self._queue), collections.deque()
        for pending in waiting:
            self._complete(_Live(pending, None), GenerationResult("", [], reason, GenerationStats()), reason)

    def _admit(self, pending: _Pending) -> "_Live | None":
        """Open the request's row (a cache hit is answered here); None when it is done already."""
        ticket = pending.ticket
        now = time.monotonic()
        late = "cancelled" if ticket.cancelled else (
            "deadline" if pending.deadline is not None and now > pending.deadline else None)
        if late is not None:  # ended while it waited: nothing to compute
            self._complete(_Live(pending, None), GenerationResult("", [], late, GenerationStats()), late)
            return None
        if self.metrics is not None:
            self.metrics.on_started(now - pending.queued_at)
        try:
            row = self.generator.open_row(pending.prompt, **pending.kwargs)
        except Exception as error:  # noqa: BLE001 - reported to the request, the server goes on
            self._fail([_Live(pending, None)], error)
            return None
        live = _Live(pending, row)
        if row.result is not None:  # answered by the cache, without joining a batch
            self._deliver(live, row.text_so_far())
            self._complete(live, row.result, "ok")
            return None
        if row.prefix:  # tokens confirmed from a cached response come out first
            self._deliver(live, row.add(row.prefix))
        if row.decode_params.max_new_tokens == 0:
            self._finish_row(live, RowOutput([], "length", GenerationStats(prompt_tokens=len(row.decode_ids))))
            return None
        return live

    def _join(self, admitted: list["_Live"]) -> None:
        """Prefill the admitted rows (one batch per key), run their first step, and merge them
        into a running batch of the same key where there is one."""
        groups: dict[tuple, list[_Live]] = {}
        for live in admitted:
            groups.setdefault(batch_key(live.row), []).append(live)
        for key, rows in groups.items():
            first = rows[0].row
            ids = [next(self._row_ids) for _ in rows]
            seeded = key[0] == "seeded"
            seeds = tuple(r.row.decode_params.seed for r in rows) if seeded else None
            params = dataclasses.replace(first.decode_params, seed=seeds)
            try:
                batch = DecodeBatch(
                    self.generator.target_model, [r.row.decode_ids for r in rows], params, first.drafters,
                    [r.row.stop_ids for r in rows], stop_checks=[r.row.stop_check for r in rows],
                    budgets=[r.row.decode_params.max_new_tokens for r in rows], row_ids=ids,
                    row_sampling=[row_settings(r.row.decode_params) for r in rows],
                    **self.generator._engine_args(),
                )
            except Exception as error:  # noqa: BLE001
                self._fail(rows, error)
                continue
            running = _Batch(key, batch, dict(zip(ids, rows)))
            self.counts["batches_started"] += 1
            self._step_batch(running)  # the first step stands on the prefill's logits: alone
            if not batch.rows:
                batch.close()
                continue
            target = next((b for b in self._batches if b.key == key and b.batch.can_merge), None)
            if target is not None and batch.can_merge:
                try:
                    target.batch.merge(batch)
                except ValueError:  # refused before either batch changed
                    logger.debug("batch of %d rows runs apart", len(rows), exc_info=True)
                except Exception as error:  # noqa: BLE001 - a merge that broke midway: both batches end
                    logger.exception("merging a batch failed")
                    self._fail_batch(target, error)
                    self._fail_batch(running, error)
                    continue
                else:
                    target.rows.update(running.rows)
                    self.counts["rows_joined"] += len(rows)
                    continue
            self._batches.append(running)

    def _step(self) -> None:
        for running in list(self._batches):
            try:
                self._end_late_rows(running)
            except Exception as error:  # noqa: BLE001 - the batch's requests fail, the server goes on
                logger.exception("ending rows failed")
                self._fail_batch(running, error)
            if running.batch.rows:
                self._step_batch(running)
            if not running.batch.rows:
                running.batch.close()
                self._batches.remove(running)

    def _step_batch(self, running: "_Batch") -> None:
        try:
            emitted = running.batch.step()
        except Exception as error:  # noqa: BLE001 - the batch's requests fail, the server goes on
            logger.exception("a decoding step failed")
            self._fail_batch(running, error)
            return
        for row_id, new in emitted:
            live = running.rows[row_id]
            self._deliver(live, live.row.add(new), len(new))
        for row_id, output in running.batch.take_finished().items():
            self._finish_row(running.rows.pop(row_id), output)
        self._after_step()

    def _end_late_rows(self, running: "_Batch") -> None:
        """Rows whose request was cancelled or is past its deadline leave before the step."""
        now = time.monotonic()
        ended = {}
        for row_id, live in running.rows.items():
            if live.pending.ticket.cancelled or self._cancel_now:
                ended[row_id] = "cancelled"
            elif live.pending.deadline is not None and now > live.pending.deadline:
                ended[row_id] = "deadline"
        for reason in set(ended.values()):
            running.batch.drop([r for r, why in ended.items() if why == reason], reason)
        for row_id, output in running.batch.take_finished().items():
            self._finish_row(running.rows.pop(row_id), output)

    def _deliver(self, live: "_Live", text: str, tokens: int = 0) -> None:
        if tokens and self.metrics is not None:
            now = time.monotonic()
            if live.last_token_at is None:
                self.metrics.on_first_token(now - live.pending.queued_at)
            else:
                self.metrics.on_tokens(tokens, now - live.last_token_at)
        if tokens:
            live.last_token_at = time.monotonic()
        if text:
            live.pending.ticket._emit(TextDelta(text))

    def _finish_row(self, live: "_Live", output: RowOutput) -> None:
        delta, result = live.row.complete(output)
        self._deliver(live, delta)
        reason = output.finish_reason
        self._complete(live, result, "ok" if reason in ("stop", "length") else reason)

    def _complete(self, live: "_Live", result: GenerationResult, status: str) -> None:
        if self.metrics is not None:
            self.metrics.on_finished(result, status)
        live.pending.ticket._emit(Finished(result))

    def _fail_batch(self, running: "_Batch", error: BaseException) -> None:
        """Every request of the batch fails; the batch is left empty (the loop then drops it)."""
        self._fail(list(running.rows.values()), error)
        running.rows.clear()
        running.batch.state.rows = []

    def _fail(self, rows: list["_Live"], error: BaseException) -> None:
        for live in rows:
            logger.warning("request %d failed: %s", live.pending.ticket.id, error)
            if self.metrics is not None:
                self.metrics.on_finished(None, "error")
            live.pending.ticket._emit(Failed(error))


def batch_key(row) -> tuple:
    """Rows with equal keys decode in one batch: the same drafters, draft length rule and cache,
    and the same planning mode ("seeded": seeded sampling, whose draft plans follow a fixed cost
    proxy so that its samples never depend on timing; "free": greedy rows, whose tokens no plan
    changes, and unseeded sampling). Prompts, budgets, temperature, top-k, top-p, seeds, stop
    ids and stop strings may differ per row: each row samples with its own settings and noise."""
    p = row.decode_params
    mode = "seeded" if p.seed is not None and not p.greedy else "free"
    return (mode, p.drafter, p.num_draft_tokens, tuple(type(d).__name__ for d in row.drafters), id(row.layer))


@dataclass
class _Live:
    """A request in the scheduler thread: its queue entry and its StreamRow."""

    pending: _Pending
    row: Any  # specdec.generator.StreamRow (None when opening it failed)
    last_token_at: float | None = None


@dataclass
class _Batch:
    """A running DecodeBatch and the requests of its rows."""

    key: tuple
    batch: DecodeBatch
    rows: dict[int, _Live]  # row id -> request
