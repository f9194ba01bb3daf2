"""Draft-token store: continuations of finished sequences, indexed by hashed token contexts.

For a finished sequence s (prompt + output) and every position i among its last
`max_positions`, and every context length n in `contexts` (e.g. 32, 8, 3) with n <= i,
the store maps hash(s[i-n:i]) to the continuation s[i:i+L]. A lookup hashes the
last n tokens of the current sequence for each n, fetches all candidates in one MGET
and returns the continuation of the longest context that matched: long contexts are
precise, short ones still find something after a sampled token diverged.

Keys are bound to the namespace epoch and the tokenizer (token ids mean nothing under
another vocabulary), values are CRC-checked against their key, and tokens outside the
vocabulary are cut off. Entries are only ever drafts: the target verifies each token,
so a stale or poisoned entry costs speed, never correctness.

What a poisoned store can cost, per decoding step. Anyone who can write to the server
can put any bytes under any key, and whatever answers on the cache port can send any
reply; neither can make a step do more than this, with R rows looking up, C context
lengths and L = `continuation`:
  - one MGET of at most R*C draft keys plus the namespace epoch key, its reply read
    and parsed inside the call's deadline;
  - each value in that reply at most max(16 + 4L bytes, 1 KiB): the backend refuses a
    longer one from its announced length, before reading it, and fails the call
    (specdec.cache.backend, redis_backend); the 1 KiB floor leaves room for the epoch;
  - at most R*C values decoded, each at most 16 + 4L bytes (a longer one is counted
    as corrupt and skipped without decoding), so at most R*C*L tokens decoded and at
    most L tokens handed to each row.
So a step's cache work is O(R*C*L) bytes whatever the server holds (`decoded_bytes`
and `decoded_tokens` count it); a reply that does not fit is a failed call, counted,
and the step drafts without the store. Processes sharing a namespace should use the
same `continuation`: values longer than a reader's own are skipped by that reader.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Sequence

from .backend import Write
from .codec import (
    HEADER,
    KIND_DRAFT,
    CorruptValue,
    ValueTooLarge,
    decode_value,
    encode_token_bytes,
    encode_value,
    pack_tokens,
)
from .keys import SCHEMA_VERSION, canonical_json, draft_key
from .namespace import Namespace
from .store import CacheStore

log = logging.getLogger("specdec.cache")

_RECENT_SIZE = 1024
_EPOCH_READ_BYTES = 1024  # the epoch token shares the MGET with the drafts (namespace.py)


class DraftStore:
    """Continuations of earlier sequences, shared by every process on the same server."""

    def __init__(
        self,
        store: CacheStore,
        namespace: Namespace,
        *,
        vocab: str,
        contexts: Sequence[int] = (32, 8, 3),
        continuation: int = 32,
        ttl_s: float = 86400.0,
        max_positions: int = 2048,
        max_value_bytes: int = 1 << 20,
        vocab_size: int | None = None,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.vocab = vocab
        self.contexts = tuple(sorted(set(int(n) for n in contexts), reverse=True))
        if not self.contexts or self.contexts[-1] < 1:
            raise ValueError(f"contexts={contexts!r} must be positive context lengths")
        self.continuation = int(continuation)
        if self.continuation < 1:
            raise ValueError(f"continuation={continuation!r} must be a positive number of tokens")
        self.ttl_s = ttl_s
        self.max_positions = max_positions
        self.max_value_bytes = max_value_bytes
        self.vocab_size = vocab_size
        # No draft this store writes is longer: a longer value is junk, never decoded.
        self.max_read_bytes = min(max_value_bytes, HEADER.size + 4 * self.continuation)
        self._prefixes: dict[tuple[int, int], bytes] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()  # sequence digest -> time added
        self._recent_lock = threading.Lock()
        self.lookups = 0  # round trips made by lookup_many (drafters report it)
        self.decoded_bytes = 0  # bytes of values decoded by lookups (the poison bound above)
        self.decoded_tokens = 0  # tokens those values held

    # -- keys --

    def _prefix(self, epoch: str, n: int) -> bytes:
        prefix = self._prefixes.get((epoch, n))
        if prefix is None:
            meta = {
                "schema": SCHEMA_VERSION,
                "kind": "draft",
                "namespace": self.namespace.name,
                "epoch": epoch,
                "vocab": self.vocab,
                "n": n,
            }
            prefix = self._prefixes[(epoch, n)] = canonical_json(meta) + b"\n"
        return prefix

    def context_key(self, context: Sequence[int], epoch: str) -> str:
        """Redis key of a context (a token sequence) under a namespace epoch."""
        return self._key_from_bytes(pack_tokens(context), epoch)

    def _key_from_bytes(self, context_bytes: bytes, epoch: str) -> str:
        h = hashlib.sha256(self._prefix(epoch, len(context_bytes) // 4) + context_bytes).hexdigest()
        return draft_key(self.namespace.name, h[:40])

    # -- reads --

    def lookup_many(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """For each sequence, the stored continuation of its longest matching suffix ([] if none).

        One round trip for all sequences when the namespace epoch is known; never raises.
        At most `continuation` tokens per sequence; the work is bounded as the module says.
        """
        try:
            return self._lookup_many(sequences)
        except Exception:  # a bug here must cost the drafts, never the generation
            self.store.count("errors")
            log.warning("draft store lookup failed; drafting without it", exc_info=True)
            return [[] for _ in sequences]

    def _lookup_many(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        plan: list[list[tuple[int, int]]] = []  # per sequence: (context length, index into keys)
        for seq in sequences:
            plan.append([(n, 0) for n in self.contexts if len(seq) >= n])

        def keys_for(epochs: list[str]) -> list[str]:
            keys: list[str] = []
            for seq, entries in zip(sequences, plan):
                for j, (n, _) in enumerate(entries):
                    entries[j] = (n, len(keys))
                    keys.append(self.context_key(seq[len(seq) - n :], epochs[0]))
            return keys

        if not any(plan):
            return [[] for _ in sequences]
        self.lookups += 1
        # Values longer than a draft (or the epoch token beside them) are refused unread.
        with self.store.backend.value_cap(max(self.max_read_bytes, _EPOCH_READ_BYTES)):
            result = self.namespace.read((), keys_for)
        if result is None:
            return [[] for _ in sequences]
        keys, raws = result
        out: list[list[int]] = []
        hits = 0
        for entries in plan:
            found: list[int] = []
            for _, idx in entries:  # longest context first
                raw = raws[idx]
                if raw is None:
                    continue
                if len(raw) > self.max_read_bytes:  # longer than any draft: not worth decoding
                    self.store.count("corrupt")
                    continue
                self.decoded_bytes += len(raw)
                try:
                    tokens = decode_value(raw, keys[idx], kind=KIND_DRAFT, max_bytes=self.max_read_bytes).tokens
                except CorruptValue:
                    self.store.count("corrupt")
                    continue
                self.decoded_tokens += len(tokens)
                tokens = self._valid_prefix(tokens)
                if tokens:
                    found = tokens
                    break
            hits += bool(found)
            out.append(found)
        self.store.count_shared(self.namespace.name, "draft_hits", hits)
        self.store.count_shared(self.namespace.name, "draft_misses", len(out) - hits)
        return out

    def lookup(self, sequence: Sequence[int]) -> list[int]:
        """The continuation of the longest matching suffix of one sequence ([] if none)."""
        return self.lookup_many([sequence])[0]

    def _valid_prefix(self, tokens: list[int]) -> list[int]:
        # A poisoned entry may hold ids the model cannot embed: keep only the valid prefix.
        limit = self.vocab_size
        for i, t in enumerate(tokens):
            if t < 0 or (limit is not None and t >= limit):
                return tokens[:i]
        return tokens

    # -- writes --

    def writes_for(self, sequence: Sequence[int], epoch: str) -> list[Write]:
        """The (key, value, ttl) writes that index `sequence` under `epoch`."""
        packed = pack_tokens(sequence)  # int32 bytes: contexts and continuations are slices of it
        n_tokens = len(packed) // 4
        start = max(self.contexts[-1], n_tokens - self.max_positions)
        writes: list[Write] = []
        seen: set[str] = set()
        ttl = self.ttl_s or None
        for i in range(start, n_tokens):
            cont = packed[4 * i : 4 * min(n_tokens, i + self.continuation)]
            for n in self.contexts:
                if n > i:
                    continue
                key = self._key_from_bytes(packed[4 * (i - n) : 4 * i], epoch)
                # A context that recurs (a loop, a repeated line) keeps its first occurrence:
                # the earliest has the longest continuation before the sequence ends.
                if key in seen:
                    continue
                seen.add(key)
                try:
                    value = encode_token_bytes(KIND_DRAFT, cont, key, max_bytes=self.max_value_bytes)
                except ValueTooLarge:
                    self.store.count("oversize")
                    continue
                writes.append((key, value, ttl))
        return writes

    def _claim(self, digest: str) -> bool:
        # Re-indexing an identical sequence (a repeated prompt) only rewrites the same
        # entries: skip it while the earlier write is still well within its TTL.
        now = time.monotonic()
        horizon = (self.ttl_s or 3600.0) / 2
        with self._recent_lock:
            seen = self._recent.get(digest)
            if seen is not None and now - seen < horizon:
                return False
            self._recent[digest] = now
            self._recent.move_to_end(digest)
            while len(self._recent) > _RECENT_SIZE:
                self._recent.popitem(last=False)
        return True

    def _unclaim(self, digest: str) -> None:
        with self._recent_lock:
            self._recent.pop(digest, None)

    def add(self, sequence: Sequence[int]) -> bool:
        """Index a finished sequence (write-behind); False if nothing was queued."""
        tokens = list(sequence)
        if len(tokens) <= self.contexts[-1]:
            return False
        # The epoch is part of the digest: after an invalidation the same sequence is indexed again.
        epoch = repr(self.namespace.cached_epochs()).encode()
        seq_digest = hashlib.sha256(epoch + pack_tokens(tokens)).hexdigest()
        if not self._claim(seq_digest):
            return False

        def job() -> None:
            epochs = self.namespace.cached_epochs() or self.namespace.ensure_epochs()
            if epochs is None:
                self._unclaim(seq_digest)
                return
            writes = self.writes_for(tokens, epochs[0])
            # Pipelines of a few hundred commands keep each socket read well inside the deadline.
            for k in range(0, len(writes), 512):
                if self.store.call("set_many", writes[k : k + 512], default=False) is False:
                    self._unclaim(seq_digest)  # let a later repeat try again
                    return
            self.store.count_shared(self.namespace.name, "draft_sequences", 1)

        if not self.store.submit(job):
            self._unclaim(seq_digest)
            return False
        return True

    def put(self, context: Sequence[int], continuation: Sequence[int]) -> None:
        """Store one continuation for one context now (admin: errors propagate)."""
        if len(continuation) > self.continuation:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens; this store reads at most "
                f"{self.continuation} (its `continuation`): pass fewer tokens or open it with a larger continuation"
            )
        epochs = self.namespace.cached_epochs() or self.namespace.ensure_epochs()
        if epochs is None:
            raise ConnectionError(f"cache server {self.store.config.describe()} did not answer")
        key = self.context_key(context, epochs[0])
        value = encode_value(KIND_DRAFT, list(continuation), key, max_bytes=self.max_value_bytes)
        self.store.admin("set_many", [(key, value, self.ttl_s or None)])
