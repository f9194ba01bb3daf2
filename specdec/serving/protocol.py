"""The OpenAI wire format of `specdec serve`: request schemas, response and error bodies.

Requests are pydantic models that forbid unknown fields (a typo is a 400 naming the field,
not a silently ignored option). OpenAI fields this runtime cannot honour (log
probabilities, penalties, logit bias, several choices, tools, ...) are accepted by the
schema only to be refused with a message saying why (`unsupported_fields`); harmless ones
(`user`, `metadata`, `stream_options`, ...) are accepted and ignored. Extensions that vLLM
also takes: `top_k`, `ignore_eos`, `stop_token_ids`.

Responses follow OpenAI's `text_completion` / `chat.completion` objects and their
streamed chunks, plus one extension field, `specdec`, with the request's speculative
decoding statistics (`specdec_stats`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..stats import GenerationResult

# Finish reasons a finished request reports in a 200 response (the others become errors).
FINISH_REASONS = ("stop", "length")


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered with OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# generate() option -> the request field that sets it, for naming `param` in submit's errors.
_OPTION_FIELDS = (
    ("max_new_tokens", "max_tokens"), ("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
    ("seed", "seed"), ("stop_token_ids", "stop_token_ids"), ("stop", "stop"), ("ignore_eos", "ignore_eos"),
)


def request_error(exc: Exception, prompt_field: str) -> APIError:
    """A 400 for what SpeculativeGenerator.check_request raised (ValueError / TypeError).

    The runtime's messages name generate()'s options; the HTTP API calls max_new_tokens
    `max_tokens`, so the message is told in the API's words and `param` names the field.
    """
    message = str(exc).replace("max_new_tokens", "max_tokens")
    param = prompt_field if message.startswith("prompt") else None
    for option, field in _OPTION_FIELDS:
        if str(exc).startswith((option + " ", option + "=")):
            param = field
            break
    return APIError(400, message, param=param)


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union it tried in `loc` (`str`, `list[str]`); fields are snake_case."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _split_loc(loc) -> tuple[list[str], str | None, list[str]]:
    """(path to the field, union member tried or None, path inside that member)."""
    parts = [p for p in loc if p != "body"]
    for i, part in enumerate(parts):
        if _is_union_tag(part):
            return [str(p) for p in parts[:i]], part, [str(p) for p in parts[i + 1:]]
    return [str(p) for p in parts], None, []


def validation_error(errors: list[dict]) -> APIError:
    """A 400 for pydantic's first validation error, naming the field (`messages.0.content`)."""
    if not errors:
        return APIError(400, "the request body is not valid")
    first = errors[0]
    path, tag, _ = _split_loc(first.get("loc", ()))
    param = ".".join(path) or None
    kind = first.get("type")
    if kind in ("json_invalid", "json_type"):
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    if param is None and kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the request body must be a JSON object (Content-Type: application/json)")
    if kind == "extra_forbidden":
        return APIError(400, f"unknown field {param!r} in the request body; remove it (see the OpenAI API reference "
                             "for the fields of this endpoint)", param=param)
    if kind == "missing":
        return APIError(400, f"{param!r} is required", param=param)
    if tag is not None:  # a union: say which types are allowed, and why the structured ones failed
        tags, details = [], []
        for error in errors:
            e_path, e_tag, inside = _split_loc(error.get("loc", ()))
            if e_path != path or e_tag is None:
                continue
            if e_tag not in tags:
                tags.append(e_tag)
            if inside:
                details.append(f"{e_tag} at {'.'.join(inside)}: {error.get('msg')}")
        given = first.get("input")
        why = f" ({'; '.join(details)})" if details else ""
        return APIError(400, f"{param}: expected {' or '.join(tags)}, got {given!r:.80}{why}", param=param)
    given = first.get("input")
    shown = f" (got {given!r:.80})" if given is not None and kind != "model_attributes_type" else ""
    where = f"{param}: " if param else "request body: "
    return APIError(400, f"{where}{first.get('msg')}{shown}", param=param)


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; chunks are never padded here


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # OpenAI's default: 1.0
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's name); 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool | None = None  # extension (vLLM's name)
    stop_token_ids: list[int] | None = None  # extension (vLLM's name)
    # Accepted and ignored: they say nothing about decoding.
    user: str | None = None
    metadata: Any = None
    # Refused unless left at their neutral value (unsupported_fields says why).
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is one string (or a list holding one string)."""

    prompt: Any = None
    echo: Any = None
    suffix: Any = None
    logprobs: Any = None
    best_of: Any = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. `messages` are rendered with the tokenizer's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    # Accepted and ignored: storage, billing tier, parallel tool calls (there are no tools).
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None


def _nonzero(value) -> bool:
    return value is not None and value != 0


_CHANGES_P = "it would change the target's distribution that drafts are verified against"

# field -> (is it set to something this runtime cannot honour?, why / what to do instead)
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v is not None and v != 1,
          "one choice per request; send the request several times (with different seeds for different samples)"),
    "best_of": (lambda v: v is not None and v != 1, "one choice per request; send the request several times"),
    "presence_penalty": (_nonzero, _CHANGES_P + "; leave it at 0"),
    "frequency_penalty": (_nonzero, _CHANGES_P + "; leave it at 0"),
    "logit_bias": (lambda v: bool(v), _CHANGES_P + "; leave it out"),
    "logprobs": (lambda v: v is not None and v is not False, "log probabilities are not returned; leave it out"),
    "top_logprobs": (lambda v: v is not None and v != 0, "log probabilities are not returned; leave it out"),
    "echo": (lambda v: bool(v), "the prompt is not echoed; prepend it to the text yourself"),
    "suffix": (lambda v: bool(v), "insertion (fill-in-the-middle) is not supported"),
    "tools": (lambda v: bool(v), "tool calling is not supported"),
    "functions": (lambda v: bool(v), "function calling is not supported"),
    "tool_choice": (lambda v: v not in (None, "none"), "tool calling is not supported"),
    "function_call": (lambda v: v not in (None, "none"), "function calling is not supported"),
    "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
                        "structured output (JSON mode, JSON schema) is not supported; only text"),
    "modalities": (lambda v: v is not None and v != ["text"], "only text output is supported"),
    "audio": (lambda v: v is not None, "only text output is supported"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported (the server drafts on its own)"),
    "reasoning_effort": (lambda v: v is not None, "the model has no reasoning-effort setting"),
    "web_search_options": (lambda v: v is not None, "web search is not supported"),
}


def unsupported_fields(request: _SamplingRequest) -> None:
    """Raise a 400 for the first field set to something this runtime cannot honour."""
    for name in type(request).model_fields:
        check = _UNSUPPORTED.get(name)
        if check is None:
            continue
        value = getattr(request, name)
        is_set, why = check
        if is_set(value):
            raise APIError(400, f"{name}={value!r:.80} is not supported by this server: {why}", param=name)


def completion_prompt(request: CompletionRequest) -> str:
    """The one text prompt of a completion request; a 400 for anything else."""
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise APIError(400, "'prompt' is required: one string", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise APIError(400, f"prompt is a list of {len(prompt)} strings; this server takes one prompt per request "
                            "(send one request per prompt: the server batches them)", param="prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) and not isinstance(p, bool)
                                                   for p in prompt):
        raise APIError(400, "token-id prompts are not supported; send the prompt as a string", param="prompt")
    raise APIError(400, f"prompt must be a string (or a list holding one string), got {type(prompt).__name__} "
                        f"{prompt!r:.60}", param="prompt")


def chat_prompt(request: ChatCompletionRequest) -> list[dict]:
    """The messages as the generator takes them ({"role", "content"} dicts); text parts joined."""
    if not request.messages:
        raise APIError(400, "messages is empty; send at least one message", param="messages")
    out = []
    for i, m in enumerate(request.messages):
        content = m.content
        if content is None:
            raise APIError(400, f"messages.{i} has no content; every message needs text content",
                           param=f"messages.{i}.content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages.{i}.content.{j} is a {part.type!r} part; only text parts "
                                        '({"type": "text", "text": ...}) are supported',
                                   param=f"messages.{i}.content.{j}")
            content = "".join(part.text for part in content)
        message = {"role": m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def max_tokens_of(request: _SamplingRequest) -> int | None:
    """max_tokens, or chat's max_completion_tokens (the same when both are given); None when neither."""
    value = request.max_tokens
    other = getattr(request, "max_completion_tokens", None)
    if other is not None:
        if value is not None and value != other:
            raise APIError(400, f"max_tokens={value} and max_completion_tokens={other} disagree; send one of them",
                           param="max_completion_tokens")
        value = other
    if value is not None and value < 0:
        raise APIError(400, f"max_tokens must be >= 0, got {value}", param="max_tokens")
    return value


def generate_kwargs(request: _SamplingRequest, max_new_tokens: int) -> dict:
    """generate()'s keyword arguments for a request (OpenAI's defaults where a field is left out)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
    }
    for name in ("top_k", "seed", "stop", "ignore_eos", "stop_token_ids"):
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


# --------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(result: GenerationResult) -> dict:
    prompt = result.stats.prompt_tokens
    completion = len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def specdec_stats(result: GenerationResult) -> dict:
    """The `specdec` extension field: what speculative decoding and the cache did for this request."""
    s = result.stats
    return {
        "accepted_tokens": s.accepted_tokens,
        "drafted_tokens": s.drafted_tokens,
        "acceptance_rate": s.acceptance_rate,
        "mean_accepted_length": s.mean_accepted_length,
        "per_position_acceptance": s.per_position_acceptance,
        "target_forwards": s.target_forwards,
        "cache_kind": s.cache_kind,
        "cache_hit": s.cache_hit,
    }


def completion_response(request_id: str, model: str, created: int, result: GenerationResult) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": result.text or "", "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": usage(result),
        "specdec": specdec_stats(result),
    }


def chat_response(request_id: str, model: str, created: int, result: GenerationResult) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.text or ""},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }],
        "usage": usage(result),
        "specdec": specdec_stats(result),
    }


class ChunkMaker:
    """The streamed chunks of one request, in OpenAI's `text_completion` or `chat.completion.chunk` form.

    With include_usage, every chunk carries "usage": null and a last chunk with no choices
    carries the usage; the chunk with the finish_reason (and the usage chunk) carry `specdec`.
    """

    def __init__(self, request_id: str, model: str, created: int, *, chat: bool, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.created = created
        self.chat = chat
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def role(self) -> dict:
        """Chat's first chunk: the assistant role, empty content."""
        return self._chunk([self._choice("", None, role=True)])

    def text(self, text: str) -> dict:
        return self._chunk([self._choice(text, None)])

    def final(self, result: GenerationResult) -> list[dict]:
        """The chunk with the finish reason, then the usage chunk when asked for."""
        last = self._chunk([self._choice(None if self.chat else "", result.finish_reason)])
        last["specdec"] = specdec_stats(result)
        chunks = [last]
        if self.include_usage:
            chunk = self._chunk([])
            chunk["usage"] = usage(result)
            chunk["specdec"] = specdec_stats(result)
            chunks.append(chunk)
        return chunks
