"""Drafter "cache": earlier outputs from the shared draft-token store become drafts.

Each row keeps a local buffer: a continuation fetched from the store and the sequence
length it starts at. While the row's new tokens keep matching the buffer, drafts come
from it with no round trip. When fewer than K buffered tokens are left, the row asks
the store for what follows the buffer's end (the predicted sequence), so a long run of
accepted drafts keeps full K-token steps; when the row diverges (a draft rejected, or
sampling went elsewhere) it asks afresh. All rows that need the store share one round
trip per step, and a row that keeps missing backs off for a few tokens.

Draft length adapts per row: it doubles (up to K) after a step that accepted every
draft and drops to accepted + 1 after one that did not; a step that accepted nothing
also pauses the row's drafting (and lookups) for 1, 2, 4, ... up to 16 tokens, reset by
the next acceptance. So a stale entry, or sampling that rarely agrees with the earlier
output, costs a few short verify forwards instead of a K-token one every step. Drafts are one-hot: the target verifies them, so an entry that is
stale, from another model, or poisoned only costs acceptance, never output.
"""

from __future__ import annotations

from ..params import MAX_DRAFT_TOKENS
from . import register_drafter
from .base import DraftProposal, Drafter, pack_proposals

_MAX_BACKOFF = 4  # tokens a row waits, at most, after consecutive misses
_MAX_PAUSE = 16  # tokens a row drafts nothing, at most, after consecutive fully rejected steps


@register_drafter("cache")
class CacheDrafter(Drafter):
    """Drafts from specdec.cache.DraftStore (continuation of the longest matching context)."""

    reads_shared_state = True

    def __init__(self, generator, cache_layer=None) -> None:
        super().__init__(generator, cache_layer)
        if cache_layer is None:
            raise ValueError(
                'drafter="cache" needs a cache: pass cache="redis://host:6379/0" (or "memory://") to '
                "generate() or SpeculativeGenerator.from_pretrained(), or choose another drafter"
            )
        if not cache_layer.config.draft_store:
            raise ValueError(
                'drafter="cache" needs the draft store, but this cache has draft_store=false; '
                "remove that option or choose another drafter"
            )
        self.store = cache_layer.draft_store

    def start(self, state) -> None:
        """Reset the per-row buffers and counters for a new request."""
        n = state.batch_size
        self.buffers: list[tuple[int, list[int]]] = [(0, [])] * n  # (sequence length at tokens[0], tokens)
        self.topped_at = [-1] * n  # buffer end for which a top-up found nothing
        self.misses = [0] * n  # consecutive empty lookups per row
        self.retry_at = [0] * n  # sequence length before which a missing row does not ask again
        self.limit: list[int] | None = None  # per-row draft length, set on the first propose
        self.rejections = [0] * n  # consecutive steps whose drafts were all rejected
        self.paused_until = [0] * n  # sequence length before which the row drafts nothing

    def _remaining(self, b: int, seq: list[int]) -> list[int]:
        """What the buffer predicts after `seq`, or [] if it is used up or contradicted."""
        anchor, tokens = self.buffers[b]
        offset = len(seq) - anchor
        if offset < 0 or offset >= len(tokens):
            return []
        if offset and seq[anchor:] != tokens[:offset]:
            return []
        return tokens[offset:]

    def propose(self, state, k: int) -> DraftProposal:
        return pack_proposals(self.offers(state, k), k, state.device)

    def offers(self, state, k: int) -> list[list[int]]:
        """Up to k buffered tokens per row; rows whose buffer ran out or diverged ask the store."""
        seqs = state.sequences
        if self.limit is None:
            self.limit = [k] * len(seqs)
        fresh, topup, queries = [], [], []
        for b, seq in enumerate(seqs):
            if len(seq) < self.paused_until[b]:
                continue
            rem = self._remaining(b, seq)
            if rem:
                end = len(seq) + len(rem)
                if len(rem) < k and self.topped_at[b] != end:
                    topup.append((b, rem))
                    queries.append(seq + rem)
            elif len(seq) >= self.retry_at[b]:
                fresh.append(b)
                queries.append(seq)
        if queries:
            found = self.store.lookup_many(queries)  # one round trip for all rows
            for b, tokens in zip(fresh, found):
                n = len(seqs[b])
                self.buffers[b] = (n, tokens)
                if tokens:
                    self.misses[b] = 0
                else:
                    self.misses[b] += 1
                    self.retry_at[b] = n + min(2 ** (self.misses[b] - 1), _MAX_BACKOFF)
            for (b, rem), tokens in zip(topup, found[len(fresh):]):
                n = len(seqs[b])
                if tokens:
                    self.buffers[b] = (n, rem + tokens)
                else:
                    self.topped_at[b] = n + len(rem)
        rows = []
        for b, seq in enumerate(seqs):
            paused = len(seq) < self.paused_until[b]
            rows.append([] if paused else self._remaining(b, seq)[: min(k, self.limit[b])])
        return rows

    def observe(self, state) -> None:
        """Adapt each row's draft length to how much of what it verified was kept (the step's
        drafted counts: the loop may have cut a proposal shorter than it was offered)."""
        if self.limit is None:
            return
        for b, (proposed, accepted) in enumerate(zip(state.step_drafted, state.step_accepted)):
            if not proposed:
                continue
            if accepted >= proposed:
                self.limit[b] = min(2 * self.limit[b], MAX_DRAFT_TOKENS)
            else:
                self.limit[b] = accepted + 1
            if accepted == 0:
                self.rejections[b] += 1
                pause = min(2 ** (self.rejections[b] - 1), _MAX_PAUSE)
                self.paused_until[b] = len(state.sequences[b]) + pause
            else:
                self.rejections[b] = 0

    def select_rows(self, keep: list[int]) -> None:
        """Drop finished rows from the per-row state."""
        idx = keep
        for name in ("buffers", "topped_at", "misses", "retry_at", "rejections", "paused_until"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in idx])
        if self.limit is not None:
            self.limit = [self.limit[i] for i in idx]
