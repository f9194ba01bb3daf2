"""Drafter "none": no drafts, so the loop is plain autoregressive decoding (the baseline)."""

from __future__ import annotations

from . import register_drafter
from .base import DraftProposal, Drafter, empty_proposal


@register_drafter("none")
class NoDrafter(Drafter):
    """Proposes nothing; every step is one target forward emitting one token."""

    drafts = False

    def propose(self, state, k: int) -> DraftProposal:
        return empty_proposal(state.batch_size, state.device)
