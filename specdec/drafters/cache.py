"""Drafter "cache": earlier outputs from the shared draft-token store become drafts.

Each row keeps a local buffer: a continuation fetched from the store and the sequence
length it starts at. While the row's new tokens keep matching the buffer, drafts come
from it with no round trip; when the buffer is used up or the row diverges (the target
rejected a draft, or sampling went elsewhere), the row asks the store again. All rows
that need a lookup share one round trip per step, and a row that keeps missing backs
off for a few tokens. Drafts are one-hot: the target verifies them, so an entry that is
stale, from another model, or poisoned only costs acceptance, never output.
"""

from __future__ import annotations

from . import register_drafter
from .base import DraftProposal, Drafter, pack_proposals

_MAX_BACKOFF = 4  # tokens a row waits, at most, after consecutive misses


@register_drafter("cache")
class CacheDrafter(Drafter):
    """Drafts from specdec.cache.DraftStore (continuation of the longest matching context)."""

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
        self.round_trips = 0  # lookups made for this request (one per step at most)

    def start(self, state) -> None:
        n = state.batch_size
        self.buffers: list[tuple[int, list[int]]] = [(0, [])] * n  # (sequence length at tokens[0], tokens)
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

    def propose(self, state, k: int) -> DraftProposal:
        seqs = state.sequences
        need = [
            b for b, seq in enumerate(seqs) if not self._remaining(b, seq) and len(seq) >= self.retry_at[b]
        ]
        if need:
            self.round_trips += 1
            found = self.store.lookup_many([seqs[b] for b in need])  # one round trip for all rows
            for b, tokens in zip(need, found):
                n = len(seqs[b])
                self.buffers[b] = (n, tokens)
                if tokens:
                    self.misses[b] = 0
                else:
                    self.misses[b] += 1
                    self.retry_at[b] = n + min(2 ** (self.misses[b] - 1), _MAX_BACKOFF)
        rows = [self._remaining(b, seq)[:k] for b, seq in enumerate(seqs)]
        return pack_proposals(rows, k, state.device)

    def select_rows(self, keep) -> None:
        idx = keep.tolist()
        self.buffers = [self.buffers[i] for i in idx]
        self.misses = [self.misses[i] for i in idx]
        self.retry_at = [self.retry_at[i] for i in idx]
