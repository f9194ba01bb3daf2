"""SpeculativeGenerator: loading, validation and the public generate API."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Iterator

import torch

from .drafters import Drafter, get_drafter_class, resolve_drafter_name
from .engine import RowOutput, decode, iter_decode
from .params import GenerationParams, make_params
from .stats import GenerationResult, GenerationStats

_UNSET: Any = object()



class SpeculativeGenerator:
    """A target model, an optional draft model and tokenizer, and the decode loop.

    Greedy output equals plain greedy decoding of the target token for token; sampled
    output has exactly the target's distribution (lossless rejection sampling).
    """

    def __init__(
        self,
        target_model: torch.nn.Module,
        tokenizer: Any = None,
        draft_model: torch.nn.Module | None = None,
        *,
        cache: Any = None,
        draft_tokenizer: Any = None,
    ) -> None:
        _check_model("target_model", target_model)
        if draft_model is not None:
            _check_model("draft_model", draft_model)
        self.target_model = target_model.eval()
        self.draft_model = draft_model.eval() if draft_model is not None else None
        self.tokenizer = tokenizer
        self.vocab_size = _vocab_size(target_model)
        self.draft_vocab_size = _vocab_size(draft_model) if draft_model is not None else None
        self.max_positions = _max_positions(target_model)
        self.device = _input_device(target_model)
        if draft_model is not None:
            draft_device = _input_device(draft_model)
            if draft_device != self.device:
                raise ValueError(
                    f"target and draft models are on different devices (target inputs on {self.device}, "
                    f"draft on {draft_device}); move the draft with draft_model.to({str(self.device)!r}) "
                    "or load both with the same device="
                )
            check_vocab_compatible(self.vocab_size, _vocab_size(draft_model), tokenizer, draft_tokenizer)
            draft_positions = _max_positions(draft_model)
            if draft_positions is not None:
                self.max_positions = (
                    draft_positions if self.max_positions is None else min(self.max_positions, draft_positions)
                )
        self.eos_token_ids = _eos_ids(target_model, tokenizer)
        self._cache_layers: dict[str, Any] = {}
        self.cache_layer = self._open_cache(cache) if cache is not None else None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        target: str,
        draft: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        cache: Any = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> "SpeculativeGenerator":
        """Load target (and draft) through transformers' Auto classes.

        `target`/`draft` are hub ids or local paths. `device` moves both models there;
        `device_map="auto"` lets accelerate place the target (the draft follows the
        target's input device). `dtype` is a torch dtype or its name ("float32", "bfloat16").
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for name, value in (("target", target), ("draft", draft)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a hub id or a local path (str), got {type(value).__name__}")
        if device is not None and device_map is not None:
            raise ValueError("pass either device= or device_map=, not both")
        torch_dtype = _resolve_dtype(dtype)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if revision is not None:
            kwargs["revision"] = revision
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        tok_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")}
        tokenizer = AutoTokenizer.from_pretrained(target, **tok_kwargs)
        draft_tokenizer = None
        if draft is not None:
            try:
                draft_tokenizer = AutoTokenizer.from_pretrained(draft)
            except (OSError, ValueError):  # a draft checkpoint may ship without a tokenizer
                draft_tokenizer = None
        target_model = AutoModelForCausalLM.from_pretrained(
            target, **kwargs, **({"device_map": device_map} if device_map is not None else {})
        )
        draft_model = None
        if draft is not None:
            draft_kwargs = {k: v for k, v in kwargs.items() if k != "revision"}
            draft_model = AutoModelForCausalLM.from_pretrained(draft, **draft_kwargs)
        if device is not None:
            target_model = target_model.to(device)
        target_device = _input_device(target_model)
        if draft_model is not None:
            draft_model = draft_model.to(target_device)
        return cls(target_model, tokenizer, draft_model, cache=cache, draft_tokenizer=draft_tokenizer)

    # ------------------------------------------------------------------ properties

    @property
    def target_dtype(self) -> torch.dtype:
        return next(self.target_model.parameters()).dtype

    def model_fingerprint(self) -> dict:
        """Identifies the target weights for cache keys: name/path, revision, config hash."""
        return _model_fingerprint(self.target_model)

    def draft_fingerprint(self) -> dict | None:
        return _model_fingerprint(self.draft_model) if self.draft_model is not None else None

    def tokenizer_fingerprint(self) -> dict | None:
        """Identifies the tokenizer for cache keys: name/path, size, vocabulary hash."""
        tok = self.tokenizer
        if tok is None:
            return None
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
        return {"name": getattr(tok, "name_or_path", ""), "size": len(tok), "vocab_sha256": digest}

    # ------------------------------------------------------------------ public API

    def generate(self, prompts, *, cache: Any = _UNSET, **kwargs) -> list[GenerationResult]:
        """Generate for one prompt or a list of prompts; always returns a list of results.

        A prompt is text, or a list of chat messages ({"role", "content"} dicts) that is
        rendered with the tokenizer's chat template. Keyword arguments: max_new_tokens,
        temperature, top_k, top_p, seed, drafter, num_draft_tokens, stop_token_ids,
        ignore_eos (see GenerationParams), and cache (a URL or None to switch it off).
        """
        texts = self._prompt_texts(prompts)
        params = make_params(**kwargs)
        ids = [self._encode(t) for t in texts]
        return self._run(ids, texts, params, cache)

    def generate_ids(self, input_ids, *, cache: Any = _UNSET, **kwargs) -> list[GenerationResult]:
        """Like generate() for token ids: one list of ints or a list of such lists."""
        rows = _id_rows(input_ids)
        params = make_params(**kwargs)
        return self._run(rows, None, params, cache)

    def stream(self, prompt, *, cache: Any = _UNSET, **kwargs) -> Iterator[str]:
        """Yield text deltas of one prompt as the target accepts tokens."""
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer; construct the generator with one")
        texts = self._prompt_texts(prompt)
        if len(texts) != 1:
            raise ValueError(f"stream() takes one prompt, got {len(texts)}")
        params = make_params(**kwargs)
        ids = [self._encode(texts[0])]
        layer, drafter, stop_ids = self._prepare(ids, params, cache)
        params = params.for_row(0, 1)
        hit = layer.lookup(ids[0], texts[0], params) if layer is not None else None
        if hit is not None and hit.trusted:
            yield self._decode_text(hit.token_ids)
            return
        prefix: list[int] = []  # tokens confirmed from a cached response
        decode_params, decode_ids = params, ids
        if hit is not None:
            from .caching import verify_responses

            checked = verify_responses(self, ids, [hit.token_ids], params.max_new_tokens, stop_ids)[0]
            prefix = checked.token_ids
            if checked.finish_reason is not None:
                yield self._decode_text(prefix)
                layer.record(
                    ids[0], texts[0], params, prefix, checked.finish_reason,
                    responses=not (hit.source == "exact" and checked.kind == "verified"),
                )
                return
            decode_params = dataclasses.replace(params, max_new_tokens=params.max_new_tokens - len(prefix), seed=None)
            decode_ids = [ids[0] + prefix]
        tokens: list[int] = list(prefix)
        emitted_text = ""
        if prefix:
            text = self._decode_text(tokens)
            if not text.endswith("\ufffd"):
                yield text
                emitted_text = text
        steps = iter_decode(self, decode_ids, decode_params, drafter, stop_ids, layer)
        while True:
            try:
                _, new = next(steps)
            except StopIteration as done:
                outputs: list[RowOutput] = done.value
                break
            tokens.extend(new)
            text = self._decode_text(tokens)
            # Hold back an incomplete multi-byte character until its last byte arrives.
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(emitted_text) and text.startswith(emitted_text):
                yield text[len(emitted_text):]
                emitted_text = text
        final_tokens = prefix + outputs[0].token_ids
        final = self._decode_text(final_tokens)
        if len(final) > len(emitted_text) and final.startswith(emitted_text):
            yield final[len(emitted_text):]
        if layer is not None:
            layer.record(ids[0], texts[0], params, final_tokens, outputs[0].finish_reason)

    # ------------------------------------------------------------------ internals

    def _run(self, rows: list[list[int]], texts, params: GenerationParams, cache) -> list[GenerationResult]:
        layer, drafter, stop_ids = self._prepare(rows, params, cache)
        errors_before = layer.error_count() if layer is not None else 0
        results: list[GenerationResult | None] = [None] * len(rows)
        misses: list[int] = []
        drafts: list[tuple[int, Any, float]] = []  # (row, cached response, lookup start)
        for i, row in enumerate(rows):
            start = time.perf_counter()
            row_params = params.for_row(i, len(rows))
            hit = layer.lookup(row, texts[i] if texts else None, row_params) if layer is not None else None
            if hit is None:
                misses.append(i)
            elif hit.trusted:  # authenticated under the operator's secret: served as is
                stats = GenerationStats(
                    prompt_tokens=len(row), new_tokens=len(hit.token_ids), cache_hit=True, cache_kind="trusted"
                )
                stats.wall_time_s = time.perf_counter() - start
                results[i] = self._result(hit.token_ids, hit.finish_reason, stats)
            else:  # a draft of its full length: the target checks it before anything is served
                drafts.append((i, hit, start))
        if drafts:
            self._serve_checked(rows, texts, params, drafts, drafter, stop_ids, layer, results)
        if misses:
            sub_params = params.for_rows(misses, len(rows))
            outputs = decode(self, [rows[i] for i in misses], sub_params, drafter, stop_ids, layer)
            for i, out in zip(misses, outputs):
                results[i] = self._result(out.token_ids, out.finish_reason, out.stats)
                if layer is not None:
                    row_params = params.for_row(i, len(rows))
                    layer.record(rows[i], texts[i] if texts else None, row_params, out.token_ids, out.finish_reason)
        if layer is not None:
            errors = layer.error_count() - errors_before
            for r in results:
                r.stats.cache_errors = errors
        return results  # type: ignore[return-value]

    def _serve_checked(self, rows, texts, params, drafts, drafter, stop_ids, layer, results) -> None:
        """Cached greedy responses: one checking forward for all of them, then decode on where needed."""
        from .caching import verify_responses

        check_start = time.perf_counter()
        checked = verify_responses(
            self, [rows[i] for i, _, _ in drafts], [h.token_ids for _, h, _ in drafts], params.max_new_tokens, stop_ids
        )
        check_time = time.perf_counter() - check_start
        groups: dict[int, list[tuple[int, Any, Any]]] = {}  # tokens still to decode -> rows
        for (i, hit, start), c in zip(drafts, checked):
            if c.finish_reason is None:
                groups.setdefault(params.max_new_tokens - len(c.token_ids), []).append((i, hit, c))
                continue
            stats = GenerationStats(
                prompt_tokens=len(rows[i]),
                new_tokens=len(c.token_ids),
                target_forwards=1,
                cache_hit=True,
                cache_kind=c.kind,
                cache_verified_tokens=min(c.verified_tokens, len(c.token_ids)),
            )
            stats.wall_time_s = time.perf_counter() - start
            results[i] = self._result(c.token_ids, c.finish_reason, stats)
            # Rewrite what was not exactly this request's confirmed entry (a near-duplicate, a wrong one).
            layer.record(
                rows[i], texts[i] if texts else None, params.for_row(i, len(rows)), c.token_ids, c.finish_reason,
                responses=not (hit.source == "exact" and c.kind == "verified"),
            )
        for remaining, group in groups.items():
            # Greedy: seeds do not matter, only the budget left after the kept tokens.
            sub_params = dataclasses.replace(params, max_new_tokens=remaining, seed=None)
            outputs = decode(self, [rows[i] + c.token_ids for i, _, c in group], sub_params, drafter, stop_ids, layer)
            for (i, _, c), out in zip(group, outputs):
                stats = out.stats
                stats.prompt_tokens = len(rows[i])
                stats.new_tokens += len(c.token_ids)
                stats.target_forwards += 1  # the checking forward
                stats.cache_kind = c.kind
                stats.cache_verified_tokens = c.verified_tokens
                stats.wall_time_s += check_time
                tokens = c.token_ids + out.token_ids
                results[i] = self._result(tokens, out.finish_reason, stats)
                layer.record(rows[i], texts[i] if texts else None, params.for_row(i, len(rows)), tokens, out.finish_reason)

    def _prepare(self, rows: list[list[int]], params: GenerationParams, cache) -> tuple[Any, Drafter, frozenset]:
        """Every check that can fail, before any compute."""
        self._check_rows(rows, params)
        params.row_seeds(len(rows))  # a per-row seed list must match the prompts
        layer = self.cache_layer if cache is _UNSET else (self._open_cache(cache) if cache else None)
        drafter = self._make_drafter(params, layer)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        return layer, drafter, frozenset(stop_ids)

    def _make_drafter(self, params: GenerationParams, layer) -> Drafter:
        name = resolve_drafter_name(params.drafter, self.draft_model is not None)
        return get_drafter_class(name)(self, layer)

    def _check_rows(self, rows: list[list[int]], params: GenerationParams) -> None:
        if not rows:
            raise ValueError("no prompts given; pass at least one prompt")
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            bad = [t for t in row if t < 0 or t >= self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i} has token ids outside the model's vocabulary [0, {self.vocab_size}): {bad[:5]}"
                )
            if self.max_positions is not None and len(row) + params.max_new_tokens > self.max_positions:
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens and max_new_tokens={params.max_new_tokens}: "
                    f"{len(row) + params.max_new_tokens} positions, but the model supports "
                    f"{self.max_positions}; shorten the prompt or lower max_new_tokens"
                )

    def _prompt_texts(self, prompts) -> list[str]:
        if self.tokenizer is None:
            raise ValueError("generate() needs a tokenizer for text prompts; use generate_ids() with token ids")
        if isinstance(prompts, str) or _is_chat(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a list of str or chat messages, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("no prompts given; pass at least one prompt")
        texts = []
        for i, p in enumerate(prompts):
            if _is_chat(p):
                p = self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a str or a list of chat messages, got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one character")
            texts.append(p)
        return texts

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def _decode_text(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _result(self, token_ids: list[int], finish_reason: str, stats: GenerationStats) -> GenerationResult:
        return GenerationResult(self._decode_text(token_ids), list(token_ids), finish_reason, stats)

    def _open_cache(self, spec: Any):
        from .caching import CacheLayer

        if not isinstance(spec, str):
            return CacheLayer.open(spec, self)
        if spec not in self._cache_layers:
            self._cache_layers[spec] = CacheLayer.open(spec, self)
        return self._cache_layers[spec]


# ---------------------------------------------------------------------- helpers


def check_vocab_compatible(target_size: int, draft_size: int, tokenizer=None, draft_tokenizer=None) -> None:
    """A draft must share the target's vocabulary; a prefix of it (padded tables) is fine."""
    if draft_size > target_size:
        raise ValueError(
            f"draft vocabulary ({draft_size} tokens) is larger than the target's ({target_size}); "
            "the draft must use the target's tokenizer (its vocabulary may only be a prefix of the target's)"
        )
    if tokenizer is not None and len(tokenizer) > draft_size:
        raise ValueError(
            f"draft vocabulary ({draft_size} tokens) cannot represent the tokenizer's {len(tokenizer)} tokens "
            f"(target vocabulary: {target_size}); use a draft trained with the target's tokenizer"
        )
    if tokenizer is not None and draft_tokenizer is not None:
        target_vocab = tokenizer.get_vocab()
        draft_vocab = draft_tokenizer.get_vocab()
        differing = [t for t, i in draft_vocab.items() if target_vocab.get(t) != i]
        if differing:
            t = differing[0]
            raise ValueError(
                f"draft tokenizer ({len(draft_vocab)} tokens) does not match the target tokenizer "
                f"({len(target_vocab)} tokens): {len(differing)} tokens differ, e.g. {t!r} is "
                f"{draft_vocab[t]} in the draft and {target_vocab.get(t)} in the target"
            )


def _check_model(name: str, model) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"{name} must be a transformers causal LM (torch.nn.Module with a .config), got {type(model).__name__}; "
            "use SpeculativeGenerator.from_pretrained to load from a hub id or path"
        )


def _vocab_size(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def _max_positions(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _input_device(model) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for source in (getattr(gen_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _model_fingerprint(model) -> dict:
    config = model.config
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
    return {
        "name": getattr(config, "_name_or_path", "") or "",
        "revision": getattr(config, "_commit_hash", None),
        "config_sha256": digest,
    }


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        value = getattr(torch, dtype, None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or a name like 'float32', 'bfloat16', 'float16'")


def _is_chat(p) -> bool:
    return isinstance(p, (list, tuple)) and bool(p) and all(isinstance(m, dict) for m in p)


def _id_rows(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids tensor must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)):
        raise TypeError(f"input_ids must be a list of ints or a list of lists of ints, got {type(input_ids).__name__}")
    if not input_ids:
        raise ValueError("no prompts given; pass at least one prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
        input_ids = [input_ids]
    rows = []
    for i, row in enumerate(input_ids):
        if not isinstance(row, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise TypeError(f"prompt {i} must be a list of ints, got {row!r:.80}")
        rows.append(list(row))
    return rows
