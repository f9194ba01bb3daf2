"""Response cache: whole outputs of deterministic requests, keyed canonically.

The caller decides what is deterministic, resolves sampling parameters to their
effective values, and decides what a value may be used for (specdec.caching does all
three); this module turns a ResponseRequest into `specdec:{ns}:resp:{sha256}`, reads
with one round trip in the steady state, and writes behind. A value written by this
process but still queued is found in the pending map, so a repeat right after a miss
hits without waiting for the writer.

With a secret (trusted mode) values are written with an HMAC-SHA256 tag over the full
Redis key and the value, and a read reports whether the value it found carries a
valid tag AND was found under epochs that are authenticated and not rolled back
(`DecodedValue.authenticated`; see specdec.cache.namespace): a signed entry under an
old epoch written back, or restored from a backup, is not authenticated. Without a
secret, nothing read is authenticated.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .codec import (
    HEADER,
    KIND_RESPONSE,
    TAG_BYTES,
    CorruptValue,
    DecodedValue,
    ValueTooLarge,
    decode_value,
    encode_value,
)
from .keys import _INT_ONLY, digest, response_key, response_material
from .memo import LruMemo
from .namespace import Namespace
from .store import CacheStore


_KEY_MEMO_SIZE = 256  # keys of recent requests (a few MB at most with the prompt bound below)
_KEY_MEMO_PROMPT_TOKENS = 2048


def _frozen(value: Any) -> Any:
    """A hashable copy of key material that keeps each scalar's type: 1, 1.0 and True hash
    alike in Python but are spelled apart in the canonical JSON, so they must not meet here."""
    cls = type(value)
    if cls is tuple or cls is list:
        if set(map(type, value)) <= _INT_ONLY:  # token ids: the tuple itself (a C-level scan)
            return (cls, tuple(value))
        return (cls, tuple(_frozen(v) for v in value))
    if cls is dict:
        return (dict, tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if cls in _SCALARS:
        return (cls, value)
    raise TypeError(f"no frozen form for {cls.__name__}")


_SCALARS = frozenset({str, int, float, bool, type(None)})


@dataclass(frozen=True)
class ResponseRequest:
    """Everything a response depends on, apart from namespace and epochs."""

    model: str  # target model fingerprint id
    tokenizer: str  # tokenizer fingerprint id
    normalization: Mapping[str, Any]  # NormalizationOptions.spec()
    prompt_ids: tuple[int, ...]  # [T] token ids of the normalised prompt
    sampling: Mapping[str, Any]  # effective sampling parameters
    seed: int | None
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()  # the effective stop set (eos ids included unless ignore_eos)
    extra_models: tuple[str, ...] = ()  # other model ids the output depends on (draft model)
    prompt_kind: str = "ids"  # "text" | "ids" | "near" (see keys.PROMPT_KINDS)
    stop_strings: tuple[str, ...] = ()

    @property
    def model_ids(self) -> list[str]:
        """Every model id whose epoch is part of the key."""
        return [self.model, *self.extra_models]

    def material(self, namespace: str, epochs: list[str]) -> dict[str, Any]:
        """The canonical key material given [namespace epoch, model epoch, extra model epochs...]."""
        return response_material(
            namespace=namespace,
            epoch=epochs[0],
            model=self.model,
            model_epoch=epochs[1],
            tokenizer=self.tokenizer,
            normalization=self.normalization,
            prompt_ids=self.prompt_ids,
            sampling=self.sampling,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            prompt_kind=self.prompt_kind,
            stop_strings=self.stop_strings,
            extra_models=dict(zip(self.extra_models, epochs[2:])),
        )


_REQUEST_FIELDS = tuple(f.name for f in fields(ResponseRequest))


class ResponseCache:
    """Get/put whole responses in one namespace of one store."""

    def __init__(
        self,
        store: CacheStore,
        namespace: Namespace,
        *,
        ttl_s: float,
        max_value_bytes: int,
        secret: bytes | None = None,
    ) -> None:
        if secret is not None and not namespace.signed_with(secret):
            raise ValueError(
                "ResponseCache(secret=...) needs a Namespace opened with the same secret "
                "(Namespace(store, name, secret=...)): signed entries are only as good as the epochs they are keyed under"
            )
        self.store = store
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.max_value_bytes = max_value_bytes
        self._secret = secret
        self._pending: dict[str, bytes] = {}  # Redis key -> value queued for writing
        self._pending_lock = threading.Lock()
        self._keys: LruMemo[str] = LruMemo(_KEY_MEMO_SIZE)  # frozen request + epochs -> Redis key

    def __repr__(self) -> str:
        return f"ResponseCache(namespace={self.namespace.name!r}, signed={self._secret is not None})"

    def key(self, request: ResponseRequest, epochs: list[str]) -> str:
        """The Redis key of `request` under the given epochs.

        Memoised: a repeated request (what a cache serves) skips building the material, its
        canonical JSON and the SHA-256. The memo key is a typed, frozen copy of everything the
        material holds, so that values Python calls equal but the JSON spells differently
        (1, 1.0 and True) never share an entry; long prompts bypass the memo.
        """
        def compute() -> str:
            return response_key(self.namespace.name, digest(request.material(self.namespace.name, epochs)))

        if len(request.prompt_ids) > _KEY_MEMO_PROMPT_TOKENS:
            return compute()
        try:
            frozen = (tuple(epochs), *(_frozen(getattr(request, f)) for f in _REQUEST_FIELDS))
        except TypeError:  # something the memo cannot freeze: build the key as is
            return compute()
        return self._keys.get(frozen, compute)

    def lookup(self, request: ResponseRequest) -> DecodedValue | None:
        """The cached response, or None (miss, failure or a value that fails to decode)."""
        # The pending map is read BEFORE the server: the writer removes a key from it only
        # after the value reached the server, so a value queued before this call is either
        # in this snapshot or already on the server. Reading the server first would miss a
        # write that completes between the two reads.
        with self._pending_lock:
            pending = dict(self._pending) if self._pending else None
        result = self.namespace.read_checked(request.model_ids, lambda e: [self.key(request, e)])
        if result is None:
            return None
        (key,), (raw,), epochs_trusted = result
        if raw is None:
            raw = pending.get(key) if pending else None
            if raw is None:
                return None
        try:
            value = decode_value(raw, key, kind=KIND_RESPONSE, max_bytes=self.max_value_bytes, secret=self._secret)
        except CorruptValue:
            self.store.count("corrupt")
            return None
        if value.authenticated and not epochs_trusted:
            # A valid tag under an epoch that cannot vouch for it (unauthenticated, or rolled
            # back to a record older than one seen): at most a draft to verify.
            self.store.count("untrusted_epoch")
            return dataclasses.replace(value, authenticated=False)
        return value

    def put(self, request: ResponseRequest, tokens: list[int], finish_reason: str) -> bool:
        """Queue the response for writing; False if it was not queued (too large, queue full)."""
        tag = TAG_BYTES if self._secret else 0
        if HEADER.size + 4 * len(tokens) + len(finish_reason.encode("utf-8")) + tag > self.max_value_bytes:
            self.store.count("oversize")
            return False
        epochs = self.namespace.cached_epochs(request.model_ids)
        if epochs is not None and self._secret is not None and not self.namespace.epochs_trusted(request.model_ids, epochs):
            epochs = None  # the writer replaces an unusable epoch first (ensure_epochs)
        if epochs is not None:
            key = self.key(request, epochs)
            try:
                value = encode_value(
                    KIND_RESPONSE, tokens, key, tail=finish_reason, max_bytes=self.max_value_bytes, secret=self._secret
                )
            except ValueTooLarge:
                self.store.count("oversize")
                return False
            with self._pending_lock:
                self._pending[key] = value

            def job() -> None:
                try:
                    self.store.call("set_many", [(key, value, self.ttl_s or None)])
                finally:
                    with self._pending_lock:
                        self._pending.pop(key, None)

        else:
            # Epochs unknown in this process: the writer fetches them first.
            def job() -> None:
                current = self.namespace.ensure_epochs(request.model_ids)
                if current is None:
                    return
                key = self.key(request, current)
                try:
                    value = encode_value(
                        KIND_RESPONSE, tokens, key, tail=finish_reason, max_bytes=self.max_value_bytes, secret=self._secret
                    )
                except ValueTooLarge:
                    self.store.count("oversize")
                    return
                self.store.call("set_many", [(key, value, self.ttl_s or None)])

        queued = self.store.submit(job)
        if not queued and epochs is not None:
            with self._pending_lock:
                self._pending.pop(key, None)
        return queued

    def invalidate(self, request: ResponseRequest) -> bool:
        """Delete the entry of one request now (admin: errors propagate); True if it existed."""
        epochs = self.namespace.ensure_epochs(request.model_ids)  # a missing epoch is a new, empty one
        if epochs is None:
            raise ConnectionError(f"cache server {self.store.config.describe()} did not answer")
        key = self.key(request, epochs)
        with self._pending_lock:
            self._pending.pop(key, None)
        return self.namespace.delete_key(key)
