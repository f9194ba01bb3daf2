"""ServerMetrics (specdec.serving.metrics): the hooks the scheduler calls, and the Prometheus
text they render. A small parser of the exposition format checks every line, so a malformed
sample fails here rather than in a scraper."""

from __future__ import annotations

import math
import re
import threading

import pytest

from specdec.serving.metrics import ITL_BUCKETS, ServerMetrics
from specdec.stats import GenerationResult, GenerationStats

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} of Prometheus text format 0.0.4; AssertionError on a malformed line.

    Also checks that every sample belongs to a family declared by # HELP and # TYPE before it.
    """
    assert text.endswith("\n"), "the exposition must end with a newline"
    samples: dict[tuple[str, frozenset], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"malformed sample line: {line!r}"
        name, _, body, value = match.groups()
        labels = {}
        if body:
            pos = 0
            while pos < len(body):
                label = _LABEL.match(body, pos)
                assert label, f"malformed labels in {line!r}"
                labels[label.group(1)] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1),
                                                label.group(2))
                pos = label.end()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no # TYPE line before it"
        samples[(name, frozenset(labels.items()))] = float(value.replace("+Inf", "inf"))
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """One sample's value; labels not given (model_name) match anything."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def histogram(samples: dict, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """([(le, cumulative count)], sum, count) of one histogram."""
    buckets = sorted((float(dict(ls)["le"].replace("+Inf", "inf")), v)
                     for (n, ls), v in samples.items() if n == name + "_bucket")
    return buckets, value(samples, name + "_sum"), value(samples, name + "_count")


def result(tokens: int = 5, *, reason: str = "length", prompt: int = 7, **stats) -> GenerationResult:
    return GenerationResult("x" * tokens, list(range(tokens)), reason, GenerationStats(prompt_tokens=prompt, **stats))


NAMES = [
    "specdec:num_requests_waiting", "specdec:num_requests_running", "specdec:request_queued_total",
    "specdec:request_rejected_total", "specdec:request_failure_total", "specdec:prompt_tokens_total",
    "specdec:generation_tokens_total", "specdec:spec_decode_num_drafts_total",
    "specdec:spec_decode_num_draft_tokens_total", "specdec:spec_decode_num_accepted_tokens_total",
    "specdec:cache_errors_total",
]


def test_empty_metrics_render_every_family_at_zero():
    samples = parse_prometheus(ServerMetrics(model_name="m").render(3, 2))
    assert value(samples, "specdec:num_requests_waiting") == 3
    assert value(samples, "specdec:num_requests_running") == 2
    for name in NAMES[2:]:
        assert value(samples, name) == 0, name
    for reason in ("stop", "length", "cancelled", "deadline"):
        assert value(samples, "specdec:request_success_total", finished_reason=reason) == 0
    for kind in ("trusted", "verified", "partial", "rejected"):
        assert value(samples, "specdec:cache_hits_total", kind=kind) == 0
    for name in ("specdec:time_to_first_token_seconds", "specdec:inter_token_latency_seconds",
                 "specdec:request_queue_time_seconds"):
        buckets, total, count = histogram(samples, name)
        assert buckets[-1] == (math.inf, 0) and total == 0 and count == 0
    assert all(dict(labels)["model_name"] == "m" for _, labels in samples)


def test_finished_requests_feed_the_vllm_counters():
    m = ServerMetrics()
    # Steps: 2 drafted nothing (K=0 or a plain step), 3 drafted 3 tokens, 1 drafted 1 token.
    m.on_finished(result(10, reason="stop", prompt=4, drafted_tokens=10, accepted_tokens=6,
                         draft_lengths={0: 2, 3: 3, 1: 1}, drafted_per_position=[4, 3, 3],
                         accepted_per_position=[3, 2, 1], cache_kind="partial", cache_errors=1), "ok")
    m.on_finished(result(3, prompt=5, drafted_tokens=2, accepted_tokens=2, draft_lengths={2: 1},
                         drafted_per_position=[1, 1], accepted_per_position=[1, 1]), "ok")
    m.on_finished(result(2, reason="cancelled", prompt=6), "cancelled")
    m.on_finished(result(0, reason="deadline", prompt=0), "deadline")
    m.on_finished(None, "error")
    s = parse_prometheus(m.render(0, 0))
    assert value(s, "specdec:request_success_total", finished_reason="stop") == 1
    assert value(s, "specdec:request_success_total", finished_reason="length") == 1
    assert value(s, "specdec:request_success_total", finished_reason="cancelled") == 1
    assert value(s, "specdec:request_success_total", finished_reason="deadline") == 1
    assert value(s, "specdec:request_failure_total") == 1
    assert value(s, "specdec:prompt_tokens_total") == 4 + 5 + 6
    assert value(s, "specdec:generation_tokens_total") == 10 + 3 + 2
    assert value(s, "specdec:spec_decode_num_drafts_total") == 3 + 1 + 1
    assert value(s, "specdec:spec_decode_num_draft_tokens_total") == 12
    assert value(s, "specdec:spec_decode_num_accepted_tokens_total") == 8
    assert [value(s, "specdec:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(3)] \
        == [4, 3, 1]
    assert [value(s, "specdec:spec_decode_num_draft_tokens_per_pos_total", position=str(i)) for i in range(3)] \
        == [5, 4, 3]
    assert value(s, "specdec:cache_hits_total", kind="partial") == 1
    assert value(s, "specdec:cache_errors_total") == 1


def test_queue_hooks_and_latency_histograms():
    m = ServerMetrics()
    for _ in range(3):
        m.on_queued()
    m.on_rejected()
    m.on_started(0.02)
    m.on_first_token(0.3)
    m.on_tokens(4, 0.02)  # 4 tokens in one step: four inter-token latencies of 5 ms
    m.on_tokens(1, 0.2)
    m.on_tokens(0, 0.5)  # nothing arrived: nothing to record
    s = parse_prometheus(m.render(0, 0))
    assert value(s, "specdec:request_queued_total") == 3
    assert value(s, "specdec:request_rejected_total") == 1
    buckets, total, count = histogram(s, "specdec:inter_token_latency_seconds")
    assert count == 5 and total == pytest.approx(0.22)
    cumulative = dict(buckets)
    assert cumulative[0.0025] == 0 and cumulative[0.005] == 4  # le is inclusive
    assert cumulative[0.15] == 4 and cumulative[0.2] == 5 and cumulative[math.inf] == 5
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "bucket counts are cumulative"
    assert len(buckets) == len(ITL_BUCKETS) + 1
    _, ttft_sum, ttft_count = histogram(s, "specdec:time_to_first_token_seconds")
    assert (ttft_sum, ttft_count) == (pytest.approx(0.3), 1)
    _, queue_sum, queue_count = histogram(s, "specdec:request_queue_time_seconds")
    assert (queue_sum, queue_count) == (pytest.approx(0.02), 1)


def test_hooks_never_raise_on_odd_input():
    m = ServerMetrics()
    m.on_started(float("nan"))
    m.on_first_token(-1.0)
    m.on_finished(result(1, reason="weird"), "weird")  # a status the scheduler may add later
    s = parse_prometheus(m.render(0, 0))
    assert value(s, "specdec:request_success_total", finished_reason="weird") == 1
    assert histogram(s, "specdec:request_queue_time_seconds")[1:] == (0.0, 1)


def test_label_values_are_escaped():
    name = 'a "quoted"\\name\nwith a newline'
    samples = parse_prometheus(ServerMetrics(model_name=name).render(0, 0))
    assert {dict(labels)["model_name"] for _, labels in samples} == {name}


def test_hooks_from_many_threads_lose_nothing():
    m = ServerMetrics()
    threads, per_thread = 8, 500
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            m.on_queued()
            m.on_tokens(2, 0.01)
            m.on_finished(result(3, drafted_tokens=2, accepted_tokens=1, draft_lengths={2: 1},
                                 drafted_per_position=[1, 1], accepted_per_position=[1, 0]), "ok")
            m.render(0, 0)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    n = threads * per_thread
    s = parse_prometheus(m.render(0, 0))
    assert value(s, "specdec:request_queued_total") == n
    assert value(s, "specdec:generation_tokens_total") == 3 * n
    assert value(s, "specdec:spec_decode_num_drafts_total") == n
    assert value(s, "specdec:spec_decode_num_accepted_tokens_per_pos_total", position="0") == n
    assert histogram(s, "specdec:inter_token_latency_seconds")[2] == 2 * n
