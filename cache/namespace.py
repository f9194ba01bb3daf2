"""Namespaces, their epochs, and invalidation.

Keys embed the namespace epoch and the epoch of each model they depend on, so
invalidating a namespace or a model is one INCR (O(1)): new keys are computed with
the new epoch, and the old entries, unreachable now, expire with their TTL. Reads are
optimistic: the reader computes keys with the epochs it last saw and fetches epochs
and values in one MGET; only if an epoch moved does it fetch again (a second round
trip), so the steady state costs one round trip and a stale epoch is never trusted.

Physical deletion: a single key (DEL), or a whole namespace (SCAN + UNLINK in
batches, epoch counters kept and bumped first so that nothing written concurrently
with the old epoch can come back). Never FLUSHDB, never CONFIG SET.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from .keys import (
    epoch_key,
    key_kind,
    model_epoch_key,
    models_key,
    namespace_pattern,
    stats_key,
    validate_namespace,
)
from .store import CacheStore

_KEEP_ON_FLUSH = ("epoch", "model-epoch")


def _parse_epoch(raw: bytes | None) -> int:
    if raw is None:
        return 0
    try:
        return int(raw)
    except (TypeError, ValueError):
        return -1  # not ours; never equal to a real epoch


class Namespace:
    """Epoch bookkeeping and invalidation for one namespace on one store."""

    def __init__(self, store: CacheStore, name: str) -> None:
        self.store = store
        self.name = validate_namespace(name)

    def epoch_keys(self, model_ids: Sequence[str] = ()) -> list[str]:
        """The namespace epoch key followed by one epoch key per model id."""
        return [epoch_key(self.name)] + [model_epoch_key(self.name, m) for m in model_ids]

    def cached_epochs(self, model_ids: Sequence[str] = ()) -> list[int] | None:
        """Epochs last seen in this process, or None if any is unknown."""
        values = [self.store.epochs.get(k) for k in self.epoch_keys(model_ids)]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    def _remember(self, keys: Sequence[str], raw: Sequence[bytes | None]) -> list[int]:
        values = [_parse_epoch(r) for r in raw]
        self.store.epochs.update(zip(keys, values))
        return values

    def fetch_epochs(self, model_ids: Sequence[str] = ()) -> list[int] | None:
        """Current epochs from the server (one round trip), or None on failure."""
        keys = self.epoch_keys(model_ids)
        raw = self.store.call("mget", keys)
        return None if raw is None else self._remember(keys, raw)

    def read(
        self, model_ids: Sequence[str], keys_for: Callable[[list[int]], list[str]]
    ) -> tuple[list[str], list[bytes | None]] | None:
        """Fetch the values of keys_for(current epochs): one round trip when the epochs are known.

        Returns (keys, values) or None when the server failed.
        """
        ekeys = self.epoch_keys(model_ids)
        cached = self.cached_epochs(model_ids)
        if cached is not None:
            keys = keys_for(cached)
            raw = self.store.call("mget", ekeys + keys)
            if raw is None:
                return None
            current = self._remember(ekeys, raw[: len(ekeys)])
            if current == cached:
                return keys, raw[len(ekeys) :]
        else:
            current = self.fetch_epochs(model_ids)
            if current is None:
                return None
        keys = keys_for(current)
        raw = self.store.call("mget", keys)
        return None if raw is None else (keys, raw)

    # -- invalidation (admin: errors propagate) --

    def bump(self) -> int:
        """Invalidate the whole namespace in O(1); return the new epoch."""
        key = epoch_key(self.name)
        value = int(self.store.admin("incr", key))
        self.store.epochs[key] = value
        return value

    def bump_model(self, model_id: str) -> int:
        """Invalidate every entry that depends on one model fingerprint; return its new epoch."""
        key = model_epoch_key(self.name, model_id)
        value = int(self.store.admin("incr", key))
        self.store.epochs[key] = value
        return value

    def delete_key(self, key: str) -> bool:
        """Delete one key of this namespace; True if it existed."""
        prefix = f"specdec:{self.name}:"
        if not key.startswith(prefix):
            raise ValueError(f"key {key!r} is not in namespace {self.name!r} (expected prefix {prefix!r})")
        return bool(self.store.admin("delete", [key]))

    def flush(self, batch: int = 500, dry_run: bool = False) -> int:
        """Delete every entry of the namespace by SCAN; return how many keys were (or would be) deleted."""
        if not dry_run:
            self.bump()  # writers still holding the old epoch now write unreachable keys
        deleted = 0
        chunk: list[str] = []
        for key in self.store.admin("scan", namespace_pattern(self.name), 1000):
            if key_kind(key) in _KEEP_ON_FLUSH:
                continue
            chunk.append(key)
            if len(chunk) >= batch:
                deleted += len(chunk) if dry_run else self.store.admin("delete", chunk)
                chunk = []
        if chunk:
            deleted += len(chunk) if dry_run else self.store.admin("delete", chunk)
        return deleted

    # -- bookkeeping for the CLI --

    def register_model(self, model_id: str, description: dict[str, Any]) -> None:
        """Remember what a model id stands for (written behind; best effort)."""
        payload = json.dumps(description, sort_keys=True).encode()
        self.store.submit(lambda: self.store.call("hset_many", models_key(self.name), {model_id: payload}))

    def models(self) -> dict[str, dict[str, Any]]:
        """Model ids seen in this namespace -> their descriptions."""
        out = {}
        for model_id, raw in self.store.admin("hgetall", models_key(self.name)).items():
            try:
                out[model_id] = json.loads(raw)
            except ValueError:
                out[model_id] = {"description": raw.decode("utf-8", "replace")}
        return out

    def shared_counts(self) -> dict[str, int]:
        """Counters all processes add to (hits, misses, stores, ...)."""
        out = {}
        for name, raw in self.store.admin("hgetall", stats_key(self.name)).items():
            try:
                out[name] = int(raw)
            except ValueError:
                continue
        return out

    def stats(self) -> dict[str, Any]:
        """Epoch, key counts by kind (SCAN), known models and shared counters of this namespace."""
        by_kind: dict[str, int] = {}
        for key in self.store.admin("scan", namespace_pattern(self.name), 1000):
            kind = key_kind(key)
            by_kind[kind] = by_kind.get(kind, 0) + 1
        epoch = _parse_epoch(self.store.admin("get", epoch_key(self.name)))
        return {
            "namespace": self.name,
            "epoch": epoch,
            "keys": by_kind,
            "models": self.models(),
            "counters": self.shared_counts(),
        }
