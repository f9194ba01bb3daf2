"""Drafter "cache": earlier outputs from the shared draft-token store become drafts.

Each row keeps a local buffer: a continuation fetched from the store and the sequence
length it starts at. While the row's new tokens keep matching the buffer, drafts come
from it with no round trip. When fewer than K buffered tokens are left, the row asks
the store for what follows the buffer's end (the predicted sequence), so a long run of
accepted drafts keeps full K-token steps; when the row diverges (a draft rejected, or
sampling went elsewhere) it asks afresh. All rows that need the store share one round
trip per step, and a row that keeps missing backs off for a few tokens.

How many of a row's buffered tokens are verified is the planner's choice (specdec.planning):
under K "auto" a stale entry, or sampling that rarely agrees with the earlier output, is
cut short or parked like any other source. Drafts are one-hot: the target verifies them,
so an entry that is stale, from another model, or poisoned only costs acceptance, never
output.
"""

from __future__ import annotations

from . import register_drafter
from .base import DraftProposal, Drafter, pack_proposals

_MAX_BACKOFF = 4  # tokens a row waits, at most, after consecutive misses


@register_drafter("cache")
class CacheDrafter(Drafter):
    """Drafts from specdec.cache.DraftStore (continuation of the longest matching context)."""

    needs = frozenset({"store"})

    def __init__(self, context) -> None:
        super().__init__(context)
        if context.store is None:
            raise ValueError(
                'drafter="cache" needs a cache with its draft store: pass cache="redis://host:6379/0" (or '
                '"memory://") to generate() or SpeculativeGenerator.from_pretrained(), without draft_store=false, '
                "or choose another drafter"
            )
        self.store = context.store

    def start(self, state) -> None:
        """Reset the per-row buffers and counters for a new request."""
        n = state.batch_size
        self.buffers: list[tuple[int, list[int]]] = [(0, [])] * n  # (sequence length at tokens[0], tokens)
        self.topped_at = [-1] * n  # buffer end for which a top-up found nothing
        self.misses = [0] * n  # consecutive empty lookups per row
        self.retry_at = [0] * n  # sequence length before which a missing row does not ask again

    def _remaining(self, b: int, seq: list[int]) -> list[int]:
        """What the buffer predicts after `seq`, or [] if it is used up or contradicted."""
        anchor, tokens = self.buffers[b]
        offset = len(seq) - anchor
        if offset < 0 or offset >= len(tokens):
            return []
        if offset and seq[anchor:] != tokens[:offset]:
            return []
        return tokens[offset:]

    def propose(self, state, k: int, early_stop=None) -> DraftProposal:
        """Up to k buffered tokens per row; rows whose buffer ran out or diverged ask the store."""
        seqs = state.sequences
        fresh, topup, queries = [], [], []
        for b, seq in enumerate(seqs):
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
        return pack_proposals([self._remaining(b, seq)[:k] for b, seq in enumerate(seqs)], k, state.device)

    def select_rows(self, keep: list[int]) -> None:
        """Drop finished rows from the per-row state."""
        for name in _ROW_STATE:
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])

    def merge(self, other, state, other_state) -> None:
        for name in _ROW_STATE:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_ROW_STATE = ("buffers", "topped_at", "misses", "retry_at")  # per-row lists of CacheDrafter
