"""Fingerprints of models and tokenizers: what a cached answer depends on.

Model: name or path, revision (commit hash when loaded from the hub), SHA-256 of the
config JSON, the parameter dtype, and a SHA-256 over EVERY parameter and buffer (name,
dtype, shape and all bytes), so a change to any weight, anywhere, gives a new
fingerprint. A sample of the weights is not enough: fine-tuning a few layers and
saving to the same path leaves any fixed sample unchanged.

Cost: SHA-256 runs at roughly 0.5 GB/s per core and hashlib releases the GIL, so the
tensors are hashed in 16 MiB chunks on a thread per core (a tree hash: per-chunk
digests, then one digest over them in a fixed order). benchmarks/bench_cache.py
measures it against load time. Computed once per model object (weakly memoised):
weights changed in place on a live object keep the old fingerprint; reload the
model (or call `invalidate_model`) after changing weights.

Tokenizer: class, name or path, vocabulary size, SHA-256 of the sorted vocabulary and
the special token ids.

torch is imported lazily (only to view tensors as bytes); transformers never.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .keys import canonical_json, short_id

_MODEL_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_TOKENIZER_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CHUNK_BYTES = 16 << 20


def _memo(memo: weakref.WeakKeyDictionary, obj: Any, compute) -> dict:
    try:
        found = memo.get(obj)
    except TypeError:  # not weak-referenceable: compute every time
        return compute(obj)
    if found is None:
        found = compute(obj)
        memo[obj] = found
    return found


def _named_tensors(model: Any) -> list[tuple[str, Any]]:
    """Every parameter and buffer once (tied weights under their first name), in a fixed order."""
    named = []
    for getter in ("named_parameters", "named_buffers"):
        fn = getattr(model, getter, None)
        if fn is not None:
            named.extend(fn(remove_duplicate=True))
    return named


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def weights_sha256(model: Any) -> str | None:
    """SHA-256 tree hash of every parameter and buffer of `model` (names, dtypes, shapes, bytes)."""
    named = [(n, t) for n, t in _named_tensors(model) if not getattr(t, "is_meta", False)]
    if not named:
        return None
    chunks: list[tuple[int, int, Any]] = []  # (tensor index, chunk offset, tensor)
    for i, (_, t) in enumerate(named):
        nbytes = t.numel() * t.element_size()
        chunks.extend((i, off, t) for off in range(0, max(nbytes, 1), _CHUNK_BYTES))
    views: dict[int, memoryview] = {}

    def chunk_digest(item: tuple[int, int, Any]) -> bytes:
        i, off, t = item
        view = views.get(i)
        if view is None:  # benign race: two threads may both convert; the bytes are equal
            view = views[i] = _tensor_bytes(t)
        return hashlib.sha256(view[off : off + _CHUNK_BYTES]).digest()

    workers = max(1, min(len(chunks), os.cpu_count() or 1))
    if workers == 1:
        digests = [chunk_digest(c) for c in chunks]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="specdec-fingerprint") as pool:
            digests = list(pool.map(chunk_digest, chunks))
    h = hashlib.sha256()
    for (i, off, t), d in zip(chunks, digests):
        if off == 0:
            name = named[i][0]
            h.update(canonical_json([name, str(t.dtype), list(t.shape)]))
        h.update(d)
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
        "weights_sha256": weights_sha256(model),
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
