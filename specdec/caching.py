"""Glue between the generator and specdec.cache: CacheLayer, and the check of cached responses.

The generator calls, per request row:

    hit = layer.lookup(prompt_ids, prompt_text, params)   # before decoding; None = decode
    layer.record(prompt_ids, prompt_text, params, tokens, finish_reason)  # after; returns at once

and the "cache" drafter reads `layer.draft_store`. Neither call raises or waits on a
failing server: failures are counted (`error_count()`, copied into stats.cache_errors)
and the request proceeds as if there were no cache.

Trust. Anyone who can write to the Redis can write any bytes, so what a lookup returns
is a claim, not an answer:
- verified mode (default, no secret): a cached greedy response is a draft of its full
  length. `verify_responses` runs ONE target forward over prompt + response, keeps the
  longest prefix the target agrees with plus the target's own token at the first
  mismatch (or the bonus token after the last), and the generator decodes on from
  there. A wrong, stale, forged or near-duplicate entry costs time, never output.
  Sampled responses are neither served nor used (one forward cannot check a sample).
- trusted mode (a secret, by argument or SPECDEC_CACHE_SECRET): entries are written
  with an HMAC-SHA256 tag over the full Redis key and the value; an authenticated
  entry found under the exact key of the request is served without a forward (greedy,
  and seeded sampling whose drafter reads no shared state). Anything else (no tag, a
  bad tag, a near-duplicate key) is at most a draft to verify, as in verified mode.

Keys. The exact key holds the prompt's kind ("text" or "ids": the same ids reached
both ways never share an exact entry) and its exact token ids, the effective sampling
parameters, seed, max_new_tokens and the effective stop set (eos ids of the generation
config, model config and tokenizer unless ignore_eos, stop ids, stop strings). A second,
"near" key holds the ids of the normalised text (NFKC, whitespace, optional case
folding), for text prompts, for chat prompts (each message normalised, then the chat
template) and for id prompts that decode to text, so whitespace variants and an id
prompt equal to a text prompt find each other's responses, as drafts only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cache.config import CacheConfig, parse_cache_url
from .cache.draft_store import DraftStore
from .cache.fingerprint import fingerprint_id, model_fingerprint, tokenizer_fingerprint
from .cache.memo import LruMemo
from .cache.namespace import Namespace
from .cache.normalize import normalize_text, render_prompt
from .cache.response_cache import ResponseCache, ResponseRequest
from .cache.store import get_store, release_store
from .drafters import reads_draft_model, reads_shared_state, resolve_drafter_name

log = logging.getLogger("specdec.cache")

_FINISH_REASONS = ("stop", "length")
# GenerationParams fields resolved explicitly into the key (everything else goes in as is).
_HANDLED_PARAMS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "drafter",
        "num_draft_tokens",
        "stop_token_ids",
        "ignore_eos",
        "stop",
    }
)
_IDS_MEMO_SIZE = 512


@dataclass
class CachedResponse:
    """A response found in the cache, and what it may be used for."""

    token_ids: list[int]  # [N] new tokens only
    finish_reason: str  # "stop" | "length" as the entry claims (only trusted entries are believed)
    trusted: bool  # authenticated entry under the exact key: may be served without a forward
    source: str  # "exact" (this request's key) | "near" (the normalised prompt's key)


@dataclass
class CheckedResponse:
    """A cached greedy response after the target's check (see verify_responses)."""

    token_ids: list[int]  # [<= max_new_tokens] verified prefix + the target's token, cut at stop/limit
    finish_reason: str | None  # "stop" | "length", or None: decode on from prompt + token_ids
    verified_tokens: int  # cached tokens the target agreed with, before the first mismatch
    kind: str  # "verified" | "partial" | "rejected"


class CacheLayer:
    """Response cache + draft store for one generator, on one cache URL and namespace."""

    def __init__(self, config: CacheConfig, generator: Any) -> None:
        self.config = config
        self.generator = generator
        self.store = get_store(config)
        self._closed = False
        self.namespace = Namespace(self.store, config.namespace, secret=config.secret)  # epochs signed too
        self.normalization = config.normalization
        self.model_id, self.draft_id, self.tokenizer_id = self._fingerprints(generator)
        self.responses = ResponseCache(
            self.store,
            self.namespace,
            ttl_s=config.ttl_s,
            max_value_bytes=config.max_value_bytes,
            secret=config.secret,
        )
        self.vocab_size = getattr(generator, "vocab_size", None)
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
        self._ids_memo: LruMemo[tuple[int, ...]] = LruMemo(_IDS_MEMO_SIZE)  # prompt text / chat -> normalised ids
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
        `secret=` (str or bytes, at least 16 bytes; default: $SPECDEC_CACHE_SECRET)
        turns on trusted mode; it is refused in the URL.
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
        # The generator's own fingerprints (name, revision, config hash) plus a hash of
        # every weight, so a checkpoint retrained in place does not answer for the old one.
        model_fp = {"weights": model_fingerprint(target) if target is not None else None}
        if hasattr(generator, "model_fingerprint"):
            model_fp["generator"] = generator.model_fingerprint()
        draft_fp = None
        head = getattr(generator, "draft_head", None)
        if draft is not None or head is not None:
            draft_fp = {"weights": model_fingerprint(draft) if draft is not None else None}
            if head is not None:  # an EAGLE-3 head's weights shape seeded samples as a draft model's do
                draft_fp["head_weights"] = model_fingerprint(head)
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

    @property
    def trusted(self) -> bool:
        """Trusted mode: authenticated entries are served without a forward."""
        return self.config.trusted

    def is_servable(self, params: Any) -> bool:
        """May a response for these params be looked up in (and written to) the response cache?

        Greedy: always (verified by one forward, or authenticated in trusted mode).
        Seeded sampling: only in trusted mode (one forward cannot verify a sample), and
        not with a drafter that reads shared state. (Such rows no longer depend on what the
        store held: seeded "auto" leaves the store out and seeded "cache" is verified by
        position, see specdec.planning.Planner; their entries are still kept out, the
        conservative side.) Unseeded sampling: never.
        """
        if not self.config.response_cache:
            return False
        if params.greedy:
            return True
        if not self.trusted or params.seed is None or not isinstance(params.seed, int):
            return False
        return not reads_shared_state(params.drafter, self._has_draft_model())

    def _has_draft_model(self):
        """What the generator drafts with besides the target (see SpeculativeGenerator.draft_resources)."""
        resources = getattr(self.generator, "draft_resources", None)
        if resources is not None:
            return resources
        return getattr(self.generator, "draft_model", None) is not None

    def _drafter_name(self, params: Any) -> str:
        return resolve_drafter_name(params.drafter, self._has_draft_model())

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
        if self.vocab_size is not None and top_k >= self.vocab_size:
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
        uses_draft = reads_draft_model(params.drafter, self._has_draft_model())
        models = (self.draft_id,) if uses_draft and self.draft_id is not None else ()
        return sampling, int(params.seed), models

    def stop_set(self, params: Any) -> tuple[int, ...]:
        """The effective stop ids: the request's, plus every eos id the generator stops on unless ignore_eos."""
        stops = {int(t) for t in params.stop_token_ids}
        if not params.ignore_eos:
            stops.update(int(t) for t in getattr(self.generator, "eos_token_ids", ()))
        return tuple(sorted(stops))

    def near_ids(self, prompt_ids: Sequence[int], prompt_text: Any) -> tuple[int, ...] | None:
        """Token ids of the normalised prompt (None without a tokenizer).

        A text prompt is normalised as is; chat messages are normalised one by one and
        then rendered with the chat template (normalising the rendered text would leave
        `2022.  <|im_end|>` at `2022. <|im_end|>`, never meeting the clean chat); an id
        prompt is decoded first, so that it meets a text prompt that encodes to the same ids.
        """
        tokenizer = getattr(self.generator, "tokenizer", None)
        if tokenizer is None:
            return None
        if prompt_text is None:
            text = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
            if not text:
                return None
            return tuple(int(t) for t in tokenizer(normalize_text(text, self.normalization))["input_ids"])
        return self.prompt_key_ids(prompt_ids, prompt_text)

    def prompt_key_ids(self, prompt_ids: Sequence[int], prompt_text: Any) -> tuple[int, ...]:
        """Token ids of the normalised prompt when there is one (the near key), else the ids.

        `prompt_text` is the prompt's text, or its chat messages ({"role", "content"} dicts,
        normalised per message before the template: see specdec.cache.normalize.render_prompt).
        """
        tokenizer = getattr(self.generator, "tokenizer", None)
        if prompt_text is None or tokenizer is None:
            return tuple(int(t) for t in prompt_ids)

        def encode() -> tuple[int, ...]:
            text = render_prompt(prompt_text, tokenizer, self.normalization)
            return tuple(int(t) for t in tokenizer(text)["input_ids"])

        memo_key = _memo_key(prompt_text)
        return encode() if memo_key is None else self._ids_memo.get(memo_key, encode)

    def request_for(
        self, prompt_ids: Sequence[int], prompt_text: Any, params: Any, *, near: bool = False
    ) -> ResponseRequest | None:
        """The response-cache request (key material without epochs) of one row.

        The exact request keys on the prompt's kind ("text" when prompt_text is given,
        else "ids") and its exact ids; `near=True` gives the normalised-prompt request
        (None when there is no text to normalise).
        """
        sampling, seed, extra = self._effective_sampling(params)
        if near:
            ids = self.near_ids(prompt_ids, prompt_text)
            if ids is None:
                return None
            kind = "near"
        else:
            ids = tuple(map(int, prompt_ids))
            kind = "text" if prompt_text is not None else "ids"
        return ResponseRequest(
            model=self.model_id,
            tokenizer=self.tokenizer_id,
            normalization=self.normalization.spec(),
            prompt_ids=ids,
            sampling=sampling,
            seed=seed,
            max_new_tokens=int(params.max_new_tokens),
            stop_token_ids=self.stop_set(params),
            extra_models=extra,
            prompt_kind=kind,
            stop_strings=tuple(getattr(params, "stop", None) or ()),
        )

    # ------------------------------------------------------------------ engine interface

    def lookup(self, prompt_ids: list[int], prompt_text: Any, params: Any) -> CachedResponse | None:
        """A cached response for this row and what it may be used for, or None. Never raises.

        Greedy: the exact entry (trusted if authenticated under this layer's secret), else
        the near entry (never trusted). Seeded sampling (trusted mode only): the exact
        entry, and only if authenticated.
        """
        try:
            if not self.is_servable(params):
                return None
            found = self._find(prompt_ids, prompt_text, params)
            self.store.count("hits" if found is not None else "misses")
            self.store.count_shared(self.namespace.name, "hits" if found is not None else "misses")
            return found
        except Exception:  # a cache bug must not fail a generation
            self.store.count("errors")
            log.warning("cache lookup failed; decoding without it", exc_info=True)
            return None

    def _find(self, prompt_ids: list[int], prompt_text: Any, params: Any) -> CachedResponse | None:
        exact = self.request_for(prompt_ids, prompt_text, params)
        value = self.responses.lookup(exact)
        if value is not None and self._plausible(value.tokens, value.tail, params):
            trusted = self.trusted and value.authenticated
            if trusted or params.greedy:
                return CachedResponse(value.tokens, value.tail, trusted, "exact")
            self.store.count("unauthenticated")
            return None
        if value is not None:
            self.store.count("corrupt")
        if not params.greedy:
            return None
        near = self.request_for(prompt_ids, prompt_text, params, near=True)
        if near is None:
            return None
        value = self.responses.lookup(near)
        if value is None or not self._plausible(value.tokens, value.tail, params):
            return None
        return CachedResponse(value.tokens, value.tail, False, "near")

    def _plausible(self, tokens: list[int], finish_reason: str, params: Any) -> bool:
        return (
            finish_reason in _FINISH_REASONS
            and len(tokens) <= params.max_new_tokens
            and (not tokens or (min(tokens) >= 0 and (self.vocab_size is None or max(tokens) < self.vocab_size)))
        )

    def record(
        self,
        prompt_ids: list[int],
        prompt_text: Any,
        params: Any,
        token_ids: list[int],
        finish_reason: str,
        *,
        responses: bool = True,
    ) -> None:
        """Queue the finished row for the draft store and (if servable) the response cache.

        Greedy rows are written under the exact and the near key, seeded samples (trusted
        mode only) under the exact key. `responses=False` feeds the draft store only (the
        response cache already holds exactly this). Returns at once: the writes happen
        on the write-behind thread. Never raises.
        """
        try:
            if self.config.draft_store:
                self.draft_store.add(list(prompt_ids) + list(token_ids))
            if responses and self.is_servable(params):
                requests = [self.request_for(prompt_ids, prompt_text, params)]
                if params.greedy:
                    near = self.request_for(prompt_ids, prompt_text, params, near=True)
                    if near is not None:
                        requests.append(near)
                for request in requests:
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

    def invalidate_namespace(self) -> str:
        """Invalidate every entry of this namespace (O(1): a new random epoch token, returned)."""
        return self.namespace.bump()

    def invalidate_model(self, model_id: str | None = None) -> str:
        """Invalidate every response of one model (default: this generator's target); return its new epoch token."""
        return self.namespace.bump_model(model_id or self.model_id)

    def invalidate(self, prompt: Any, **generate_kwargs: Any) -> bool:
        """Delete the cached response of one request (text, chat messages or token ids + generate() kwargs).

        Both its exact and its near entry go; True if either existed.
        """
        from .params import make_params

        params = make_params(**generate_kwargs)
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], Mapping)):
            tokenizer = self.generator.tokenizer
            text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )
            ids, text_or_none = list(tokenizer(text)["input_ids"]), prompt  # chat: messages key the near entry
        else:
            ids, text_or_none = list(prompt), None
        requests = [self.request_for(ids, text_or_none, params), self.request_for(ids, text_or_none, params, near=True)]
        return any([self.responses.invalidate(r) for r in requests if r is not None])

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
        mode = "trusted" if self.trusted else "verified"
        return f"CacheLayer({self.config.describe()!r}, namespace={self.namespace.name!r}, mode={mode!r})"


# ---------------------------------------------------------------------- checking cached responses


# Logits the check holds at once: 2**22 (16 MiB in float32), or one decoding step's [B, 1, V].
_CHECK_LOGITS = 1 << 22


@torch.inference_mode()
def verify_responses(
    generator: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    max_new_tokens: int,
    stop_ids: frozenset[int],
) -> list[CheckedResponse]:
    """Check cached greedy responses against the target, computed the way decoding computes.

    Row i's response (N_i tokens) is a draft of its full length: the target's argmax
    after the prompt and after each prefix of the response is what greedy decoding
    would emit there. Kept: the longest prefix of the response the target agrees with,
    then the target's own token at the first mismatch (or the bonus token after all
    N_i), cut at the first stop token (kept, "stop") or at max_new_tokens ("length").

    Shapes. The positions are computed as the decode loop computes them, on the same
    KV path (specdec.kv) with the generator's numerics: the prompts go through
    `prefill_logits`, as every uncached request does, and the responses through verify
    forwards over the KV cache, W tokens per row at a time, as a drafter's proposals
    are. One forward over prompt + response would compute the prompt's keys and values
    in another order; in bfloat16 that breaks near-ties the other way and a hit answered
    differently from the uncached call on 16 of 299 prompts (benchmarks/bf16_rates.py);
    in decoding's shapes it differs no more often than the choice of drafter does.

    Memory: W = max(1, min(max N_i, 2**22 // (B * V))), so a forward holds at most
    max(2**22, B * V) logits ([B, W, V]; one plain decoding step holds [B, 1, V]) and only
    their argmax ids are kept; the prefill holds what an uncached request's prefill holds.
    A forged entry chooses N_i, never the memory. Forwards stop once every row has
    disagreed with its response: a wrong entry costs the prefill and one forward.
    No KV cache outlives the call: a finished row needs nothing more, and an unfinished
    one is decoded on by the engine from prompt + kept tokens.
    """
    from .kv import BUCKET, engine_path, make_kv, prefill_logits

    model = generator.target_model
    device = generator.device
    batch = len(prompts)
    vocab = int(getattr(generator, "vocab_size", None) or model.config.vocab_size)
    lengths = [len(r) for r in responses]
    longest = max(lengths)
    width = max(1, min(longest, _CHECK_LOGITS // (batch * vocab)))
    need = max(len(p) + n for p, n in zip(prompts, lengths)) + width + 2
    capacity = -(-need // BUCKET) * BUCKET
    path = engine_path(model, getattr(generator, "engine", "auto"), capacity)
    kv = make_kv(model, path, batch, capacity, device, numerics=getattr(generator, "numerics", "native"))
    opening, _ = prefill_logits(kv, prompts)  # [B, 1, V]
    preds = [[t] for t in opening[:, 0].argmax(dim=-1).tolist()]  # [B][1]: the first emitted token
    del opening
    agreed = [0 if n == 0 or r[0] != p[0] else None for r, p, n in zip(responses, preds, lengths)]
    start = 0
    while start < longest and any(a is None for a in agreed):
        block = torch.zeros(batch, width, dtype=torch.long)  # [B, W] response tokens start .. start+W
        valid = []
        for b, r in enumerate(responses):
            chunk = r[start : start + width] if agreed[b] is None else []
            block[b, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            valid.append(len(chunk))
        logits, _ = kv.forward(block.to(device), torch.tensor(valid, dtype=torch.long, device=device))
        ids = logits.argmax(dim=-1).tolist()  # [B, W]: the target's token after each fed slot
        del logits
        for b, r in enumerate(responses):
            if agreed[b] is not None:
                continue
            preds[b].extend(ids[b][: valid[b]])
            # preds[b][j] follows r[:j]; the first j where the response leaves the target's chain.
            upto = min(len(preds[b]), lengths[b])
            agreed[b] = next((j for j in range(start + 1, upto) if r[j] != preds[b][j]), None)
            if agreed[b] is None and len(preds[b]) > lengths[b]:
                agreed[b] = lengths[b]  # every token agreed; preds[b][N] is the bonus token
        start += width
    checked = []
    for response, target, n, good in zip(responses, preds, lengths, agreed):
        good = n if good is None else good
        kept = list(response[:good]) + [target[good]]
        reason = None
        for j, t in enumerate(kept[:max_new_tokens]):
            if t in stop_ids:
                kept, reason = kept[: j + 1], "stop"
                break
        if reason is None and len(kept) >= max_new_tokens:
            kept, reason = kept[:max_new_tokens], "length"
        if good == n or (reason is not None and len(kept) <= good):
            kind = "verified"  # every cached token the output needed was right
        else:
            kind = "partial" if good else "rejected"
        checked.append(CheckedResponse(kept, reason, good, kind))
    return checked


def _memo_key(prompt_text: Any) -> Any:
    """The normalised-ids memo's key of a prompt: its text, or ("chat", canonical JSON) of its
    messages (a tuple never equals a text key); None when the messages do not serialise."""
    if isinstance(prompt_text, str):
        return prompt_text
    try:
        return ("chat", json.dumps(prompt_text, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
    except (TypeError, ValueError):
        return None


def _config_options(config: CacheConfig) -> dict[str, Any]:
    skip = {"url", "backend", "redis_options"}
    return {k: v for k, v in vars(config).items() if k not in skip}
