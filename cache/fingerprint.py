"""Fingerprints of models and tokenizers: what a cached answer depends on.

Model: name or path, revision (commit hash when loaded from the hub), SHA-256 of the
config JSON, the parameter dtype, and a SHA-256 of a small sample of the weights (a
few hundred values from three tensors), so a model retrained and saved to the same
path gets a new fingerprint without hashing gigabytes.
Tokenizer: class, name or path, vocabulary size, SHA-256 of the sorted vocabulary and
the special token ids.

Computed once per object (weakly memoised). Everything here is duck-typed; torch and
transformers are not imported.
"""

from __future__ import annotations

import hashlib
import re
import weakref
from typing import Any

from .keys import canonical_json, short_id

_MODEL_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_TOKENIZER_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_WEIGHT_SAMPLE = 256


def _memo(memo: weakref.WeakKeyDictionary, obj: Any, compute) -> dict:
    try:
        found = memo.get(obj)
    except TypeError:  # not weak-referenceable: compute every time
        return compute(obj)
    if found is None:
        found = compute(obj)
        memo[obj] = found
    return found


def _weights_sample(model: Any) -> str | None:
    params = getattr(model, "parameters", None)
    if params is None:
        return None
    tensors = [p for p in params() if not getattr(p, "is_meta", False)]
    if not tensors:
        return None
    h = hashlib.sha256()
    for t in {0: tensors[0], 1: tensors[len(tensors) // 2], 2: tensors[-1]}.values():
        flat = t.detach().reshape(-1)[:_WEIGHT_SAMPLE]
        h.update(str(tuple(t.shape)).encode())
        h.update(canonical_json(flat.float().cpu().tolist()))
    return h.hexdigest()


def _compute_model_fingerprint(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    config_json = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    dtype = getattr(model, "dtype", None)
    return {
        "name_or_path": str(name) if name else type(model).__name__,
        "revision": getattr(config, "_commit_hash", None) or getattr(config, "revision", None),
        "config_sha256": hashlib.sha256(config_json.encode("utf-8")).hexdigest(),
        "dtype": str(dtype) if dtype is not None else None,
        "weights_sample_sha256": _weights_sample(model),
    }


def _compute_tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    vocab_blob = canonical_json(sorted(vocab.items()))
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(vocab_blob).hexdigest(),
        "special": {k: v for k, v in special.items() if isinstance(v, int)},
    }


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The fingerprint fields of a model (memoised per object)."""
    return _memo(_MODEL_MEMO, model, _compute_model_fingerprint)


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """The fingerprint fields of a tokenizer (memoised per object)."""
    return _memo(_TOKENIZER_MEMO, tokenizer, _compute_tokenizer_fingerprint)


def fingerprint_id(fingerprint: Any) -> str:
    """A short id for a fingerprint: kept as is if it is already a short id-like string, else hashed."""
    if isinstance(fingerprint, str) and _ID_RE.match(fingerprint):
        return fingerprint
    return short_id(fingerprint)
