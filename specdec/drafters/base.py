"""The drafter interface: propose up to K tokens per row, then hear what was kept."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..engine import DecodeState
    from ..generator import SpeculativeGenerator


@dataclass
class DraftProposal:
    tokens: torch.Tensor  # [B, K] int64, -1 in slots past a row's num_draft
    num_draft: torch.Tensor  # [B] int64, drafts proposed per row (0..K)
    probs: torch.Tensor | None = None  # [B, K, V] processed draft probs q; None = one-hot drafter


class Drafter(ABC):
    """One drafter per request. The engine calls, in order:

    start(state) once after the prompts are known; then per step propose(state, k),
    the target verifies, and observe(state, num_accepted, emitted) with the outcome
    (state.sequences already include the emitted tokens); select_rows(keep) whenever
    finished rows leave the batch; finish(state) once at the end.
    """

    name: ClassVar[str]
    # True if propose() returns draft probabilities (a model); False for one-hot drafters.
    provides_probs: ClassVar[bool] = False
    # True if it runs the generator's draft model (needs one loaded; its weights shape the output
    # of seeded sampling, so they belong in response-cache keys).
    uses_draft_model: ClassVar[bool] = False
    # True if its drafts depend on state shared across requests (the Redis draft store), so
    # seeded sampled output is not a function of the request alone and is never cached.
    reads_shared_state: ClassVar[bool] = False

    def __init__(self, generator: "SpeculativeGenerator", cache_layer=None) -> None:
        # Raise ValueError here when the drafter cannot serve this request (checked before compute).
        self.generator = generator
        self.cache_layer = cache_layer  # the request's specdec.caching.CacheLayer, or None

    def start(self, state: "DecodeState") -> None:
        """Index or prefill the prompts (state.sequences holds them)."""

    @abstractmethod
    def propose(self, state: "DecodeState", k: int) -> DraftProposal:
        """Up to k draft tokens for every active row."""

    def observe(
        self,
        state: "DecodeState",
        num_accepted: torch.Tensor,  # [B] drafts accepted per row
        emitted: torch.Tensor,  # [B, K+1] tokens emitted this step, -1 padded
    ) -> None:
        """Hook after verification: roll back internal state past the kept tokens.

        The same outcome is on the host in state.step_accepted / state.step_emitted;
        use those rather than copying these tensors to the host again.
        """

    def select_rows(self, keep: torch.Tensor) -> None:  # [B'] int64 indices of rows that stay
        """Drop finished rows from any per-row state."""

    def finish(self, state: "DecodeState") -> None:
        """Release per-request resources."""


def empty_proposal(batch: int, device: torch.device | str = "cpu") -> DraftProposal:
    """A proposal with no drafts for any row."""
    return DraftProposal(
        tokens=torch.empty(batch, 0, dtype=torch.int64, device=device),
        num_draft=torch.zeros(batch, dtype=torch.int64, device=device),
    )


def pack_proposals(rows: list[list[int]], k: int, device: torch.device | str = "cpu") -> DraftProposal:
    """Pack per-row token lists (each at most k long) into a one-hot DraftProposal."""
    width = max((len(r) for r in rows), default=0)
    tokens = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            tokens[i, : len(row)] = torch.tensor(row[:k], dtype=torch.int64)
    num_draft = torch.tensor([min(len(r), k) for r in rows], dtype=torch.int64)
    return DraftProposal(tokens=tokens.to(device), num_draft=num_draft.to(device))
