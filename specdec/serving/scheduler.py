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
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

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
    specdec.serving.metrics.ServerMetrics, or None.
    """

    def __init__(
        self,
        generator,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        metrics: Any = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._running: list[Any] = []  # per-request state of the rows in the batch
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
        return len(self._running)

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
                while not self._queue and not self._running and not self._closing:
                    self._wake.wait()
                if self._closing and (self._cancel_on_close or (not self._queue and not self._running)):
                    break
                admitted = []
                while self._queue and len(self._running) + len(admitted) < self.max_batch:
                    admitted.append(self._queue.popleft())
            for pending in admitted:
                self._admit(pending)
            if self._running:
                start = time.perf_counter()
                self._step()
                self._step_seconds = 0.8 * self._step_seconds + 0.2 * (time.perf_counter() - start)
        for row in self._running:
            self._end(row, "cancelled")
        self._running = []
        self._drain_queue("cancelled")

    def _drain_queue(self, reason: str) -> None:
        with self._lock:
            waiting, self._queue = list(self._queue), collections.deque()
        for pending in waiting:
            stats = GenerationStats()
            pending.ticket._emit(Finished(GenerationResult("", [], reason, stats)))

    # Round-robin over each request's own stream: one decoding step of every running request per
    # turn. (The batched engine replaces this.)

    def _admit(self, pending: _Pending) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.on_started(now - pending.queued_at)
        row = _Row(pending, self.generator.stream(pending.prompt, **pending.kwargs), time.perf_counter())
        self._running.append(row)

    def _step(self) -> None:
        now = time.monotonic()
        still = []
        for row in self._running:
            ticket = row.pending.ticket
            if ticket.cancelled:
                self._end(row, "cancelled")
                continue
            if row.pending.deadline is not None and now > row.pending.deadline:
                self._end(row, "deadline")
                continue
            try:
                text = next(row.stream)
            except StopIteration as done:
                result = done.value
                self._finished(row, result)
                continue
            except Exception as error:  # noqa: BLE001 - reported to the request, the server goes on
                logger.exception("request %d failed", ticket.id)
                ticket._emit(Failed(error))
                if self.metrics is not None:
                    self.metrics.on_finished(None, "error")
                continue
            if text:
                row.text.append(text)
                self._timing(row)
                ticket._emit(TextDelta(text))
            still.append(row)
        self._running = still

    def _timing(self, row: "_Row") -> None:
        now = time.perf_counter()
        if self.metrics is not None:
            if row.last_token_at is None:
                self.metrics.on_first_token(now - row.started_at)
            else:
                self.metrics.on_tokens(1, now - row.last_token_at)
        row.last_token_at = now

    def _finished(self, row: "_Row", result: GenerationResult) -> None:
        if self.metrics is not None:
            self.metrics.on_finished(result, "ok")
        row.pending.ticket._emit(Finished(result))

    def _end(self, row: "_Row", reason: str) -> None:
        row.stream.close()
        text = "".join(row.text)
        result = GenerationResult(text, [], reason, GenerationStats())
        if self.metrics is not None:
            self.metrics.on_finished(result, reason)
        row.pending.ticket._emit(Finished(result))


@dataclass
class _Row:
    pending: _Pending
    stream: Any
    started_at: float
    last_token_at: float | None = None

    def __post_init__(self) -> None:
        self.text: list[str] = []
