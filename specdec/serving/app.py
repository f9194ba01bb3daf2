"""`specdec serve`: an OpenAI-compatible HTTP server over the scheduler.

    client --HTTP--> FastAPI endpoint (event loop)                 scheduler thread
                     validate (protocol.py) -> 400/404
                     submit() in a worker thread -----------------> queue / batch
                     (429 queue full, 503 shutting down)            |
                     await events  <-- loop.call_soon_threadsafe -- on_event(TextDelta / Finished / Failed)
                     JSON response, or server-sent events

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and
/v1/models/{id}), GET /health, GET /metrics (Prometheus text, specdec.serving.metrics).

Requests and responses are OpenAI's (specdec.serving.protocol), plus a `specdec` field with
the request's speculative decoding statistics. Where OpenAI's defaults exist they apply:
temperature 1.0 and top_p 1.0 when left out (send temperature 0 for greedy decoding), and
max_tokens 16 for completions; chat's default is `default_chat_max_tokens`, lowered to what
the model's context has room for after the prompt.

Ending early:
- The client goes away (streaming or not): the request is cancelled, its row leaves the
  batch at the next step.
- The request's deadline (`request_timeout`) passes: a non-streamed request is answered 504
  (code "request_timeout") and its partial text is dropped, since a 200 would pass a cut-off
  text for a finished one (OpenAI has no finish_reason for it); a stream that already sent
  text ends with an error event, then `data: [DONE]`.
- The server stops taking requests (shutdown): new requests get 503; a request the
  scheduler had to cancel while shutting down gets 503 (streams: an error event).
Errors always carry OpenAI's body {"error": {"message", "type", "param", "code"}}, never a
traceback: a failure inside the model is logged on the server and answered 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..stats import GenerationResult
from . import protocol
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .scheduler import (DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, Failed, Finished, NoEngineWorker, QueueFull, Scheduler,
                        SchedulerClosed, check_count)

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_SHUTDOWN_TIMEOUT = 60.0
CLIENT_CLOSED = 499  # the status logged for a request whose client went away (nobody reads it)


def create_app(
    generator,
    *,
    model_name: str,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    request_timeout: float | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    default_chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS,
    drafter: str | None = None,
    num_draft_tokens: int | str | None = None,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    workers: Any = None,
) -> FastAPI:
    """The FastAPI app serving `generator` (a SpeculativeGenerator) under the name `model_name`.

    With `workers` (a specdec.serving.workers.EngineWorkers; `generator` is then None) the
    requests are decoded by its engine processes instead of a scheduler thread of this one;
    they are started here if they are not yet, and stopped with the app.

    A Scheduler (with a ServerMetrics) starts with the app's lifespan; when the app stops,
    in-flight and queued requests are finished and the cache's writes flushed, for at most
    `shutdown_timeout` seconds (scheduler.shutdown(cancel=False)). `request_timeout` is each
    request's deadline in seconds (None: none). `drafter` and `num_draft_tokens`, when given,
    apply to every request (else generate()'s defaults). The scheduler and the metrics are
    `app.state.scheduler` and `app.state.metrics`.
    """
    check_app_options(model_name=model_name, request_timeout=request_timeout, default_max_tokens=default_max_tokens,
                      default_chat_max_tokens=default_chat_max_tokens, shutdown_timeout=shutdown_timeout)
    server_options = {k: v for k, v in (("drafter", drafter), ("num_draft_tokens", num_draft_tokens)) if v is not None}
    if workers is not None:
        from .workers import WorkerGenerator

        if generator is not None:
            raise ValueError("pass a generator or workers, not both: each engine worker loads its own generator")
        workers.start()
        generator = WorkerGenerator(workers)
    try:  # a drafter the generator cannot run (or no tokenizer) fails here, not in every request
        generator.check_request("x", max_new_tokens=1, **server_options)
    except (ValueError, TypeError) as exc:
        if workers is not None:
            workers.shutdown(cancel=True, timeout=5.0)
        raise ValueError(f"the server cannot answer requests with this generator and these options: {exc}") from exc
    metrics = ServerMetrics(model_name=model_name)
    if workers is not None:
        workers.metrics = metrics
        scheduler = workers
    else:
        scheduler = Scheduler(generator, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
    server = _Server(generator, scheduler, model_name=model_name, request_timeout=request_timeout,
                     default_max_tokens=default_max_tokens, default_chat_max_tokens=default_chat_max_tokens,
                     server_options=server_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            server.closing = True
            finished = await run_in_threadpool(scheduler.shutdown, cancel=False, timeout=shutdown_timeout)
            if not finished:
                logger.warning("shutdown: requests or cache writes were still pending after %.0f s", shutdown_timeout)

    from .. import __version__

    app = FastAPI(title="specdec", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions with speculative decoding")
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.model_name = model_name

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = protocol.validation_error(list(exc.errors()))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; see /v1/completions, /v1/chat/completions"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(protocol.error_body(message, type=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The server logs the traceback (the exception goes on to uvicorn); the client gets none.
        body = protocol.error_body(f"internal server error ({type(exc).__name__}); see the server log",
                                   type="server_error", code="internal_error")
        return JSONResponse(body, status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.handle(body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.handle(body, request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        server.check_model(model_id)
        return server.model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok", "waiting": scheduler.queue_length, "running": scheduler.running}
        if workers is not None:
            alive, started = workers.alive
            body["workers"] = {"alive": alive, "started": started}
            if not alive:
                body["status"] = "no engine worker"  # a load balancer takes this server out
        if server.closing:
            body["status"] = "shutting down"
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render(scheduler.queue_length, scheduler.running,
                              workers.alive if workers is not None else None)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    return app


def check_app_options(
    *,
    model_name: Any = "model",
    request_timeout: Any = None,
    default_max_tokens: Any = DEFAULT_MAX_TOKENS,
    default_chat_max_tokens: Any = DEFAULT_CHAT_MAX_TOKENS,
    shutdown_timeout: Any = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """ValueError/TypeError for server options that cannot work (before any model loads)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty str (the name clients pass as `model`), got {model_name!r}")
    for name, value in (("request_timeout", request_timeout), ("shutdown_timeout", shutdown_timeout)):
        if value is None and name == "request_timeout":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    defaults = (("default_max_tokens", default_max_tokens), ("default_chat_max_tokens", default_chat_max_tokens))
    for name, value in defaults:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class _Server:
    """The endpoints' shared state and the request path (validate, submit, wait or stream)."""

    def __init__(self, generator, scheduler: Scheduler, *, model_name: str,
                 request_timeout: float | None, default_max_tokens: int, default_chat_max_tokens: int,
                 server_options: dict) -> None:
        self.generator = generator
        self.scheduler = scheduler
        self.model_name = model_name
        self.request_timeout = request_timeout
        self.default_max_tokens = default_max_tokens
        self.default_chat_max_tokens = default_chat_max_tokens
        self.server_options = server_options  # generate() options of every request (drafter, num_draft_tokens)
        self.created = protocol.now()
        self.closing = False

    def model_card(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "specdec"}
        if self.generator.max_positions is not None:
            card["max_model_len"] = self.generator.max_positions
        return card

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r} "
                                "(see /v1/models)", param="model", code="model_not_found")

    # ------------------------------------------------------------------ one request

    async def handle(self, body: CompletionRequest | ChatCompletionRequest, request: Request, *,
                     chat: bool) -> Response:
        """Validate, submit, then answer with the result or stream it (see the module docstring)."""
        self.check_model(body.model)
        protocol.unsupported_fields(body)
        prompt: Any = protocol.chat_prompt(body) if chat else protocol.completion_prompt(body)
        max_tokens = protocol.max_tokens_of(body)
        if max_tokens is None and chat:
            max_tokens = await run_in_threadpool(self._chat_budget, prompt)
        elif max_tokens is None:
            max_tokens = self.default_max_tokens
        kwargs = {**protocol.generate_kwargs(body, max_tokens), **self.server_options}
        prompt_field = "messages" if chat else "prompt"

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event) -> None:  # the scheduler thread: hand the event to the event loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        try:
            ticket = await run_in_threadpool(self.scheduler.submit, prompt, on_event=on_event,
                                             deadline_s=self.request_timeout, **kwargs)
        except (ValueError, TypeError) as exc:
            raise protocol.request_error(exc, prompt_field) from None
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}) from None
        except SchedulerClosed as exc:
            code = "engine_unavailable" if isinstance(exc, NoEngineWorker) else "shutting_down"
            raise APIError(503, str(exc), type="server_error", code=code) from None

        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        created = protocol.now()
        if body.stream:
            chunks = protocol.ChunkMaker(request_id, self.model_name, created, chat=chat,
                                         include_usage=body.include_usage)
            return _EventStream(self._stream(ticket, events, chunks), ticket)
        try:
            event = await _until_done_or_gone(events, request)
        finally:
            if not ticket.done:  # the client went away, or this handler was cancelled
                ticket.cancel()
        if event is None:
            return Response(status_code=CLIENT_CLOSED)
        result = self._result_or_raise(event, ticket)
        build = protocol.chat_response if chat else protocol.completion_response
        return JSONResponse(build(request_id, self.model_name, created, result))

    def _chat_budget(self, messages: list[dict]) -> int:
        """Chat's default max_tokens: default_chat_max_tokens, lowered to the context left after the prompt."""
        budget = self.default_chat_max_tokens
        limit = self.generator.max_positions
        tokenizer = self.generator.tokenizer
        if limit is None or tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return budget  # the request's own check says what is wrong, if anything
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            room = limit - len(tokenizer(text)["input_ids"])
        except Exception:  # noqa: BLE001 - a template that fails is reported by the request's own check
            return budget
        return min(budget, room) if room > 0 else budget

    def _result_or_raise(self, event, ticket) -> GenerationResult:
        """The result of a finished request; an APIError for one that ended otherwise."""
        if isinstance(event, Failed):
            error = event.error
            raise APIError(500, f"generation failed ({type(error).__name__}: {error}); request {ticket.id}, "
                                "see the server log", type="server_error", code="internal_error")
        result = event.result
        if result.finish_reason in protocol.FINISH_REASONS:
            return result
        if result.finish_reason == "deadline":
            raise APIError(504, f"the request did not finish within the server's request timeout of "
                                f"{self.request_timeout:g} s; lower max_tokens or retry later",
                           type="timeout_error", code="request_timeout")
        raise APIError(503, "the server shut down before the request finished; retry", type="server_error",
                       code="shutting_down")

    async def _stream(self, ticket, events: asyncio.Queue, chunks: protocol.ChunkMaker) -> AsyncIterator[str]:
        """Server-sent events of one request: text chunks, the final chunk(s), then [DONE]."""
        try:
            if chunks.chat:
                yield _sse(chunks.role())
            while True:
                event = await events.get()
                if isinstance(event, (Finished, Failed)):
                    break
                if event.text:
                    yield _sse(chunks.text(event.text))
            try:
                result = self._result_or_raise(event, ticket)
            except APIError as error:
                yield _sse(error.body())
            else:
                for chunk in chunks.final(result):
                    yield _sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            if not ticket.done:
                ticket.cancel()


class _EventStream(StreamingResponse):
    """A text/event-stream response that cancels its request when it ends before the request
    does: the client went away (the body is cancelled or a send fails) or the server stops."""

    def __init__(self, content: AsyncIterator[str], ticket) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._ticket.done:
                self._ticket.cancel()


async def _until_done_or_gone(events: asyncio.Queue, request: Request):
    """The Finished/Failed event of a non-streamed request, or None when the client disconnects first."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return None
            event = get.result()
            if isinstance(event, (Finished, Failed)):
                return event
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body was read already: the next message says so)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


# --------------------------------------------------------------------------- running it


def serve(
    target: str = "bundled",
    draft: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    cache: str | None = None,
    model_name: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    request_timeout: float | None = None,
    drafter: str | None = None,
    num_draft_tokens: int | str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | None = None,
    numerics: str = "native",
    compile: bool = False,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: str = "info",
    head: Any = "default",
    workers: int = 1,
    threads: int | None = None,
) -> None:
    """Load `target` (and `draft`, and `head`: an EAGLE-3 head) with SpeculativeGenerator.from_pretrained and serve them over
    HTTP until interrupted (Ctrl-C finishes the requests in flight, then stops).

    `model_name` is the name clients pass as `model` (default: `target` as given). The host
    defaults to 127.0.0.1 (this machine only): the server has no authentication, so listen on
    other interfaces only behind something that has. `compile=True` runs decoding steps
    through torch.compile and compiles them (single rows and batches) before the server
    listens: a server runs long enough to earn the warm-up back (see SpeculativeGenerator.warmup).
    `workers` > 1 decodes in that many engine processes (each loads the models and runs its
    own batch; specdec.serving.workers), `threads` torch threads each: on a machine of C
    cores, workers x threads <= C.
    """
    from .. import SpeculativeGenerator

    name = model_name if model_name is not None else str(target)
    check_app_options(model_name=name, request_timeout=request_timeout, shutdown_timeout=shutdown_timeout)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    load = dict(target=target, draft=draft, device=device, dtype=dtype, device_map=device_map, cache=cache,
                numerics=numerics, compile=compile, head=head)  # from_pretrained's, here or in each worker
    if check_count("workers", workers) > 1:
        from .workers import EngineWorkers

        if compile:
            logger.warning("compiling decoding steps in %d engine workers before listening", workers)
        engines = EngineWorkers(load, workers=workers, max_batch=max_batch, max_queue=max_queue, threads=threads,
                                warmup=compile)
        engines.start()
        if compile:
            logger.warning("compiled in %s s", ", ".join(f"{s:.1f}" for s in engines.warmup_seconds))
        app = create_app(None, model_name=name, request_timeout=request_timeout, drafter=drafter,
                         num_draft_tokens=num_draft_tokens, shutdown_timeout=shutdown_timeout, workers=engines)
        _run_app(app, host, port, log_level, shutdown_timeout)
        return
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    generator = SpeculativeGenerator.from_pretrained(**load)
    if compile:
        logger.warning("compiling decoding steps before listening (about a minute cold, seconds from the compile cache)")
        logger.warning("compiled in %.1f s", generator.warmup(batches=max_batch > 1))
        from ..fused import freeze

        freeze()  # a sampling setting not compiled now runs eagerly (the same tokens), never stalls the batch
    app = create_app(generator, model_name=name, max_batch=max_batch, max_queue=max_queue,
                     request_timeout=request_timeout, drafter=drafter, num_draft_tokens=num_draft_tokens,
                     shutdown_timeout=shutdown_timeout)
    _run_app(app, host, port, log_level, shutdown_timeout)


def _run_app(app: FastAPI, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the server has no authentication; anyone who reaches this address "
                       "can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
