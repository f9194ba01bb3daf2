"""Engine workers: one server process, several engine processes (data parallel).

    server process (HTTP, event loop)                       engine process i (of N)
    ---------------------------------                       -----------------------
    EngineWorkers.submit(): pick the worker with the        command thread: submit to its own
    fewest requests; send ("submit", id, ...) and wait  ->  Scheduler (validation there: 400s,
    for "accepted" / "refused"                              QueueFull, closing); cancel; check
    reader thread per worker: events -> Ticket._emit,   <-  scheduler thread: after every step,
    metric hooks -> the server's ServerMetrics              the step's events, metric hooks and
                                                            gauges in one message

Why: a decoding step holds its process's interpreter for its Python bookkeeping, and a step
over a full batch is compute-bound on one core; a second engine process decodes its own
batch on another core at the same time, the way two servers behind a load balancer do, but
behind one port, one queue bound and one /metrics. Each worker loads the models itself
(memory: N copies) and opens its own connection to the cache, so workers share an external
cache (Redis) and nothing else; `memory://` gives each worker its own.

A request runs whole on one worker, with that worker's generator, so its output is what
`generate` gives for it alone, on any worker (greedy, and seeded sampling). Messages between
the processes are pickled by multiprocessing (requests, events, results: our own dataclasses,
between our own processes; nothing pickled reaches the cache). A worker that dies fails its
requests (500) and takes no new ones; when none is left, requests are answered 503.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable

from .scheduler import (DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, Event, Failed, Finished, NoEngineWorker, QueueFull,
                        Scheduler, SchedulerClosed, Ticket, check_count)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading and (with compile) warming up a worker, at most
REPLY_TIMEOUT_S = 60.0  # a worker answers a command within this (it answers between two steps)
_METRIC_HOOKS = frozenset({"on_queued", "on_rejected", "on_started", "on_first_token", "on_tokens", "on_finished"})


class WorkerError(RuntimeError):
    """An error raised in an engine worker, passed on by type name and message."""


class WorkerGone(RuntimeError):
    """The engine worker of a request exited before the request finished."""




# --------------------------------------------------------------------------- server side


class _RemoteTicket(Ticket):
    """A request on a worker: cancel() tells the worker too."""

    def __init__(self, request_id: int, on_event: Callable[[Event], None], worker: "_Worker") -> None:
        super().__init__(request_id, on_event)
        self.worker = worker
        self.accepted = False  # set by the reader thread when the worker's "accepted" arrives

    def cancel(self) -> None:
        if not self.cancelled and not self.done:
            self.worker.send(("cancel", self.id))
        super().cancel()


class _Worker:
    """The server's end of one engine process."""

    def __init__(self, index: int, process, conn) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.alive = True
        self.info: dict = {}
        self.tickets: dict[int, _RemoteTicket] = {}  # requests accepted (or being submitted) here
        self.gauges = (0, 0)  # (queue length, running) as of the worker's last message
        self._send_lock = threading.Lock()
        self._wait_lock = threading.Lock()  # one thread at a time waits for the process (waitpid)

    def join(self, timeout: float) -> None:
        with self._wait_lock:
            self.process.join(max(0.0, timeout))

    def terminate(self) -> None:
        with self._wait_lock:
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
                if self.process.is_alive():
                    self.process.kill()
                    self.process.join(5)

    def send(self, message) -> None:
        if not self.alive:
            return
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, EOFError):  # the reader thread notices and fails its requests
            pass


class EngineWorkers:
    """A Scheduler's interface (submit, queue_length, running, start, shutdown) over N engine
    processes, each running a Scheduler on its own SpeculativeGenerator (see the module docstring).

    load: SpeculativeGenerator.from_pretrained's keyword arguments (target, draft, device, ...),
    as plain values; threads: torch intra-op threads per worker (None: torch's default);
    warmup: compile the worker's steps before it reports ready (for compile=True); metrics:
    a ServerMetrics, fed with every worker's hooks.
    """

    def __init__(
        self,
        load: dict,
        *,
        workers: int = 2,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        threads: int | None = None,
        warmup: bool = False,
        metrics: Any = None,
    ) -> None:
        self.load = dict(load)
        self.count = check_count("workers", workers)
        check_count("max_batch", max_batch)
        check_count("max_queue", max_queue)
        if threads is not None:
            check_count("threads", threads)
        from transformers.utils import logging as hf_logging

        self.options = {"max_batch": max_batch, "max_queue": max_queue, "threads": threads, "warmup": warmup,
                        # the server's transformers logging, in the workers too (no loading bars where it has none)
                        "hf_verbosity": hf_logging.get_verbosity(),
                        "hf_progress_bar": hf_logging.is_progress_bar_enabled()}
        self.metrics = metrics
        self.workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._replies: dict[tuple, tuple[_Worker, threading.Event, list]] = {}  # calls awaiting a reply
        self._lock = threading.Lock()
        self._closing = False
        self._started = False
        self.accepted = [0] * self.count  # requests each worker accepted
        self.warmup_seconds: list[float] = []

    # ------------------------------------------------------------------ starting

    def start(self) -> "EngineWorkers":
        """Start the engine processes and wait until each has loaded its models (idempotent).
        The first worker starts alone, so that with compile=True the others warm up from the
        compile cache it filled. Raises RuntimeError with a worker's error when one fails."""
        with self._lock:
            if self._started:
                return self
            self._started = True
        context = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
        try:
            self._spawn(context, range(1))
            self._spawn(context, range(1, self.count))
        except BaseException:
            self._terminate()
            raise
        return self

    def _spawn(self, context, indices) -> None:
        started = []
        for index in indices:
            server_end, worker_end = context.Pipe()
            process = context.Process(target=_worker_main, args=(worker_end, index, self.load, self.options),
                                      name=f"specdec-engine-{index}", daemon=True)
            process.start()
            worker_end.close()
            started.append(_Worker(index, process, server_end))
        for worker in started:
            self.workers.append(worker)
            if not worker.conn.poll(START_TIMEOUT_S):
                raise RuntimeError(f"engine worker {worker.index} did not start within {START_TIMEOUT_S:.0f} s")
            try:
                kind, payload = worker.conn.recv()
            except EOFError:
                raise RuntimeError(f"engine worker {worker.index} exited while loading "
                                   f"(exit code {worker.process.exitcode}); see its log above") from None
            if kind != "ready":
                raise RuntimeError(f"engine worker {worker.index} failed to load: {payload}")
            worker.info = payload
            if payload.get("warmup_s") is not None:
                self.warmup_seconds.append(payload["warmup_s"])
            threading.Thread(target=self._read, args=(worker,), name=f"specdec-engine-reader-{worker.index}",
                             daemon=True).start()

    @property
    def info(self) -> dict:
        """What the first worker reported when it was ready: max_positions, tokenizer, pid, warmup_s."""
        return self.workers[0].info if self.workers else {}

    # ------------------------------------------------------------------ requests

    def submit(self, prompt, *, on_event: Callable[[Event], None] = lambda event: None,
               deadline_s: float | None = None, **kwargs) -> Ticket:
        """Scheduler.submit on the worker with the fewest requests; raises what that worker's
        submit raised (ValueError / TypeError as themselves, QueueFull, SchedulerClosed)."""
        with self._lock:
            if self._closing:
                raise SchedulerClosed("the server is shutting down; it takes no new requests")
            live = [w for w in self.workers if w.alive]
            if not live:
                raise NoEngineWorker("no engine worker is running; see the server log")
            worker = min(live, key=lambda w: (len(w.tickets), w.index))
            ticket = _RemoteTicket(next(self._ids), on_event, worker)
            worker.tickets[ticket.id] = ticket  # before the worker can send its first event
        try:
            reply = self._call(worker, ("submit", ticket.id, prompt, kwargs, deadline_s), key=("submit", ticket.id))
        except BaseException:
            with self._lock:
                worker.tickets.pop(ticket.id, None)
            raise
        if reply[0] == "accepted":
            self.accepted[worker.index] += 1
            return ticket
        with self._lock:
            worker.tickets.pop(ticket.id, None)
        raise _refusal(reply)

    def check_request(self, prompt, **kwargs) -> None:
        """SpeculativeGenerator.check_request on a worker (raises its ValueError / TypeError)."""
        live = [w for w in self.workers if w.alive]
        if not live:
            raise NoEngineWorker("no engine worker is running; see the server log")
        key = ("check", next(self._ids))
        reply = self._call(live[0], ("check", key[1], prompt, kwargs), key=key)
        if reply[0] != "ok":
            raise _refusal(reply)

    def _call(self, worker: _Worker, message, *, key: tuple):
        done, box = threading.Event(), []
        self._replies[key] = (worker, done, box)
        try:
            if not worker.alive:
                raise SchedulerClosed(f"engine worker {worker.index} exited; see the server log")
            worker.send(message)
            if not done.wait(REPLY_TIMEOUT_S):
                raise SchedulerClosed(f"engine worker {worker.index} did not answer within {REPLY_TIMEOUT_S:.0f} s")
        finally:
            self._replies.pop(key, None)
        return box[0]

    @property
    def queue_length(self) -> int:
        return sum(w.gauges[0] for w in self.workers if w.alive)

    @property
    def running(self) -> int:
        return sum(w.gauges[1] for w in self.workers if w.alive)

    @property
    def alive(self) -> tuple[int, int]:
        """(workers running, workers started)."""
        return sum(w.alive for w in self.workers), len(self.workers)

    @property
    def outstanding(self) -> list[int]:
        """Requests submitted and not finished, per worker."""
        return [len(w.tickets) for w in self.workers]

    # ------------------------------------------------------------------ events from a worker

    def _read(self, worker: _Worker) -> None:
        try:
            while True:
                message = worker.conn.recv()
                if message[0] == "batch":
                    for item in message[1]:
                        self._dispatch(worker, item)
                else:
                    self._dispatch(worker, message)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message that cannot be read: the worker is lost to us
            logger.exception("reading from engine worker %d failed", worker.index)
        self._lost(worker)

    def _dispatch(self, worker: _Worker, item) -> None:
        kind = item[0]
        if kind == "event":
            _, request_id, event = item
            ticket = worker.tickets.get(request_id)
            if ticket is None:
                return
            if isinstance(event, (Finished, Failed)):
                with self._lock:
                    worker.tickets.pop(request_id, None)
            ticket._emit(event)
        elif kind == "metric":
            _, name, args = item
            if self.metrics is not None and name in _METRIC_HOOKS:
                getattr(self.metrics, name)(*args)
        elif kind == "gauges":
            worker.gauges = item[1]
        elif kind == "reply":
            _, key, payload = item
            if key[0] == "submit" and payload[0] == "accepted" and key[1] in worker.tickets:
                worker.tickets[key[1]].accepted = True  # before this thread can find the worker gone
            waiting = self._replies.get(key)
            if waiting is not None:
                waiting[2].append(payload)
                waiting[1].set()

    def _lost(self, worker: _Worker) -> None:
        """The worker's pipe closed: fail its requests, answer its pending calls."""
        worker.alive = False
        worker.join(5)
        if not self._closing:
            logger.error("engine worker %d exited (exit code %s); its requests fail", worker.index,
                         worker.process.exitcode)
        with self._lock:
            tickets, worker.tickets = list(worker.tickets.values()), {}
        for ticket in tickets:
            if ticket.accepted and not ticket.done:  # one still being submitted is refused below instead
                if self.metrics is not None:
                    self.metrics.on_finished(None, "error")
                ticket._emit(Failed(WorkerGone(f"engine worker {worker.index} exited "
                                               f"(exit code {worker.process.exitcode})")))
        for key, (owner, done, box) in list(self._replies.items()):
            if owner is worker and not done.is_set():
                box.append(("refused", "closed", f"engine worker {worker.index} exited", None))
                done.set()

    # ------------------------------------------------------------------ stopping

    def shutdown(self, *, cancel: bool = False, timeout: float | None = 60.0) -> bool:
        """Scheduler.shutdown on every worker at once (finish or cancel, flush the cache writes),
        then the processes exit. True when all of it finished within `timeout`."""
        with self._lock:
            self._closing = True
        budget = 60.0 if timeout is None else timeout
        deadline = time.monotonic() + budget + 10
        pending = []
        for worker in self.workers:
            if worker.alive:
                key = ("shutdown", worker.index)
                done, box = threading.Event(), []
                self._replies[key] = (worker, done, box)
                worker.send(("shutdown", cancel, budget))
                pending.append((worker, done, box))
        finished = True
        for worker, done, box in pending:
            answered = done.wait(max(0.0, deadline - time.monotonic()))
            finished = finished and answered and bool(box) and box[0] is True
            worker.join(deadline - time.monotonic())
        self._terminate()
        return finished

    def _terminate(self) -> None:
        for worker in self.workers:
            worker.terminate()
            worker.conn.close()


class WorkerGenerator:
    """What the HTTP app reads of a generator, for EngineWorkers: the tokenizer and context
    length the first worker reported, and check_request run on a worker."""

    def __init__(self, workers: EngineWorkers) -> None:
        self.workers = workers
        self.tokenizer = workers.info.get("tokenizer")
        self.max_positions = workers.info.get("max_positions")

    def check_request(self, prompt, **kwargs) -> None:
        self.workers.check_request(prompt, **kwargs)


def _refusal(reply) -> Exception:
    _, kind, message, retry_after = reply
    if kind == "ValueError":
        return ValueError(message)
    if kind == "TypeError":
        return TypeError(message)
    if kind == "queue_full":
        error = QueueFull(0, retry_after or 1.0)
        error.args = (message,)
        return error
    if kind == "closed":
        return SchedulerClosed(message)
    return WorkerError(f"{kind}: {message}")


# --------------------------------------------------------------------------- worker side


class _Outbox:
    """Messages to the server process: events and metric hooks wait for the end of the
    scheduler's round (one message a round), replies go at once (after what waits)."""

    def __init__(self, conn, scheduler_ref: list) -> None:
        self.conn = conn
        self.pending: list = []
        self.lock = threading.Lock()
        self.scheduler_ref = scheduler_ref  # [Scheduler], set once it exists (gauges)
        self.tickets: dict[int, Ticket] = {}
        self.gauges = (0, 0)  # as last sent

    def event(self, request_id: int, event: Event) -> None:
        if isinstance(event, Failed):
            error = event.error
            event = Failed(WorkerError(f"{type(error).__name__}: {error}"))
        if isinstance(event, (Finished, Failed)):
            self.tickets.pop(request_id, None)
        with self.lock:
            self.pending.append(("event", request_id, event))

    def metric(self, name: str, args: tuple) -> None:
        with self.lock:
            self.pending.append(("metric", name, args))

    def flush(self, reply=None) -> None:
        with self.lock:
            items, self.pending = self.pending, []
            if self.scheduler_ref:
                scheduler = self.scheduler_ref[0]
                gauges = (scheduler.queue_length, scheduler.running)
                if gauges != self.gauges:
                    items.append(("gauges", gauges))
                    self.gauges = gauges
            if reply is not None:
                items.append(("reply",) + reply)
            if items:
                self.conn.send(("batch", items))


class _MetricsRelay:
    """ServerMetrics' hooks, sent to the server process (which keeps the one ServerMetrics)."""

    def __init__(self, outbox: _Outbox) -> None:
        self._outbox = outbox

    def __getattr__(self, name: str):
        if name not in _METRIC_HOOKS:
            raise AttributeError(name)
        return lambda *args: self._outbox.metric(name, args)


def _error_reply(exc: BaseException) -> tuple:
    if isinstance(exc, QueueFull):
        return ("refused", "queue_full", str(exc), exc.retry_after)
    if isinstance(exc, SchedulerClosed):
        return ("refused", "closed", str(exc), None)
    return ("refused", type(exc).__name__, str(exc), None)


def _worker_main(conn, index: int, load: dict, options: dict) -> None:
    """An engine process: load the models, report ready, then run commands until shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops the workers
    try:
        import torch

        from transformers.utils import logging as hf_logging

        if options.get("threads") is not None:
            torch.set_num_threads(options["threads"])
        hf_logging.set_verbosity(options.get("hf_verbosity", hf_logging.get_verbosity()))
        if not options.get("hf_progress_bar", True):
            hf_logging.disable_progress_bar()
        from .. import SpeculativeGenerator

        generator = SpeculativeGenerator.from_pretrained(**load)
        warmup_s = None
        if options.get("warmup"):
            warmup_s = generator.warmup(batches=options["max_batch"] > 1)
            from ..fused import freeze

            freeze()
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which refuses to start
        logger.exception("engine worker %d failed to load", index)
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        finally:
            conn.close()
        return
    conn.send(("ready", {"max_positions": generator.max_positions, "tokenizer": generator.tokenizer,
                         "pid": os.getpid(), "warmup_s": warmup_s}))
    scheduler_ref: list = []
    outbox = _Outbox(conn, scheduler_ref)
    scheduler = Scheduler(generator, max_batch=options["max_batch"], max_queue=options["max_queue"],
                          metrics=_MetricsRelay(outbox), after_step=outbox.flush)
    scheduler_ref.append(scheduler)
    scheduler.start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server process is gone: end the requests, flush, exit
            scheduler.shutdown(cancel=True, timeout=10.0)
            return
        op = message[0]
        if op == "submit":
            _, request_id, prompt, kwargs, deadline_s = message
            try:
                ticket = scheduler.submit(prompt, on_event=lambda event, rid=request_id: outbox.event(rid, event),
                                          deadline_s=deadline_s, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the request's refusal, passed on
                outbox.flush((("submit", request_id), _error_reply(exc)))
            else:
                outbox.tickets[request_id] = ticket
                for rid in [rid for rid, t in outbox.tickets.items() if t.done]:  # finished before this line
                    outbox.tickets.pop(rid, None)
                outbox.flush((("submit", request_id), ("accepted",)))
        elif op == "cancel":
            ticket = outbox.tickets.get(message[1])
            if ticket is not None:
                ticket.cancel()
        elif op == "check":
            _, key, prompt, kwargs = message
            try:
                generator.check_request(prompt, **kwargs)
            except Exception as exc:  # noqa: BLE001
                outbox.flush((("check", key), _error_reply(exc)))
            else:
                outbox.flush((("check", key), ("ok",)))
        elif op == "shutdown":
            _, cancel, timeout = message
            finished = scheduler.shutdown(cancel=cancel, timeout=timeout)
            outbox.flush((("shutdown", index), finished))
            conn.close()
            return
