"""Glue between the generator and specdec.cache: CacheLayer.

The generator calls, per request row:

    hit = layer.lookup(prompt_ids, prompt_text, params)   # before decoding; None = decode
    layer.record(prompt_ids, prompt_text, params, tokens, finish_reason)  # after; returns at once

and the "cache" drafter reads `layer.draft_store`. Neither call raises or waits on a
failing server: failures are counted (`error_count()`, copied into stats.cache_errors)
and the request proceeds as if there were no cache.

What is served: only deterministic requests (greedy, or sampling with an explicit
seed), since anything else must be a fresh sample. Seeded sampling with the "cache"
drafter is not served either: its tokens depend on what the draft store held at the
time, not only on the key. Every other request still feeds the draft store.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .cache.config import CacheConfig, parse_cache_url
from .cache.draft_store import DraftStore
from .cache.fingerprint import fingerprint_id, model_fingerprint, tokenizer_fingerprint
from .cache.namespace import Namespace
from .cache.normalize import render_prompt
from .cache.response_cache import ResponseCache, ResponseRequest
from .cache.store import get_store, release_store
from .drafters import get_drafter_class, resolve_drafter_name

log = logging.getLogger("specdec.cache")

_FINISH_REASONS = ("stop", "length")
# GenerationParams fields resolved explicitly into the key (everything else goes in as is).
_HANDLED_PARAMS = frozenset(
    {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "drafter", "num_draft_tokens", "stop_token_ids", "ignore_eos"}
)
_IDS_MEMO_SIZE = 512


@dataclass
class CachedResponse:
    """A response served from the cache."""

    token_ids: list[int]  # [N] new tokens only
    finish_reason: str  # "stop" | "length"


class CacheLayer:
    """Response cache + draft store for one generator, on one cache URL and namespace."""

    def __init__(self, config: CacheConfig, generator: Any) -> None:
        self.config = config
        self.generator = generator
        self.store = get_store(config)
        self._closed = False
        self.namespace = Namespace(self.store, config.namespace)
        self.normalization = config.normalization
        self.model_id, self.draft_id, self.tokenizer_id = self._fingerprints(generator)
        self.responses = ResponseCache(
            self.store, self.namespace, ttl_s=config.ttl_s, max_value_bytes=config.max_value_bytes
        )
        self.vocab_size = _vocab_size(generator)
        self.draft_store = DraftStore(
            self.store,
            self.namespace,
            vocab=self._vocab_id(generator),
            contexts=config.draft_contexts,
            continuation=config.draft_continuation,
            ttl_s=config.draft_ttl_s,
            max_positions=config.draft_max_positions,
            max_value_bytes=config.max_value_bytes,
            vocab_size=self.vocab_size,
        )
        self._ids_memo: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # normalised text -> ids
        self._ids_lock = threading.Lock()
        self._register_models()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, spec: Any, generator: Any, **options: Any) -> "CacheLayer":
        """A CacheLayer for `spec`: a URL (redis://, rediss://, unix://, redis+cluster://,
        memory://), a CacheConfig, or an open CacheLayer (returned as is; re-bound to
        `generator` if it was opened for another one, since keys carry model fingerprints).

        Keyword options override URL query options (namespace, ttl_s, deadline_ms,
        breaker_failures, breaker_cooldown_s, casefold, whitespace, max_value_bytes,
        response_cache, draft_store, ...; see specdec.cache.config.CacheConfig).
        """
        if isinstance(spec, CacheLayer):
            if options:
                raise ValueError("options cannot be applied to an already open CacheLayer; pass a URL instead")
            if spec.generator is generator or generator is None:
                return spec
            return cls(spec.config, generator)
        if isinstance(spec, CacheConfig):
            config = spec if not options else parse_cache_url(spec.url, **_config_options(spec), **options)
        elif isinstance(spec, str):
            config = parse_cache_url(spec, **options)
        else:
            raise TypeError(
                f"cache must be a URL string (redis://host:6379/0, rediss://..., unix:///path.sock, "
                f"redis+cluster://..., memory://), a CacheConfig or a CacheLayer; got {type(spec).__name__}"
            )
        return cls(config, generator)

    def _fingerprints(self, generator: Any) -> tuple[str, str | None, str]:
        target = getattr(generator, "target_model", None)
        draft = getattr(generator, "draft_model", None)
        tokenizer = getattr(generator, "tokenizer", None)
        # The generator's own fingerprints (name, revision, config hash) plus a sample of
        # the weights, so a checkpoint retrained in place does not answer for the old one.
        model_fp = {"weights": model_fingerprint(target) if target is not None else None}
        if hasattr(generator, "model_fingerprint"):
            model_fp["generator"] = generator.model_fingerprint()
        draft_fp = None
        if draft is not None:
            draft_fp = {"weights": model_fingerprint(draft)}
            if hasattr(generator, "draft_fingerprint"):
                draft_fp["generator"] = generator.draft_fingerprint()
        tok_fp = None
        if hasattr(generator, "tokenizer_fingerprint"):
            tok_fp = generator.tokenizer_fingerprint()
        elif tokenizer is not None:
            tok_fp = tokenizer_fingerprint(tokenizer)
        if tok_fp is None:  # no tokenizer: token ids are those of the target's vocabulary
            tok_fp = {"vocab_of_model": fingerprint_id(model_fp)}
        return (
            fingerprint_id(model_fp),
            fingerprint_id(draft_fp) if draft_fp is not None else None,
            fingerprint_id(tok_fp),
        )

    def _vocab_id(self, generator: Any) -> str:
        # Draft-store entries are token sequences: any model with the same vocabulary can
        # use them as drafts, whatever checkpoint path its tokenizer was loaded from.
        tokenizer = getattr(generator, "tokenizer", None)
        if tokenizer is None:
            return self.tokenizer_id
        fp = tokenizer_fingerprint(tokenizer)
        return fingerprint_id({"vocab_size": fp["vocab_size"], "vocab_sha256": fp["vocab_sha256"], "special": fp["special"]})

    def _register_models(self) -> None:
        for model_id, model in ((self.model_id, "target_model"), (self.draft_id, "draft_model")):
            obj = getattr(self.generator, model, None)
            if model_id is None or obj is None:
                continue
            fp = model_fingerprint(obj)
            self.namespace.register_model(
                model_id, {"role": model.split("_")[0], "name_or_path": fp["name_or_path"], "revision": fp["revision"]}
            )

    # ------------------------------------------------------------------ keys

    def is_servable(self, params: Any) -> bool:
        """May a response for these params come from (and go to) the response cache?"""
        if not self.config.response_cache:
            return False
        if params.greedy:
            return True
        if params.seed is None or not isinstance(params.seed, int):
            return False
        return not get_drafter_class(self._drafter_name(params)).reads_shared_state

    def _drafter_name(self, params: Any) -> str:
        return resolve_drafter_name(params.drafter, getattr(self.generator, "draft_model", None) is not None)

    def _effective_sampling(self, params: Any) -> tuple[dict[str, Any], int | None, tuple[str, ...]]:
        # Any parameter this module does not know about (a field added to GenerationParams
        # later) goes into the key as is: an unknown knob may change the output.
        extra = {
            f.name: getattr(params, f.name)
            for f in dataclasses.fields(params)
            if f.name not in _HANDLED_PARAMS
        } if dataclasses.is_dataclass(params) else {}
        if params.greedy:
            # Greedy output is the target's argmax chain: no drafter, seed, top-k or top-p changes it.
            return {"mode": "greedy", "ignore_eos": bool(params.ignore_eos), "extra": extra}, None, ()
        drafter = self._drafter_name(params)
        top_k = int(params.top_k)
        if top_k >= self.vocab_size:
            top_k = 0  # keeps every token: the same as off
        sampling = {
            "mode": "sample",
            "temperature": float(params.temperature),
            "top_k": top_k,
            "top_p": float(params.top_p),
            "drafter": drafter,
            "num_draft_tokens": params.num_draft_tokens,  # an int, or "auto"
            "ignore_eos": bool(params.ignore_eos),
            "extra": extra,
        }
        uses_draft = get_drafter_class(drafter).uses_draft_model
        models = (self.draft_id,) if uses_draft and self.draft_id is not None else ()
        return sampling, int(params.seed), models

    def prompt_key_ids(self, prompt_ids: Sequence[int], prompt_text: Any) -> tuple[int, ...]:
        """Token ids the key is built from: those of the normalised text when there is text."""
        tokenizer = getattr(self.generator, "tokenizer", None)
        if prompt_text is None or tokenizer is None:
            return tuple(int(t) for t in prompt_ids)
        memo_key = prompt_text if isinstance(prompt_text, str) else None
        if memo_key is not None:
            with self._ids_lock:
                found = self._ids_memo.get(memo_key)
                if found is not None:
                    self._ids_memo.move_to_end(memo_key)
                    return found
        text = render_prompt(prompt_text, tokenizer, self.normalization)
        ids = tuple(int(t) for t in tokenizer(text)["input_ids"])
        if memo_key is not None:
            with self._ids_lock:
                self._ids_memo[memo_key] = ids
                while len(self._ids_memo) > _IDS_MEMO_SIZE:
                    self._ids_memo.popitem(last=False)
        return ids

    def request_for(self, prompt_ids: Sequence[int], prompt_text: Any, params: Any) -> ResponseRequest:
        """The response-cache request (key material without epochs) of one row."""
        sampling, seed, extra = self._effective_sampling(params)
        return ResponseRequest(
            model=self.model_id,
            tokenizer=self.tokenizer_id,
            normalization=self.normalization.spec(),
            prompt_ids=self.prompt_key_ids(prompt_ids, prompt_text),
            sampling=sampling,
            seed=seed,
            max_new_tokens=int(params.max_new_tokens),
            stop_token_ids=tuple(sorted(set(int(t) for t in params.stop_token_ids))),
            extra_models=extra,
        )

    # ------------------------------------------------------------------ engine interface

    def lookup(self, prompt_ids: list[int], prompt_text: Any, params: Any) -> CachedResponse | None:
        """The cached response of a deterministic request, or None. Never raises."""
        try:
            if not self.is_servable(params):
                return None
            request = self.request_for(prompt_ids, prompt_text, params)
            value = self.responses.lookup(request)
            if value is not None and not self._plausible(value.tokens, value.tail, params):
                self.store.count("corrupt")
                value = None
            self.store.count("hits" if value is not None else "misses")
            self.store.count_shared(self.namespace.name, "hits" if value is not None else "misses")
            if value is None:
                return None
            return CachedResponse(token_ids=value.tokens, finish_reason=value.tail)
        except Exception:  # a cache bug must not fail a generation
            self.store.count("errors")
            log.warning("cache lookup failed; decoding without it", exc_info=True)
            return None

    def _plausible(self, tokens: list[int], finish_reason: str, params: Any) -> bool:
        return (
            finish_reason in _FINISH_REASONS
            and len(tokens) <= params.max_new_tokens
            and all(t >= 0 and (self.vocab_size is None or t < self.vocab_size) for t in tokens)
        )

    def record(
        self, prompt_ids: list[int], prompt_text: Any, params: Any, token_ids: list[int], finish_reason: str
    ) -> None:
        """Queue the finished row for the draft store and (if servable) the response cache.

        Returns at once: the writes happen on the write-behind thread. Never raises.
        """
        try:
            if self.config.draft_store:
                self.draft_store.add(list(prompt_ids) + list(token_ids))
            if self.is_servable(params):
                request = self.request_for(prompt_ids, prompt_text, params)
                if self.responses.put(request, list(token_ids), finish_reason):
                    self.store.count("stores")
                    self.store.count_shared(self.namespace.name, "stores")
        except Exception:
            self.store.count("errors")
            log.warning("cache record failed; the response is not cached", exc_info=True)

    def error_count(self) -> int:
        """Cumulative cache failures seen by this process on this server (deltas go to stats)."""
        return self.store.error_count()

    def counts(self) -> dict[str, int]:
        """Local counters: hits, misses, stores, failures, short_circuits, corrupt, writes_dropped, ..."""
        return self.store.counts()

    # ------------------------------------------------------------------ maintenance

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until queued writes have reached the server (or `timeout` passed)."""
        return self.store.flush(timeout)

    def invalidate_namespace(self) -> int:
        """Invalidate every entry of this namespace (O(1) epoch bump); return the new epoch."""
        return self.namespace.bump()

    def invalidate_model(self, model_id: str | None = None) -> int:
        """Invalidate every response of one model (default: this generator's target)."""
        return self.namespace.bump_model(model_id or self.model_id)

    def invalidate(self, prompt: Any, **generate_kwargs: Any) -> bool:
        """Delete the cached response of one request (text or token ids + generate() kwargs)."""
        from .params import make_params

        params = make_params(**generate_kwargs)
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], Mapping)):
            return self.responses.invalidate(self.request_for((), prompt, params))
        return self.responses.invalidate(self.request_for(list(prompt), None, params))

    def close(self) -> None:
        """Flush briefly and release the shared connection (the last user closes it)."""
        if not self._closed:
            self._closed = True
            release_store(self.store)

    def __enter__(self) -> "CacheLayer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CacheLayer({self.config.describe()!r}, namespace={self.namespace.name!r})"


def _vocab_size(generator: Any) -> int | None:
    size = getattr(generator, "vocab_size", None)
    if isinstance(size, int):
        return size
    model = getattr(generator, "target_model", None)
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def _config_options(config: CacheConfig) -> dict[str, Any]:
    skip = {"url", "backend", "redis_options"}
    return {k: v for k, v in vars(config).items() if k not in skip}
