"""Canonical keys: canonical JSON, SHA-256 digests and the Redis key layout.

Every key lives under `specdec:{namespace}:`. Kinds:

    specdec:{ns}:resp:{sha256 hex}          a cached response
    specdec:{ns}:draft:{hex}                a draft-store continuation
    specdec:{ns}:epoch                      the namespace epoch token (replaced to invalidate all)
    specdec:{ns}:model-epoch:{model id}     a per-model epoch token (replaced to invalidate one model)
    specdec:{ns}:models                     hash: model id -> description (for the CLI)
    specdec:{ns}:stats                      hash: shared hit/miss/store counters

With a secret (trusted mode) an epoch value is an authenticated record
`e1:{generation}:{token}:{tag}` and a model description carries a `tag` (see namespace.py);
either way the whole epoch value goes into the key material.

Namespaces are restricted to `[A-Za-z0-9_.-]`, so they never contain `:` or glob
characters and `specdec:{ns}:*` matches exactly one namespace in SCAN.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Mapping, Set
from typing import Any

# Bump when the key material or value layout changes meaning: old entries stop matching.
# 2: prompt kinds (text / ids / near), effective stop set, epoch tokens, full-weight fingerprints.
SCHEMA_VERSION = 2
# What the prompt of a response key is: the exact ids of a text prompt, the exact ids of
# an id prompt (separate spaces: the same ids reached two ways never share an exact
# entry), or the ids of the normalised text ("near": shared by whitespace variants and
# by an id prompt that decodes to the same text; only ever used as a draft).
PROMPT_KINDS = ("text", "ids", "near")
PREFIX = "specdec"
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PLAIN = (str, int, bool, type(None))  # exact types that canonicalize to themselves


def validate_namespace(namespace: str) -> str:
    """Return `namespace` if it is 1-64 characters of [A-Za-z0-9_.-], else raise ValueError."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"invalid cache namespace {namespace!r}: use 1-64 characters from "
            "letters, digits, '_', '.', '-' (e.g. namespace=prod-v2)"
        )
    return namespace


_INT_ONLY = {int}


def canonicalize(obj: Any) -> Any:
    """Turn `obj` into plain JSON data with one spelling per value.

    Mappings keep string keys (sorted when dumped); lists and tuples become lists;
    sets become sorted lists; numpy-style integers become int, other reals float;
    -0.0 becomes 0.0. NaN and infinities, non-string mapping keys and other types
    raise, because they have no single spelling.
    """
    cls = type(obj)
    # Exact-type fast paths first: keys are built on every cache lookup.
    if cls in _PLAIN:
        return obj
    if cls is list or cls is tuple:
        if not obj or set(map(type, obj)) == _INT_ONLY:  # token ids: nothing to convert (a C-level scan)
            return list(obj)
        return [canonicalize(v) for v in obj]
    if cls is dict and all(type(k) is str for k in obj):
        return {k: v if type(v) in _PLAIN else canonicalize(v) for k, v in obj.items()}
    if cls is float:
        if not math.isfinite(obj):
            raise ValueError(f"cannot put non-finite number {obj!r} into a cache key")
        return 0.0 if obj == 0.0 else obj
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"cannot put non-finite number {value!r} into a cache key")
        return 0.0 if value == 0.0 else value
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key mappings need str keys, got {type(k).__name__} ({k!r})")
            out[k] = canonicalize(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [canonicalize(v) for v in obj]
    if isinstance(obj, (Set, frozenset)):
        items = [canonicalize(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")))
    raise TypeError(
        f"cannot put {type(obj).__name__} into a cache key; use None, bool, int, float, str, "
        "list/tuple/set or a str-keyed mapping of those"
    )


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: canonicalized, sorted keys, no whitespace, ASCII only."""
    return json.dumps(
        canonicalize(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def digest(obj: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def short_id(obj: Any) -> str:
    """A 32-hex-character (128-bit) id of `obj`, for fingerprints and index keys."""
    return digest(obj)[:32]


def response_material(
    *,
    namespace: str,
    epoch: str,
    model: str,
    model_epoch: str,
    tokenizer: str,
    normalization: Mapping[str, Any],
    prompt_ids: list[int] | tuple[int, ...],
    sampling: Mapping[str, Any],
    seed: int | None,
    max_new_tokens: int,
    stop_token_ids: Any,
    prompt_kind: str = "ids",
    stop_strings: Any = (),
    extra_models: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The key material of a response, as the design lists it.

    `model` / `tokenizer` are fingerprint ids; `epoch` / `model_epoch` the current epoch
    tokens; `prompt_kind` one of PROMPT_KINDS; `sampling` holds the sampling parameters
    already resolved to their effective values; `stop_token_ids` is the effective stop
    set (eos ids of the generation config, model config and tokenizer unless ignore_eos,
    plus the request's stop ids); `extra_models` maps further model ids the output
    depends on (a draft model under seeded sampling) to their epoch tokens.
    """
    if prompt_kind not in PROMPT_KINDS:
        raise ValueError(f"prompt_kind={prompt_kind!r}; allowed: {', '.join(PROMPT_KINDS)}")
    return {
        "schema": SCHEMA_VERSION,
        "namespace": namespace,
        "epoch": epoch,
        "model": {"id": model, "epoch": model_epoch},
        "extra_models": dict(extra_models or {}),
        "tokenizer": tokenizer,
        "normalization": dict(normalization),
        "prompt": {"kind": prompt_kind, "ids": list(prompt_ids)},
        "sampling": dict(sampling),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "stop": {"ids": sorted(set(stop_token_ids or ())), "strings": sorted(set(stop_strings or ()))},
    }


def response_key(namespace: str, hexdigest: str) -> str:
    """Redis key of a response: specdec:{namespace}:resp:{hex}."""
    return f"{PREFIX}:{namespace}:resp:{hexdigest}"


def draft_key(namespace: str, hexdigest: str) -> str:
    """Redis key of a draft-store continuation."""
    return f"{PREFIX}:{namespace}:draft:{hexdigest}"


def epoch_key(namespace: str) -> str:
    """Redis key of the namespace epoch token."""
    return f"{PREFIX}:{namespace}:epoch"


def model_epoch_key(namespace: str, model_id: str) -> str:
    """Redis key of one model's epoch token within a namespace."""
    return f"{PREFIX}:{namespace}:model-epoch:{model_id}"


def models_key(namespace: str) -> str:
    """Redis hash of model id -> JSON description, so the CLI can name models."""
    return f"{PREFIX}:{namespace}:models"


def stats_key(namespace: str) -> str:
    """Redis hash of shared counters (hits, misses, stores, ...)."""
    return f"{PREFIX}:{namespace}:stats"


def namespace_pattern(namespace: str) -> str:
    """SCAN pattern for every key of one namespace (safe: namespaces have no glob characters)."""
    return f"{PREFIX}:{validate_namespace(namespace)}:*"


def key_kind(key: str) -> str:
    """The kind part of a specdec key ('resp', 'draft', 'epoch', ...), '' if not one of ours."""
    parts = key.split(":", 3)
    return parts[2] if len(parts) >= 3 and parts[0] == PREFIX else ""
