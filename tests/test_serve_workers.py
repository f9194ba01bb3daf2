"""`specdec serve --workers N`: engine processes behind one server (specdec.serving.workers).

Each worker is a real process that loads the bundled pair through from_pretrained, as the
command does. Outputs are compared with the same requests run in-process (greedy: plain
greedy decoding; sampled: the same seed), whichever worker decoded them.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from specdec.serving import Failed, Finished, QueueFull  # noqa: E402
from specdec.serving.app import create_app  # noqa: E402
from specdec.serving.workers import EngineWorkers, WorkerGone  # noqa: E402
from test_serve import (LONG, NAME, PROMPTS, WAIT_S, RunningServer, answer_then_ctrl_c, httpx,  # noqa: E402
                        load_generator, wait_until)
from test_serve_metrics import value  # noqa: E402

LOAD = {"target": "bundled"}


def long_kwargs() -> dict:
    return {"max_new_tokens": LONG, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference():
    return load_generator()


@contextlib.contextmanager
def workers_server(**options):
    engines = EngineWorkers(LOAD, workers=2, threads=1, **options)
    server = RunningServer(create_app(None, model_name=NAME, workers=engines)).start()
    try:
        yield server, engines
    finally:
        server.stop()
        assert all(not w.process.is_alive() for w in engines.workers), "an engine worker outlived the server"


@pytest.fixture(scope="module")
def served():
    with workers_server(max_batch=4) as pair:
        yield pair


def test_requests_on_either_worker_equal_in_process_generate(served, reference):
    server, engines = served
    client = server.client()
    requests = [
        dict(prompt=PROMPTS[i % 2], max_tokens=12 + i, **({"temperature": 0} if i % 2 == 0 else
                                                          {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i}))
        for i in range(8)
    ]
    accepted_before = list(engines.accepted)
    texts: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        try:
            start.wait()
            texts[i] = client.completions.create(model=NAME, **requests[i]).choices[0].text
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not errors, errors
    for i, request in enumerate(requests):
        kwargs = {k: v for k, v in request.items() if k != "prompt"}
        kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
        expected = reference.generate(request["prompt"], **kwargs)[0].text
        assert texts[i] == expected, f"request {i} ({request}) differs from generate"
    per_worker = [a - b for a, b in zip(engines.accepted, accepted_before)]
    assert sum(per_worker) == len(requests) and min(per_worker) > 0, per_worker


def test_a_request_goes_to_the_worker_with_fewest_and_cancels_there(served):
    _, engines = served
    first = engines.submit("x", **long_kwargs())
    second = engines.submit("y", **long_kwargs())
    try:
        assert {first.worker.index, second.worker.index} == {0, 1}
        wait_until(lambda: engines.running == 2, "both rows decode, one per worker")
    finally:
        first.cancel()
        second.cancel()
    for ticket in (first, second):
        assert ticket.wait(WAIT_S).finish_reason == "cancelled"
    wait_until(lambda: engines.running == 0 and engines.outstanding == [0, 0], "both workers idle")


def test_refusals_cross_the_process_boundary_as_400s(served, reference):
    server, _ = served
    client = server.client()
    for request, param in ((dict(max_tokens=100_000), "prompt"), (dict(stop=[""]), "stop")):
        with pytest.raises(openai.BadRequestError) as caught:  # refused by a worker's check_request
            client.completions.create(model=NAME, prompt=PROMPTS[0], **{"max_tokens": 4, **request})
        error = caught.value
        assert error.status_code == 400 and error.body["type"] == "invalid_request_error"
        assert error.body["param"] == param and "Traceback" not in error.body["message"]
    model = server.client().models.retrieve(NAME)
    assert model.max_model_len == reference.max_positions  # reported by the first worker


def test_metrics_and_health_add_up_over_the_workers(served):
    server, engines = served
    before = server.metrics()
    client = server.client()
    responses = [client.completions.create(model=NAME, prompt=PROMPTS[i % 2], max_tokens=6 + i, temperature=0)
                 for i in range(4)]
    after = server.metrics()

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("specdec:request_queued_total") == 4
    finished = sum(delta("specdec:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert finished == 4
    assert delta("specdec:generation_tokens_total") == sum(r.usage.completion_tokens for r in responses)
    assert delta("specdec:spec_decode_num_accepted_tokens_total") == sum(r.specdec["accepted_tokens"]
                                                                        for r in responses)
    assert value(after, "specdec:num_requests_running") == 0 and value(after, "specdec:num_requests_waiting") == 0
    health = httpx.get(server.url + "/health", timeout=WAIT_S).json()
    assert health == {"status": "ok", "waiting": 0, "running": 0, "workers": {"alive": 2, "started": 2}}
    assert value(after, "specdec:engine_workers_alive") == 2 and value(after, "specdec:engine_workers") == 2


def test_a_full_queue_on_every_worker_answers_429():
    """One row and one queue slot per worker: four long requests fill both, the fifth is 429."""
    with workers_server(max_batch=1, max_queue=1) as (server, engines):
        held = []
        try:
            for i in range(2):  # one decoding row per worker
                held.append(engines.submit(PROMPTS[0], **long_kwargs()))
            wait_until(lambda: engines.running == 2, "a row decodes on each worker")
            for i in range(2):  # then one waiting request per worker
                held.append(engines.submit(PROMPTS[1], **long_kwargs()))
            with pytest.raises(QueueFull):
                engines.submit("x", max_new_tokens=2)
            refused = httpx.post(server.url + "/v1/completions", timeout=WAIT_S,
                                 json={"model": NAME, "prompt": "x", "max_tokens": 2})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
            assert httpx.get(server.url + "/health", timeout=WAIT_S).json()["waiting"] == 2
        finally:
            for ticket in held:
                ticket.cancel()
        for ticket in held:
            assert ticket.wait(WAIT_S).finish_reason == "cancelled"
        response = server.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert response.choices[0].finish_reason == "length"
        samples = server.metrics()
        assert value(samples, "specdec:request_rejected_total") == 2


def test_a_closed_stream_cancels_its_row_on_the_worker(served):
    server, engines = served
    cancelled_before = server.app.state.metrics.finished["cancelled"]
    stream = server.client().completions.create(model=NAME, prompt="x", max_tokens=LONG, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    wait_until(lambda: server.app.state.metrics.finished["cancelled"] == cancelled_before + 1,
               "the worker ended the row as cancelled")
    wait_until(lambda: engines.running == 0, "the row left the batch")


def test_a_dead_worker_fails_its_requests_and_the_others_go_on(reference):
    """SIGKILL one worker mid-request: its request fails (WorkerGone), new requests go to the
    other worker and equal generate, /health says one of two is alive; with both gone /health
    is 503 and requests are answered 503. Shutdown finishes the request in flight."""
    engines = EngineWorkers(LOAD, workers=2, threads=1, max_batch=2).start()
    try:
        doomed = engines.submit("x", **long_kwargs())
        survivor = engines.submit("y", **long_kwargs())
        wait_until(lambda: engines.running == 2, "a row on each worker")
        doomed.worker.process.kill()
        with pytest.raises(WorkerGone):
            doomed.wait(WAIT_S)
        assert not doomed.worker.alive and engines.alive == (1, 2)
        after = engines.submit(PROMPTS[0], max_new_tokens=10, temperature=0)
        assert after.worker is survivor.worker
        assert after.wait(WAIT_S).text == reference.generate(PROMPTS[0], max_new_tokens=10, temperature=0)[0].text
        survivor.cancel()
        assert survivor.wait(WAIT_S).finish_reason == "cancelled"
        last = engines.submit(PROMPTS[1], max_new_tokens=24, temperature=0)
    finally:
        finished = engines.shutdown(cancel=False, timeout=WAIT_S)
    assert finished
    assert last.wait(0).finish_reason == "length" and len(last.result.token_ids) == 24
    assert all(not w.process.is_alive() for w in engines.workers)


def test_health_and_requests_when_workers_die():
    with workers_server(max_batch=2) as (server, engines):
        engines.workers[0].process.kill()
        wait_until(lambda: engines.alive == (1, 2), "the server noticed the dead worker")
        health = httpx.get(server.url + "/health", timeout=WAIT_S)
        assert health.status_code == 200 and health.json()["workers"] == {"alive": 1, "started": 2}
        response = server.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert response.choices[0].finish_reason == "length"
        assert value(server.metrics(), "specdec:engine_workers_alive") == 1
        engines.workers[1].process.kill()
        wait_until(lambda: engines.alive == (0, 2), "the server noticed both dead workers")
        health = httpx.get(server.url + "/health", timeout=WAIT_S)
        assert health.status_code == 503 and health.json()["status"] == "no engine worker"
        refused = httpx.post(server.url + "/v1/completions", timeout=WAIT_S,
                             json={"model": NAME, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"


def test_events_arrive_in_order_and_end_once(served):
    _, engines = served
    events = []
    ticket = engines.submit(PROMPTS[1], on_event=events.append, max_new_tokens=20, temperature=0)
    result = ticket.wait(WAIT_S)
    assert isinstance(events[-1], Finished) and not any(isinstance(e, (Finished, Failed)) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == result.text


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(x) for x in text]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc")
def test_serve_command_with_workers_answers_then_stops_them_on_ctrl_c(tmp_path):
    children: list[int] = []
    log = answer_then_ctrl_c(tmp_path, "--workers", "2", started=lambda proc: children.extend(_children(proc.pid)))
    assert "Loading weights" not in log  # the workers are as quiet as the server
    assert len(children) >= 2
    wait_until(lambda: not any(_running(pid) for pid in children), "the engine workers exited with the server")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
