"""Namespaces, their epochs, and invalidation.

Keys embed the namespace epoch and the epoch of each model they depend on, so
invalidating a namespace or a model is one SET (O(1)): new keys are computed with
the new epoch, and the old entries, unreachable now, expire with their TTL. Reads are
optimistic: the reader computes keys with the epochs it last saw and fetches epochs
and values in one MGET; only if an epoch moved does it fetch again (a second round
trip), so the steady state costs one round trip and a stale epoch is never trusted.

An epoch is a random token, not a counter: a counter that is deleted or evicted
restarts at a value it had before and brings the old entries back. A missing token is
a new epoch: readers miss, and the first writer creates a fresh random token (SET NX,
so concurrent writers agree on one). Invalidation replaces the token with a new random
one. An old epoch can therefore never come back, whatever happens to its key.

Physical deletion: a single key (DEL), or a whole namespace (SCAN + UNLINK in
batches, epoch counters kept and bumped first so that nothing written concurrently
with the old epoch can come back). Never FLUSHDB, never CONFIG SET.
"""

from __future__ import annotations

import json
import secrets
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
_MAX_EPOCH_BYTES = 128


def new_epoch() -> str:
    """A fresh epoch token: 128 random bits, never equal to an earlier one."""
    return secrets.token_hex(16)


def _parse_epoch(raw: bytes | str | None) -> str | None:
    """The epoch token in a raw value; None when missing or not a plausible token.

    Any short value is taken as an opaque token (whatever wrote it, entries keyed under
    it are only reachable under exactly it); an empty or oversized value is junk and
    reads as missing, so lookups miss until an invalidation replaces it.
    """
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "replace")
    if not 0 < len(raw) <= _MAX_EPOCH_BYTES:
        return None
    return raw.decode("latin-1")


class Namespace:
    """Epoch bookkeeping and invalidation for one namespace on one store."""

    def __init__(self, store: CacheStore, name: str) -> None:
        self.store = store
        self.name = validate_namespace(name)

    def epoch_keys(self, model_ids: Sequence[str] = ()) -> list[str]:
        """The namespace epoch key followed by one epoch key per model id."""
        return [epoch_key(self.name)] + [model_epoch_key(self.name, m) for m in model_ids]

    def cached_epochs(self, model_ids: Sequence[str] = ()) -> list[str] | None:
        """Epoch tokens last seen in this process, or None if any is unknown or missing."""
        values = [self.store.epochs.get(k) for k in self.epoch_keys(model_ids)]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    def _remember(self, keys: Sequence[str], raw: Sequence[bytes | None]) -> list[str | None]:
        values = [_parse_epoch(r) for r in raw]
        for key, value in zip(keys, values):
            if value is None:
                self.store.epochs.pop(key, None)  # never keep reading under a token that is gone
            else:
                self.store.epochs[key] = value
        return values

    def fetch_epochs(self, model_ids: Sequence[str] = ()) -> list[str] | None:
        """Current epoch tokens from the server (one round trip); None on failure or if any is missing."""
        keys = self.epoch_keys(model_ids)
        raw = self.store.call("mget", keys)
        if raw is None:
            return None
        values = self._remember(keys, raw)
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    def ensure_epochs(self, model_ids: Sequence[str] = ()) -> list[str] | None:
        """Current epoch tokens, creating a fresh random token where one is missing (writers only).

        SET NX: of several writers that find a token missing, exactly one creates it and
        all use that one. None on failure or junk that cannot be replaced here.
        """
        keys = self.epoch_keys(model_ids)
        raw = self.store.call("mget", keys)
        if raw is None:
            return None
        values = self._remember(keys, raw)
        if all(v is not None for v in values):
            return values  # type: ignore[return-value]
        for key, value in zip(keys, values):
            if value is None and self.store.call("set_if_absent", key, new_epoch().encode(), default=None) is None:
                return None
        return self.fetch_epochs(model_ids)

    def read(
        self, model_ids: Sequence[str], keys_for: Callable[[list[str]], list[str]]
    ) -> tuple[list[str], list[bytes | None]] | None:
        """Fetch the values of keys_for(current epochs): one round trip when the epochs are known.

        Returns (keys, values), or None when the server failed. A missing epoch is a new
        one: the reader creates it (SET NX, once per namespace and model), so that this
        process knows the epochs it will write under.
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
            if any(v is None for v in current):
                current = self.ensure_epochs(model_ids)
        else:
            current = self.ensure_epochs(model_ids)
        if current is None:
            return None
        keys = keys_for(current)  # type: ignore[arg-type]
        raw = self.store.call("mget", keys)
        return None if raw is None else (keys, raw)

    # -- invalidation (admin: errors propagate) --

    def _replace(self, key: str) -> str:
        token = new_epoch()
        self.store.admin("set_many", [(key, token.encode(), None)])
        self.store.epochs[key] = token
        return token

    def bump(self) -> str:
        """Invalidate the whole namespace in O(1): a new random epoch token, returned."""
        return self._replace(epoch_key(self.name))

    def bump_model(self, model_id: str) -> str:
        """Invalidate every entry that depends on one model fingerprint; return its new epoch token."""
        return self._replace(model_epoch_key(self.name, model_id))

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
                desc = json.loads(raw)
            except ValueError:
                desc = None
            # Anyone who can write to the server can write here: keep only what parses as ours.
            out[model_id] = desc if isinstance(desc, dict) else {"description": raw.decode("utf-8", "replace")}
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
