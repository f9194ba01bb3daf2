"""`specdec serve` over real HTTP: uvicorn in a thread on 127.0.0.1, the official openai client,
the bundled pair.

Outputs are compared with the same requests run in-process by a second generator (greedy:
plain greedy decoding; sampled: the same seed), which holds whether the scheduler batches
rows or decodes each request alone. Long requests (ignore_eos, up to the context) stand in
for busy servers: they are always ended by the test, never waited for.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

try:  # the openai client's HTTP library: httpx2 for openai 3, httpx before (the same API)
    import httpx2 as httpx
except ImportError:
    import httpx
import uvicorn  # noqa: E402

from specdec import SpeculativeGenerator  # noqa: E402
from specdec.cli import main  # noqa: E402
from specdec.serving.app import create_app  # noqa: E402
from test_serve_metrics import histogram, parse_prometheus, value  # noqa: E402

NAME = "bundled-test"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPTS = ["def fibonacci(n):\n", "import os\n\nfor name in os.listdir('.'):\n"]
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
LONG = 1000  # new tokens of a request that keeps a row busy until the test ends it
WAIT_S = 60.0  # the most any condition below is waited for


def wait_until(condition, what: str, timeout: float = WAIT_S) -> None:
    """Poll `condition` until it holds; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.005)


def load_generator() -> SpeculativeGenerator:
    gen = SpeculativeGenerator.from_pretrained("bundled")
    gen.tokenizer.chat_template = CHAT_TEMPLATE  # the bundled tokenizer has none
    return gen


class RunningServer:
    """A uvicorn server on a port of 127.0.0.1 bound before it starts, in a daemon thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._client = None

    def start(self) -> "RunningServer":
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "the server started")
        assert self.server.started, "the server thread ended before it started serving"
        return self

    def stop(self) -> None:
        """Graceful stop: uvicorn closes the socket, waits for open responses, then the app's
        lifespan shuts the scheduler down."""
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the server did not stop"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def client(self) -> "openai.OpenAI":
        """An openai client of this server (one, shared by the test's threads)."""
        if self._client is None:
            # No retries: a 429 or 5xx must reach the test as it was answered.
            self._client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=WAIT_S)
        return self._client

    def metrics(self) -> dict:
        response = httpx.get(self.url + "/metrics", timeout=WAIT_S)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus(response.text)

    def idle(self) -> bool:
        return self.scheduler.running == 0 and self.scheduler.queue_length == 0

    def ended(self, reason: str) -> int:
        """Requests the metrics counted as finished with `reason` so far."""
        return self.app.state.metrics.finished[reason]


@contextlib.contextmanager
def running_server(generator, **options):
    server = RunningServer(create_app(generator, model_name=NAME, **options)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The scheduler thread and the test's in-process runs compute at once: one intra-op thread
    each keeps them from oversubscribing a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """In-process generator for expected outputs (never used by a server)."""
    return load_generator()


@pytest.fixture(scope="module")
def served():
    """A server with default options, shared by the tests that leave it idle."""
    with running_server(load_generator()) as server:
        yield server


@pytest.fixture(scope="module")
def spare_generator():
    """The generator of the servers a test starts and stops itself (one at a time)."""
    return load_generator()


def long_request(**extra) -> dict:
    """The JSON body of a completion that runs until the test ends it (the context's length, no eos)."""
    return {"model": NAME, "prompt": "x", "max_tokens": LONG, "temperature": 0, "ignore_eos": True, **extra}


def long_kwargs() -> dict:
    """long_request() as the openai client takes it (extensions go in extra_body)."""
    body = long_request()
    extensions = {"ignore_eos": body.pop("ignore_eos")}
    return {**body, "extra_body": extensions}


# --------------------------------------------------------------------------- outputs


def test_greedy_completion_equals_in_process_generate(served, reference):
    client = served.client()
    for prompt in PROMPTS:
        response = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
        expected = reference.generate(prompt, max_new_tokens=16, temperature=0)[0]
        choice = response.choices[0]
        assert choice.text == expected.text
        assert choice.finish_reason == expected.finish_reason
        assert response.object == "text_completion" and response.model == NAME and response.id.startswith("cmpl-")
        assert response.usage.prompt_tokens == expected.stats.prompt_tokens
        assert response.usage.completion_tokens == len(expected.token_ids)
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
        stats = response.specdec
        assert set(stats) >= {"accepted_tokens", "drafted_tokens", "acceptance_rate", "mean_accepted_length",
                              "target_forwards", "cache_kind", "cache_hit"}
        assert 0 <= stats["accepted_tokens"] <= stats["drafted_tokens"]
        assert 0.0 <= stats["acceptance_rate"] <= 1.0
        assert stats["target_forwards"] >= 1 and stats["mean_accepted_length"] >= 1.0
        assert stats["cache_hit"] is False and stats["cache_kind"] is None


def test_prompt_as_a_list_of_one_string(served, reference):
    response = served.client().completions.create(model=NAME, prompt=[PROMPTS[0]], max_tokens=8, temperature=0)
    assert response.choices[0].text == reference.generate(PROMPTS[0], max_new_tokens=8, temperature=0)[0].text


def test_chat_renders_the_chat_template(served, reference):
    response = served.client().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    expected = reference.generate(MESSAGES, max_new_tokens=16, temperature=0)[0]
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == expected.stats.prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.specdec["target_forwards"] >= 1


def test_chat_default_max_tokens_fits_the_context(served, reference):
    """Without max_tokens, chat generates up to the server default, lowered to the room the
    model's context leaves after the prompt (a 256-token default would not fit here)."""
    tokenizer = reference.tokenizer
    filler = "for i in range(10):\n    print(i)\n"
    text = filler
    while len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text + filler}], tokenize=False,
                                                      add_generation_prompt=True))["input_ids"]) < 900:
        text += filler
    messages = [{"role": "user", "content": text}]
    prompt_tokens = len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False,
                                                                add_generation_prompt=True))["input_ids"])
    room = reference.max_positions - prompt_tokens
    assert 0 < room < 256
    response = served.client().chat.completions.create(model=NAME, messages=messages, temperature=0,
                                                       extra_body={"ignore_eos": True})
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == room
    assert response.choices[0].finish_reason == "length"


def test_stream_assembles_to_the_non_streamed_text(served):
    client = served.client()
    kwargs = dict(model=NAME, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == whole.choices[0].finish_reason
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    # Draft lengths are chosen from measured costs, so the statistics of two runs may differ.
    assert finished[0].specdec == usage_chunk.specdec and finished[0].specdec["target_forwards"] >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_starts_with_the_assistant_role(served):
    client = served.client()
    kwargs = dict(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].specdec["target_forwards"] >= 1
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_stop_strings(served, reference):
    prompt = PROMPTS[0]
    full = reference.generate(prompt, max_new_tokens=24, temperature=0)[0].text
    middle = len(full) // 2
    stop = next(full[i:i + 2] for i in range(middle, len(full) - 1) if full[i:i + 2].strip())
    expected = reference.generate(prompt, max_new_tokens=24, temperature=0, stop=[stop, "never seen"])[0]
    assert expected.finish_reason == "stop" and stop not in expected.text
    client = served.client()
    kwargs = dict(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never seen"])
    response = client.completions.create(**kwargs)
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected.text  # the stop string never shows
    single = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=stop)
    assert single.choices[0].text == reference.generate(prompt, max_new_tokens=24, temperature=0, stop=stop)[0].text


def test_seeded_sampling_equals_in_process_generate(served, reference):
    client = served.client()
    settings = dict(temperature=0.9, top_p=0.95, seed=1234)
    expected = reference.generate(PROMPTS[0], max_new_tokens=20, top_k=40, **settings)[0]
    kwargs = dict(model=NAME, prompt=PROMPTS[0], max_tokens=20, extra_body={"top_k": 40}, **settings)
    assert client.completions.create(**kwargs).choices[0].text == expected.text
    assert "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True)) == expected.text
    chat = reference.generate(MESSAGES, max_new_tokens=12, temperature=0.7, seed=7)[0]
    response = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0.7, seed=7)
    assert response.choices[0].message.content == chat.text


def test_concurrent_requests_each_equal_their_own_run(served, reference):
    """Requests in flight together (one batch or several) give what each gives alone."""
    cases = [
        dict(prompt=PROMPTS[0], max_tokens=12, temperature=0),
        dict(prompt=PROMPTS[1], max_tokens=20, temperature=0),
        dict(prompt=PROMPTS[0], max_tokens=16, temperature=0.8, seed=5),
        dict(prompt=PROMPTS[1], max_tokens=10, temperature=0.8, seed=6, stop=["\n\n"]),
    ]
    expected = [reference.generate(c["prompt"], max_new_tokens=c["max_tokens"],
                                   **{k: v for k, v in c.items() if k not in ("prompt", "max_tokens")})[0].text
                for c in cases]
    client = served.client()
    start = threading.Barrier(len(cases))
    texts: list = [None] * len(cases)

    def run(i: int) -> None:
        start.wait()
        texts[i] = client.completions.create(model=NAME, **cases[i]).choices[0].text

    pool = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in pool:
        t.start()
    for t in pool:
        t.join(WAIT_S)
    assert texts == expected


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=2), "n"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(prompt=["one", "two"]), "prompt"),
    (dict(prompt=[1, 2, 3]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(max_tokens=100_000), "prompt"),
    (dict(stop=[""]), "stop"),
    (dict(seed=-1), "seed"),
    (dict(logprobs=1), "logprobs"),
    (dict(echo=True), "echo"),
    (dict(best_of=2), "best_of"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=-0.5), "frequency_penalty"),
    (dict(logit_bias={"50": 10}), "logit_bias"),
    (dict(suffix="end"), "suffix"),
    (dict(extra_body={"temperatur": 0.5}), "temperatur"),
    (dict(extra_body={"max_tokens": "many"}), "max_tokens"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_bad_completion_requests_are_400_with_openai_bodies(served, kwargs, param):
    request = {"model": NAME, "prompt": "def f():", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(**request)
    error = caught.value
    assert error.status_code == 400
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.body["type"] == "invalid_request_error" and error.body["param"] == param
    assert error.body["message"] and "Traceback" not in error.body["message"]


@pytest.mark.parametrize("kwargs, param", [
    (dict(n=3), "n"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(logprobs=True), "logprobs"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user"}]), "messages.0.content"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content"),
    (dict(max_tokens=4, max_completion_tokens=5), "max_completion_tokens"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_bad_chat_requests_are_400(served, kwargs, param):
    request = {"model": NAME, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().chat.completions.create(**request)
    assert caught.value.body["param"] == param


def test_chat_accepts_text_parts_and_harmless_fields(served, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": "def add"}, {"type": "text", "text": "(a, b):"}]}]
    response = served.client().chat.completions.create(
        model=NAME, messages=messages, max_completion_tokens=8, temperature=0, user="someone",
        metadata={"k": "v"}, presence_penalty=0, frequency_penalty=0, n=1, stream_options=None)
    expected = reference.generate([{"role": "user", "content": "def add(a, b):"}], max_new_tokens=8, temperature=0)
    assert response.choices[0].message.content == expected[0].text


def test_unknown_model_is_404_model_not_found(served):
    client = served.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_raw_http_errors_are_openai_bodies(served):
    cases = [
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", b"", 400),
        ("GET", "/v1/completions", None, 405),
        ("GET", "/v1/nothing-here", None, 404),
    ]
    with httpx.Client(base_url=served.url, timeout=WAIT_S) as http:
        for method, path, body, status in cases:
            response = http.request(method, path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, (method, path, body)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert "Traceback" not in response.text


def test_models_and_health(served, reference):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    model = client.models.retrieve(NAME)
    assert model.id == NAME and model.owned_by == "specdec"
    assert model.max_model_len == reference.max_positions
    health = httpx.get(served.url + "/health", timeout=WAIT_S)
    assert health.status_code == 200 and health.json()["status"] == "ok"


# --------------------------------------------------------------------------- metrics


def test_metrics_count_the_requests_made(spare_generator):
    with running_server(spare_generator) as server:
        client = server.client()
        responses = [
            client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0),
            client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=3),
            client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10, temperature=0),
        ]
        with pytest.raises(openai.BadRequestError):  # refused before it is queued: not counted
            client.completions.create(model=NAME, prompt="x", max_tokens=2, n=2)
        samples = server.metrics()
    reasons = [r.choices[0].finish_reason for r in responses]
    for reason in ("stop", "length"):
        assert value(samples, "specdec:request_success_total", finished_reason=reason) == reasons.count(reason)
    assert value(samples, "specdec:request_success_total", finished_reason="cancelled") == 0
    assert value(samples, "specdec:request_queued_total") == 3
    assert value(samples, "specdec:request_rejected_total") == 0
    assert value(samples, "specdec:request_failure_total") == 0
    assert value(samples, "specdec:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in responses)
    assert value(samples, "specdec:generation_tokens_total") == sum(r.usage.completion_tokens for r in responses)
    drafted = sum(r.specdec["drafted_tokens"] for r in responses)
    accepted = sum(r.specdec["accepted_tokens"] for r in responses)
    assert value(samples, "specdec:spec_decode_num_draft_tokens_total") == drafted
    assert value(samples, "specdec:spec_decode_num_accepted_tokens_total") == accepted
    per_position = [v for (n, _), v in samples.items() if n == "specdec:spec_decode_num_accepted_tokens_per_pos_total"]
    assert sum(per_position) == accepted
    drafts = value(samples, "specdec:spec_decode_num_drafts_total")
    assert (drafts > 0) == (drafted > 0) and drafts <= drafted
    assert value(samples, "specdec:num_requests_waiting") == 0 and value(samples, "specdec:num_requests_running") == 0
    assert histogram(samples, "specdec:time_to_first_token_seconds")[2] == 3
    assert histogram(samples, "specdec:request_queue_time_seconds")[2] == 3
    _, _, gaps = histogram(samples, "specdec:inter_token_latency_seconds")
    assert 0 < gaps <= sum(r.usage.completion_tokens for r in responses)


# --------------------------------------------------------------------------- overload, disconnects, deadlines


def test_full_queue_answers_429_with_retry_after(spare_generator):
    """One row and one queue slot: a long request decodes, a second waits, the third is refused
    with 429 and a Retry-After while /health still answers; ending the long ones frees the server."""
    with running_server(spare_generator, max_batch=1, max_queue=1) as server, \
            httpx.Client(base_url=server.url, timeout=WAIT_S) as http, contextlib.ExitStack() as held:
        first = held.enter_context(http.stream("POST", "/v1/completions", json=long_request(stream=True)))
        assert first.status_code == 200
        wait_until(lambda: server.scheduler.running == 1, "the first request started decoding")
        second = held.enter_context(http.stream("POST", "/v1/completions", json=long_request(stream=True)))
        assert second.status_code == 200
        wait_until(lambda: server.scheduler.queue_length == 1, "the second request waited in the queue")
        refused = http.post("/v1/completions", json=long_request())
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            server.client().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
        health = http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok", "waiting": 1, "running": 1}
        samples = server.metrics()
        assert value(samples, "specdec:request_rejected_total") == 2
        assert value(samples, "specdec:num_requests_waiting") == 1
        assert value(samples, "specdec:num_requests_running") == 1
        held.close()  # the clients go away: their requests are cancelled
        wait_until(server.idle, "the cancelled requests left the scheduler")
        response = server.client().completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0)
        assert response.choices[0].finish_reason in ("stop", "length")


def test_closing_a_stream_cancels_its_request(spare_generator):
    with running_server(spare_generator) as server:
        stream = server.client().completions.create(**long_kwargs(), stream=True)
        next(iter(stream))  # the request is decoding
        stream.close()
        # A row leaves the batch just before its request is counted: wait for both.
        wait_until(lambda: server.ended("cancelled") == 1 and server.idle(), "the closed stream's row left the batch")
        assert value(server.metrics(), "specdec:request_success_total", finished_reason="cancelled") == 1


def test_a_client_that_leaves_a_non_streamed_request_cancels_it(spare_generator):
    with running_server(spare_generator) as server:
        body = json.dumps(long_request()).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as client:
            client.sendall(head + body)
            wait_until(lambda: server.scheduler.running == 1, "the request started decoding")
        wait_until(lambda: server.ended("cancelled") == 1 and server.idle(), "the departed client's row left the batch")
        assert value(server.metrics(), "specdec:request_success_total", finished_reason="cancelled") == 1


def test_request_timeout_is_504_or_an_error_event(spare_generator):
    with running_server(spare_generator, request_timeout=0.5) as server:
        client = server.client()
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(**long_kwargs())
        assert caught.value.status_code == 504 and caught.value.body["code"] == "request_timeout"
        with pytest.raises(openai.APIError, match="request timeout"):
            for _ in client.completions.create(**long_kwargs(), stream=True):
                pass
        assert value(server.metrics(), "specdec:request_success_total", finished_reason="deadline") == 2
        short = client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0)
        assert short.choices[0].finish_reason in ("stop", "length")


# --------------------------------------------------------------------------- shutdown


def test_graceful_shutdown_finishes_the_stream_in_flight(spare_generator, reference):
    server = RunningServer(create_app(spare_generator, model_name=NAME)).start()
    try:
        kwargs = dict(model=NAME, prompt=PROMPTS[0], max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
        stream = iter(server.client().completions.create(**kwargs, stream=True))
        texts = [next(stream).choices[0].text]
        server.server.should_exit = True  # what Ctrl-C does
        chunks = list(stream)
    finally:
        server.stop()
    texts += [c.choices[0].text for c in chunks]
    expected = reference.generate(PROMPTS[0], max_new_tokens=300, temperature=0, ignore_eos=True)[0]
    assert "".join(texts) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.idle()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=WAIT_S)


def test_requests_the_scheduler_cancels_at_shutdown_get_503(spare_generator):
    with running_server(spare_generator) as server:
        outcome: dict = {}

        def request() -> None:
            try:
                server.client().completions.create(**long_kwargs())
            except openai.APIStatusError as error:
                outcome["error"] = error

        thread = threading.Thread(target=request)
        thread.start()
        wait_until(lambda: server.scheduler.running == 1, "the request started decoding")
        assert server.scheduler.shutdown(cancel=True, timeout=WAIT_S)
        thread.join(WAIT_S)
        assert outcome["error"].status_code == 503 and outcome["error"].body["code"] == "shutting_down"
        with pytest.raises(openai.InternalServerError) as caught:  # the scheduler takes no new requests
            server.client().completions.create(model=NAME, prompt="x", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "shutting_down"


def test_server_wide_drafter_option(spare_generator, reference):
    with running_server(spare_generator, drafter="none") as server:
        response = server.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert response.choices[0].text == reference.generate(PROMPTS[0], max_new_tokens=12, temperature=0)[0].text
    assert response.specdec["drafted_tokens"] == 0  # plain decoding: nothing drafted
    assert response.specdec["target_forwards"] == response.usage.completion_tokens


@pytest.mark.parametrize("options, message", [
    (dict(drafter="bogus"), "bogus"),
    (dict(num_draft_tokens=-1), "num_draft_tokens"),
    (dict(model_name=""), "model_name"),
    (dict(request_timeout=0), "request_timeout"),
    (dict(default_max_tokens=0), "default_max_tokens"),
    (dict(max_queue=0), "max_queue"),
])
def test_create_app_refuses_options_that_cannot_work(spare_generator, options, message):
    with pytest.raises(ValueError, match=message):
        create_app(spare_generator, **{"model_name": NAME, **options})


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--request-timeout", "0"], "--request-timeout"),
    (["serve", "--max-queue", "0"], "--max-queue"),
    (["serve", "--num-draft-tokens", "many"], "--num-draft-tokens"),
])
def test_serve_command_refuses_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_command_refuses_an_unknown_drafter_before_loading(capsys):
    assert main(["serve", "--drafter", "bogus"]) == 2
    assert "--drafter 'bogus' is unknown" in capsys.readouterr().err


def answer_then_ctrl_c(tmp_path, *options: str, started=lambda proc: None) -> str:
    """Run `specdec serve` with `options`, answer one completion, stop it with Ctrl-C (SIGINT);
    `started(proc)` runs once it answers /health. Returns its log, after checking the exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "specdec.cli", "serve", "--port", str(port), "--model-name", NAME,
             "--threads", "1", "--max-batch", "4", "--log-level", "warning", *options],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        def healthy() -> bool:
            assert proc.poll() is None, f"specdec serve exited early:\n{log.read_text()}"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, "specdec serve answered /health", timeout=180)
        started(proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        response = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert response.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        code = proc.wait(WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code in (0, 130), text
    assert "Traceback" not in text
    return text


def test_serve_command_answers_then_stops_on_ctrl_c(tmp_path):
    answer_then_ctrl_c(tmp_path)
