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
one. An old epoch can therefore never come back by accident, whatever happens to its key.

Trusted mode (a secret). Whoever can write to the server can also write an old token
back, or restore a backup taken before an invalidation; an entry signed under the old
token would then be served again without a forward. So with a secret an epoch is a
record `e1:{generation}:{token}:{tag}`: tag = HMAC-SHA256 over the Redis key and
`e1:{generation}:{token}` (under a key derived from the secret), generation an integer
that only grows (an invalidation writes max(highest seen + 1, wall clock in
microseconds) with a fresh random token). The process remembers the highest
authenticated generation it has seen per epoch key, and so does a watermark file on
this machine (`_Generations`), which every later process reads. An epoch may vouch for
signed entries only if its record is authenticated and its generation is not below
that watermark; anything else (no tag, a bad tag, a record moved from another key, a
lower generation: a rollback) is counted, logged once, and its entries are at most
drafts to verify. The next writer replaces it with a new record above the watermark,
which is an invalidation: nothing can come back through it. Without a secret, epochs
stay plain random tokens (verified mode never serves an unchecked answer).

Physical deletion: a single key (DEL), or a whole namespace (SCAN + UNLINK in
batches, epoch counters kept and bumped first so that nothing written concurrently
with the old epoch can come back). Never FLUSHDB, never CONFIG SET.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .keys import (
    canonical_json,
    epoch_key,
    key_kind,
    model_epoch_key,
    models_key,
    namespace_pattern,
    stats_key,
    validate_namespace,
)
from .store import CacheStore

log = logging.getLogger("specdec.cache")

_KEEP_ON_FLUSH = ("epoch", "model-epoch")
_MAX_EPOCH_BYTES = 128
# e1:{generation}:{token}:{tag}; a generation has at most 18 digits (below 2**63).
_RECORD_PREFIX = "e1"
_RECORD = re.compile(r"e1:([1-9][0-9]{0,17}):([0-9a-f]{32}):([0-9a-f]{64})")
_MAX_GENERATION = 10**18 - 1
# A reader replaces an unusable epoch record at most this often per key (two processes
# with different secrets on one namespace would otherwise replace each other's on every read).
_REPLACE_INTERVAL_S = 1.0
# How often a reader looks at the watermark file for generations other processes saw.
_WATERMARK_CHECK_S = 1.0
ENV_CACHE_DIR = "SPECDEC_CACHE_DIR"
ENV_EPOCH_DIR = "SPECDEC_EPOCH_DIR"


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


# ---------------------------------------------------------------------- authenticated records


class _Signer:
    """HMAC keys derived from the trusted-mode secret, one per purpose (never the secret itself)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._epoch = self._derive(b"specdec epoch record v1")
        self._registry = self._derive(b"specdec model registry v1")
        # Names this secret in watermark file names without revealing anything about it.
        self.scope_id = self._derive(b"specdec watermark scope v1").hex()[:32]

    def _derive(self, purpose: bytes) -> bytes:
        return hmac.new(self._secret, purpose, hashlib.sha256).digest()

    def same_secret(self, secret: bytes | None) -> bool:
        return secret is not None and hmac.compare_digest(self._secret, secret)

    def _epoch_tag(self, key: str, body: str) -> str:
        return hmac.new(self._epoch, key.encode("utf-8") + b"\x00" + body.encode("ascii"), hashlib.sha256).hexdigest()

    def epoch_record(self, key: str, generation: int) -> str:
        """A new authenticated epoch record for `key`: this generation, a fresh random token."""
        body = f"{_RECORD_PREFIX}:{generation}:{new_epoch()}"
        return f"{body}:{self._epoch_tag(key, body)}"

    def epoch_generation(self, key: str, value: str | None) -> int | None:
        """The generation of an epoch record authenticated for `key`, else None."""
        match = _RECORD.fullmatch(value) if value else None
        if match is None:
            return None
        body = value[: match.start(3) - 1]
        if not hmac.compare_digest(self._epoch_tag(key, body), match.group(3)):
            return None
        return int(match.group(1))

    def registry_tag(self, key: str, model_id: str, description: dict[str, Any]) -> str:
        material = key.encode("utf-8") + b"\x00" + model_id.encode("utf-8") + b"\x00" + canonical_json(description)
        return hmac.new(self._registry, material, hashlib.sha256).hexdigest()


def watermark_dir() -> Path:
    """Where generation watermarks live: $SPECDEC_EPOCH_DIR, else $SPECDEC_CACHE_DIR/epochs, else
    <XDG cache or ~/.cache>/specdec/epochs."""
    if os.environ.get(ENV_EPOCH_DIR):
        return Path(os.environ[ENV_EPOCH_DIR]).expanduser()
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser() / "epochs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "specdec" / "epochs"


class _Generations:
    """The highest authenticated generation seen per epoch key, for one server, namespace and secret.

    Kept in this process (shared by every Namespace on the same scope) and, for network
    servers, in a watermark file that later processes on this machine read: a small
    JSON map of epoch key -> generation, written atomically (temporary file + rename,
    under a lock file), holding no secret and nothing derived from one but the file
    name's hash. A generation below the watermark is a rollback. Failing to read or
    write the file never fails a request; detection then rests on this process's memory.
    """

    def __init__(self, path: Path | None, about: dict[str, str], seen: dict[str, int] | None = None) -> None:
        self.path = path
        self.about = about
        self._seen: dict[str, int] = dict(seen or {})
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._next_check = 0.0
        self._warned: set[tuple[str, int]] = set()
        self._file_failed = False

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    # -- the file --

    def _read_file(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_bytes())  # type: ignore[union-attr]
            gens = data.get("generations", {}) if isinstance(data, dict) else {}
            return {k: v for k, v in gens.items() if isinstance(k, str) and type(v) is int and 0 < v <= _MAX_GENERATION}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            self._file_trouble("read", exc)
            return {}

    def _refresh(self, force: bool = False) -> None:
        """Merge in what other processes on this machine wrote (at most once per _WATERMARK_CHECK_S)."""
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + _WATERMARK_CHECK_S
        try:
            st = self.path.stat()
        except OSError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        for key, generation in self._read_file().items():
            if generation > self._seen.get(key, 0):
                self._seen[key] = generation

    def _persist(self, key: str, generation: int) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.path.with_suffix(".lock"), "a") as lock:
                try:
                    import fcntl

                    fcntl.flock(lock, fcntl.LOCK_EX)
                except ImportError:  # pragma: no cover - not POSIX: last writer wins
                    pass
                gens = self._read_file()
                if gens.get(key, 0) >= generation:
                    return
                gens[key] = generation
                payload = json.dumps({"format": 1, **self.about, "generations": gens}, indent=1, sort_keys=True)
                fd, tmp = tempfile.mkstemp(prefix=".wm-", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w") as out:
                        out.write(payload)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
        except OSError as exc:
            self._file_trouble("write", exc)

    def _file_trouble(self, what: str, exc: BaseException) -> None:
        if not self._file_failed:
            self._file_failed = True
            log.warning(
                "cannot %s the epoch watermark file %s (%s: %s); rollbacks are detected from this process's memory only",
                what, self.path, type(exc).__name__, exc,
            )

    # -- generations --

    def highest(self, key: str) -> int:
        """The highest generation seen for `key` (0: none)."""
        with self._lock:
            self._refresh()
            return self._seen.get(key, 0)

    def observe(self, key: str, generation: int, label: str) -> bool:
        """Record an authenticated generation; False (counted by the caller, logged once) if it is a rollback."""
        with self._lock:
            self._refresh(force=generation > self._seen.get(key, 0))
            highest = self._seen.get(key, 0)
            if generation > highest:
                self._seen[key] = generation
                self._persist(key, generation)
                return True
            if generation == highest:
                return True
            if (key, generation) not in self._warned:
                self._warned.add((key, generation))
                log.warning(
                    "epoch %s rolled back: generation %d is below generation %d seen before (an old record "
                    "written back, or a restored backup); its entries are not trusted, and the next "
                    "write replaces it by a new epoch",
                    label, generation, highest,
                )
            return False

    def next_generation(self, key: str, current: int | None) -> int:
        """A generation above every one seen (here, in the watermark, and the record now on the server)."""
        return min(_MAX_GENERATION, max(self.highest(key) + 1, (current or 0) + 1, time.time_ns() // 1000))


_GENERATIONS: dict[tuple[int, str], _Generations] = {}
_GENERATIONS_LOCK = threading.Lock()


def _server_id(store: CacheStore) -> tuple[str, bool]:
    """Who the server is (no credentials), and whether it outlives this process."""
    config = store.config
    if config.backend != "redis":
        return f"{config.backend}:{config.url}", False
    db = config.redis_options.get("db", "")
    return config.describe() + (f"?db={db}" if db else ""), True


def _generations_for(store: CacheStore, namespace: str, signer: _Signer) -> _Generations:
    server, persistent = _server_id(store)
    scope = hashlib.sha256(f"{server}\x00{namespace}\x00{signer.scope_id}".encode("utf-8")).hexdigest()[:32]
    pid = os.getpid()
    with _GENERATIONS_LOCK:
        found = _GENERATIONS.get((pid, scope))
        if found is None:
            inherited = next((g for (p, s), g in _GENERATIONS.items() if s == scope), None)  # a forked child's
            path = watermark_dir() / f"{scope}.json" if persistent else None
            found = _GENERATIONS[(pid, scope)] = _Generations(
                path, {"server": server, "namespace": namespace}, inherited._seen if inherited else None
            )
        return found


def _after_fork_in_child() -> None:
    global _GENERATIONS_LOCK
    _GENERATIONS_LOCK = threading.Lock()
    for generations in _GENERATIONS.values():
        generations.after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------- namespace


class Namespace:
    """Epoch bookkeeping and invalidation for one namespace on one store.

    `secret` (trusted mode): epochs and model-registry records are written with tags
    under keys derived from it, and an epoch vouches for signed entries only while its
    record is authenticated and not rolled back (see the module docstring).
    """

    def __init__(self, store: CacheStore, name: str, *, secret: bytes | None = None) -> None:
        self.store = store
        self.name = validate_namespace(name)
        self._signer = _Signer(secret) if secret is not None else None
        self._generations = _generations_for(store, self.name, self._signer) if self._signer else None
        self._checked: dict[str, tuple[str, int | None]] = {}  # epoch key -> (value, authenticated generation)
        self._replaced: dict[str, float] = {}  # epoch key -> monotonic time of this reader's last replacement
        self._warned: set[str] = set()

    @property
    def signed(self) -> bool:
        """Trusted mode: epochs and registry records are authenticated under a secret."""
        return self._signer is not None

    def signed_with(self, secret: bytes | None) -> bool:
        """Whether this namespace authenticates under exactly `secret`."""
        return self._signer is not None and self._signer.same_secret(secret)

    def epoch_keys(self, model_ids: Sequence[str] = ()) -> list[str]:
        """The namespace epoch key followed by one epoch key per model id."""
        return [epoch_key(self.name)] + [model_epoch_key(self.name, m) for m in model_ids]

    def cached_epochs(self, model_ids: Sequence[str] = ()) -> list[str] | None:
        """Epoch tokens last seen in this process, or None if any is unknown or missing."""
        values = [self.store.epochs.get(k) for k in self.epoch_keys(model_ids)]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    # -- trust (trusted mode) --

    def _generation(self, key: str, value: str) -> int | None:
        """The authenticated generation of `value` under `key` (memoised per key), None if unauthenticated.

        A value seen for the first time is checked against the generations seen before:
        a rollback is counted and logged once; an unauthenticated record is counted.
        """
        memo = self._checked.get(key)
        if memo is not None and memo[0] == value:
            return memo[1]
        generation = self._signer.epoch_generation(key, value)  # type: ignore[union-attr]
        if generation is None:
            self.store.count("epoch_unauthenticated")
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "epoch %s is not authenticated under this cache's secret (written without it, under another "
                    "secret, or forged); its entries are not trusted, and the next write replaces it by a new epoch", key,
                )
        elif not self._generations.observe(key, generation, key):  # type: ignore[union-attr]
            self.store.count("epoch_rollbacks")
        self._checked[key] = (value, generation)
        return generation

    def _trusted(self, key: str, value: str | None) -> bool:
        if value is None or self._signer is None:
            return False
        generation = self._generation(key, value)
        return generation is not None and generation >= self._generations.highest(key)  # type: ignore[union-attr]

    def epochs_trusted(self, model_ids: Sequence[str], epochs: Sequence[str]) -> bool:
        """May entries keyed under these epochs be served without a forward? (Never without a secret.)"""
        keys = self.epoch_keys(model_ids)
        return (
            self._signer is not None
            and len(epochs) == len(keys)
            and all(self._trusted(k, v) for k, v in zip(keys, epochs))
        )

    # -- reading epochs --

    def _remember(self, keys: Sequence[str], raw: Sequence[bytes | None]) -> list[str | None]:
        values = [_parse_epoch(r) for r in raw]
        for key, value in zip(keys, values):
            if value is None:
                self.store.epochs.pop(key, None)  # never keep reading under a token that is gone
            else:
                self.store.epochs[key] = value
                if self._signer is not None:
                    self._generation(key, value)  # a newer generation raises the watermark at once
        return values

    def fetch_epochs(self, model_ids: Sequence[str] = ()) -> list[str] | None:
        """Current epoch tokens from the server (one round trip); None on failure or if any is missing."""
        keys = self.epoch_keys(model_ids)
        raw = self.store.call("mget", keys)
        if raw is None:
            return None
        values = self._remember(keys, raw)
        return None if any(v is None for v in values) else values  # type: ignore[return-value]

    def ensure_epochs(self, model_ids: Sequence[str] = (), *, replace: bool = True) -> list[str] | None:
        """Current epoch tokens, creating a fresh one where one is missing (writers; readers on a miss).

        SET NX for a missing token: of several writers that find it missing, exactly one
        creates it and all use that one. With a secret and `replace`, a record that is not
        authenticated or is rolled back is replaced by a new record above the watermark (at
        most once per _REPLACE_INTERVAL_S per key by this namespace object): an invalidation,
        so it never brings anything back. Readers pass replace=False and read under such a
        record untrusted (its entries are drafts to verify); the next write replaces it.
        None on failure or junk that cannot be replaced here.
        """
        keys = self.epoch_keys(model_ids)
        raw = self.store.call("mget", keys)
        if raw is None:
            return None
        values = self._remember(keys, raw)
        todo = [
            (k, v)
            for k, v in zip(keys, values)
            if v is None or (replace and self._signer is not None and not self._trusted(k, v))
        ]
        if not todo:
            return values  # type: ignore[return-value]
        for key, value in todo:
            if value is None:
                if self.store.call("set_if_absent", key, self._new_value(key, None).encode(), default=None) is None:
                    return None
                continue
            now = time.monotonic()
            if now < self._replaced.get(key, 0.0) + _REPLACE_INTERVAL_S:
                continue  # replaced a moment ago: read under it untrusted for now
            self._replaced[key] = now
            record = self._new_value(key, value)
            if self.store.call("set_many", [(key, record.encode(), None)], default=False) is False:
                return None
            self.store.count("epoch_replaced")
        return self.fetch_epochs(model_ids)

    def _new_value(self, key: str, current: str | None) -> str:
        """A new epoch value for `key`: a random token, or with a secret a record above every generation seen."""
        if self._signer is None:
            return new_epoch()
        generation = self._generations.next_generation(  # type: ignore[union-attr]
            key, self._signer.epoch_generation(key, current)
        )
        return self._signer.epoch_record(key, generation)

    def _read(
        self, model_ids: Sequence[str], keys_for: Callable[[list[str]], list[str]]
    ) -> tuple[list[str], list[bytes | None], bool] | None:
        ekeys = self.epoch_keys(model_ids)
        cached = self.cached_epochs(model_ids)
        current: list[str | None] | None
        if cached is not None:
            keys = keys_for(cached)
            raw = self.store.call("mget", ekeys + keys)
            if raw is None:
                return None
            current = self._remember(ekeys, raw[: len(ekeys)])
            if current == cached:
                return keys, raw[len(ekeys) :], self.epochs_trusted(model_ids, cached)
            if any(v is None for v in current):
                current = self.ensure_epochs(model_ids, replace=False)
        else:
            current = self.ensure_epochs(model_ids, replace=False)
        if current is None:
            return None
        keys = keys_for(current)  # type: ignore[arg-type]
        raw = self.store.call("mget", keys)
        if raw is None:
            return None
        return keys, raw, self.epochs_trusted(model_ids, current)  # type: ignore[arg-type]

    def read(
        self, model_ids: Sequence[str], keys_for: Callable[[list[str]], list[str]]
    ) -> tuple[list[str], list[bytes | None]] | None:
        """Fetch the values of keys_for(current epochs): one round trip when the epochs are known.

        Returns (keys, values), or None when the server failed. A missing epoch is a new
        one: the reader creates it (SET NX, once per namespace and model), so that this
        process knows the epochs it will write under.
        """
        result = self._read(model_ids, keys_for)
        return None if result is None else (result[0], result[1])

    def read_checked(
        self, model_ids: Sequence[str], keys_for: Callable[[list[str]], list[str]]
    ) -> tuple[list[str], list[bytes | None], bool] | None:
        """read(), plus whether the epochs the keys were built from may vouch for signed entries
        (authenticated and not rolled back; always False without a secret)."""
        return self._read(model_ids, keys_for)

    # -- invalidation (admin: errors propagate) --

    def _replace(self, key: str) -> str:
        current = _parse_epoch(self.store.admin("get", key)) if self._signer is not None else None
        token = self._new_value(key, current)
        self.store.admin("set_many", [(key, token.encode(), None)])
        self.store.epochs[key] = token
        if self._signer is not None:
            self._generation(key, token)  # this process now detects the old record written back
        return token

    def bump(self) -> str:
        """Invalidate the whole namespace in O(1): a new random epoch token (with a secret: record), returned."""
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

    # -- the model registry (for the CLI) --

    def register_model(self, model_id: str, description: dict[str, Any]) -> None:
        """Remember what a model id stands for (written behind; best effort; tagged with a secret)."""
        desc = {k: v for k, v in description.items() if k not in ("tag", "authenticated")}
        if self._signer is not None:
            desc["tag"] = self._signer.registry_tag(models_key(self.name), model_id, desc)
        payload = json.dumps(desc, sort_keys=True).encode()
        self.store.submit(lambda: self.store.call("hset_many", models_key(self.name), {model_id: payload}))

    def models(self) -> dict[str, dict[str, Any]]:
        """Model ids seen in this namespace -> their descriptions.

        Each description has `authenticated`: True only with a secret, for a record whose
        tag is valid under it for this namespace and this model id. Anything else was
        written by someone without the secret (or without any: verified mode) and names
        nothing reliably.
        """
        out = {}
        key = models_key(self.name)
        for model_id, raw in self.store.admin("hgetall", key).items():
            try:
                desc = json.loads(raw)
            except ValueError:
                desc = None
            # Anyone who can write to the server can write here: keep only what parses as ours.
            if not isinstance(desc, dict):
                out[model_id] = {"description": raw.decode("utf-8", "replace"), "authenticated": False}
                continue
            tag = desc.pop("tag", None)
            desc.pop("authenticated", None)
            authenticated = False
            if self._signer is not None and isinstance(tag, str):
                try:
                    expected = self._signer.registry_tag(key, model_id, desc)
                except (TypeError, ValueError):  # something canonical JSON has no spelling for
                    expected = ""
                authenticated = bool(expected) and hmac.compare_digest(
                    expected.encode("ascii"), tag.encode("utf-8", "replace")
                )
            desc["authenticated"] = authenticated
            out[model_id] = desc
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
