"""The server's Prometheus metrics, in the text exposition format (version 0.0.4), by hand.

Names follow vLLM's where vLLM has one, with the prefix `specdec:` for vLLM's `vllm:`
(a dashboard built for one reads the other by changing the prefix):

    specdec:spec_decode_num_drafts_total                  steps that verified at least one draft token
    specdec:spec_decode_num_draft_tokens_total            draft tokens verified
    specdec:spec_decode_num_accepted_tokens_total         draft tokens accepted
    specdec:spec_decode_num_accepted_tokens_per_pos_total{position}
    specdec:request_success_total{finished_reason}        stop, length, cancelled, deadline
    specdec:prompt_tokens_total, specdec:generation_tokens_total
    specdec:num_requests_waiting, specdec:num_requests_running          (gauges)
    specdec:time_to_first_token_seconds, specdec:inter_token_latency_seconds,
    specdec:request_queue_time_seconds                                  (histograms)

and specdec's own: spec_decode_num_draft_tokens_per_pos_total{position} (K varies per step
with num_draft_tokens="auto", so per-position acceptance needs its own denominators),
cache_hits_total{kind} (what a cache entry contributed: trusted, verified, partial,
rejected; see GenerationStats.cache_kind), cache_errors_total, request_queued_total,
request_rejected_total (queue full: answered 429) and request_failure_total (an internal
error after the request was accepted); with engine workers (`--workers`), the gauges
engine_workers_alive and engine_workers.

ServerMetrics is fed by the scheduler through its hooks, from the scheduler thread and the
callers' threads; a lock makes each hook atomic. Hooks never raise: a metric must not stop
the model. Every sample carries a `model_name` label when one is given, as vLLM's do.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable

PREFIX = "specdec:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for time to first token.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# vLLM's buckets for inter-token latency, with finer ones below 10 ms: a step that accepts
# several drafts hands out several tokens at once, each a fraction of a step apart.
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                 600.0)

# Label values listed from the start (at 0), so that rates exist before the first event.
FINISHED_REASONS = ("stop", "length", "cancelled", "deadline")
CACHE_KINDS = ("trusted", "verified", "partial", "rejected")


class Histogram:
    """Observations counted into fixed buckets (upper bounds, le), plus their sum and count."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # [buckets + 1] per bucket, not cumulative; last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record `n` observations of `value` (NaN and negatives are clamped to 0)."""
        value = float(value)
        if not value > 0:  # NaN too
            value = 0.0
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[float, int]]:
        """(le, observations <= le) for every bucket, +Inf last."""
        out, total = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            total += count
            out.append((bound, total))
        return out


class ServerMetrics:
    """Counters, gauges and histograms of one server; see the module docstring for the names."""

    def __init__(self, model_name: str | None = None) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.requests_queued = 0
        self.requests_rejected = 0
        self.requests_failed = 0
        self.finished = {reason: 0 for reason in FINISHED_REASONS}  # finished_reason -> requests
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.accepted_per_position: list[int] = []  # [K] accepted drafts at slot i
        self.drafted_per_position: list[int] = []  # [K] drafts offered at slot i
        self.cache_hits = {kind: 0 for kind in CACHE_KINDS}  # cache_kind -> requests
        self.cache_errors = 0
        self.queue_time = Histogram(QUEUE_BUCKETS)
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(ITL_BUCKETS)

    # ------------------------------------------------------------------ hooks (called by the scheduler)

    def on_queued(self) -> None:
        """A request entered the waiting queue."""
        with self._lock:
            self.requests_queued += 1

    def on_rejected(self) -> None:
        """A request was refused because the queue was full (the server answers 429)."""
        with self._lock:
            self.requests_rejected += 1

    def on_started(self, queue_wait_s: float) -> None:
        """A request left the queue for the running batch after `queue_wait_s` seconds."""
        with self._lock:
            self.queue_time.observe(queue_wait_s)

    def on_first_token(self, seconds: float) -> None:
        """A request's first output tokens arrived after `seconds` (the scheduler says from when)."""
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def on_tokens(self, n: int, seconds: float) -> None:
        """`n` tokens arrived `seconds` after the previous ones: n inter-token latencies of seconds / n."""
        if n <= 0:
            return
        with self._lock:
            self.inter_token_latency.observe(seconds / n, n)

    def on_finished(self, result, status: str) -> None:
        """A request left: status "ok" (finished_reason from the result), "cancelled", "deadline" or
        "error" (result None). Token and speculative-decoding counters come from result.stats."""
        with self._lock:
            if status == "error" or result is None:
                self.requests_failed += 1
                return
            reason = result.finish_reason if status == "ok" else status
            self.finished[reason] = self.finished.get(reason, 0) + 1
            stats = result.stats
            self.prompt_tokens += stats.prompt_tokens
            self.generation_tokens += len(result.token_ids)
            self.num_drafts += sum(steps for drafted, steps in stats.draft_lengths.items() if drafted > 0)
            self.num_draft_tokens += stats.drafted_tokens
            self.num_accepted_tokens += stats.accepted_tokens
            _add_into(self.accepted_per_position, stats.accepted_per_position)
            _add_into(self.drafted_per_position, stats.drafted_per_position)
            if stats.cache_kind is not None:
                self.cache_hits[stats.cache_kind] = self.cache_hits.get(stats.cache_kind, 0) + 1
            self.cache_errors += stats.cache_errors

    # ------------------------------------------------------------------ exposition

    def render(self, queue_length: int, running: int, workers: tuple[int, int] | None = None) -> str:
        """Every metric in Prometheus' text format; the gauges are the scheduler's state now
        (workers: engine processes (alive, started), with `specdec serve --workers`)."""
        with self._lock:
            out: list[str] = []
            gauge = _family(out, self.model_name, "gauge")
            counter = _family(out, self.model_name, "counter")
            gauge("num_requests_waiting", "Requests waiting in the queue.", [({}, queue_length)])
            gauge("num_requests_running", "Requests in the running batch.", [({}, running)])
            if workers is not None:
                gauge("engine_workers_alive", "Engine worker processes running (of engine_workers).",
                      [({}, workers[0])])
                gauge("engine_workers", "Engine worker processes started.", [({}, workers[1])])
            counter("request_queued_total", "Requests accepted into the waiting queue.", [({}, self.requests_queued)])
            counter("request_rejected_total", "Requests refused because the queue was full (answered 429).",
                    [({}, self.requests_rejected)])
            counter("request_success_total", "Finished requests by finished_reason.",
                    [({"finished_reason": r}, n) for r, n in sorted(self.finished.items())])
            counter("request_failure_total", "Requests that failed with an internal error after they were accepted.",
                    [({}, self.requests_failed)])
            counter("prompt_tokens_total", "Prompt tokens of finished requests.", [({}, self.prompt_tokens)])
            counter("generation_tokens_total", "Generated tokens of finished requests.",
                    [({}, self.generation_tokens)])
            counter("spec_decode_num_drafts_total", "Decoding steps that verified at least one draft token.",
                    [({}, self.num_drafts)])
            counter("spec_decode_num_draft_tokens_total", "Draft tokens verified by the target.",
                    [({}, self.num_draft_tokens)])
            counter("spec_decode_num_accepted_tokens_total", "Draft tokens the target accepted.",
                    [({}, self.num_accepted_tokens)])
            counter("spec_decode_num_accepted_tokens_per_pos_total", "Draft tokens accepted at each draft position.",
                    [({"position": str(i)}, n) for i, n in enumerate(self.accepted_per_position)])
            counter("spec_decode_num_draft_tokens_per_pos_total", "Draft tokens verified at each draft position.",
                    [({"position": str(i)}, n) for i, n in enumerate(self.drafted_per_position)])
            counter("cache_hits_total", "Requests a cache entry contributed to, by what it contributed (kind).",
                    [({"kind": k}, n) for k, n in sorted(self.cache_hits.items())])
            counter("cache_errors_total", "Cache operations that failed (generation went on without them).",
                    [({}, self.cache_errors)])
            _histogram(out, self.model_name, "request_queue_time_seconds",
                       "Seconds a request waited in the queue before it joined the batch.", self.queue_time)
            _histogram(out, self.model_name, "time_to_first_token_seconds",
                       "Seconds from a request's arrival to its first output tokens.", self.time_to_first_token)
            _histogram(out, self.model_name, "inter_token_latency_seconds",
                       "Seconds between successive output tokens.", self.inter_token_latency)
            return "\n".join(out) + "\n"


def _add_into(total: list[int], values: list[int]) -> None:
    if len(total) < len(values):
        total.extend([0] * (len(values) - len(total)))
    for i, v in enumerate(values):
        total[i] += v


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(model_name: str | None, labels: dict[str, str]) -> str:
    pairs = ([("model_name", model_name)] if model_name is not None else []) + list(labels.items())
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _family(out: list[str], model_name: str | None, kind: str):
    def add(name: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        full = PREFIX + name
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            out.append(f"{full}{_labels(model_name, labels)} {_number(value)}")

    return add


def _histogram(out: list[str], model_name: str | None, name: str, help_text: str, hist: Histogram) -> None:
    full = PREFIX + name
    out.append(f"# HELP {full} {help_text}")
    out.append(f"# TYPE {full} histogram")
    for bound, count in hist.cumulative():
        out.append(f"{full}_bucket{_labels(model_name, {'le': _number(float(bound))})} {count}")
    out.append(f"{full}_sum{_labels(model_name, {})} {_number(float(hist.sum))}")
    out.append(f"{full}_count{_labels(model_name, {})} {hist.count}")
