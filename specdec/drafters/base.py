"""The drafter interface and the per-request state drafters read.

A drafter proposes up to K tokens per row, then hears what the target kept. The state
it reads (`DecodeState`) lives here, next to the interface, so that drafters, the loop
and the generator import it without going through each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from .. import noise

if TYPE_CHECKING:
    from ..generator import SpeculativeGenerator
    from ..kv import KVState
    from ..params import GenerationParams


@dataclass
class DraftProposal:
    tokens: torch.Tensor  # [B, K] int64, -1 in slots past a row's num_draft
    num_draft: torch.Tensor  # [B] int64, drafts proposed per row (0..K)
    probs: torch.Tensor | None = None  # [B, K, V] processed draft probs q; None = one-hot drafter
    confidence: torch.Tensor | None = None  # [B, K] the draft's probability of each of its tokens
    host_num_draft: list[int] | None = None  # [B] num_draft on the host, when the drafter built it there
    sources: list[str] | None = None  # [B] which drafter drafted each row (drafter "auto")
    draft_forwards: int = 0  # forwards of a draft model this proposal cost
    # The draft model also fed its prompt or a long pending window this step: the step's
    # drafting time is not what drafting K tokens costs (the adaptive policy skips it).
    catch_up: bool = False

    def truncate(self, k: int) -> "DraftProposal":
        """The first k drafts of every row (a lookup drafter's offer cut to the chosen length)."""
        if k >= self.tokens.shape[1]:
            return self
        return DraftProposal(
            tokens=self.tokens[:, :k],
            num_draft=self.num_draft.clamp(max=k),
            probs=None if self.probs is None else self.probs[:, :k],
            confidence=None if self.confidence is None else self.confidence[:, :k],
            host_num_draft=None if self.host_num_draft is None else [min(n, k) for n in self.host_num_draft],
            sources=self.sources,
            draft_forwards=self.draft_forwards,
            catch_up=self.catch_up,
        )


@dataclass
class DecodeState:
    """What drafters may read about the request being decoded (rows = active rows).

    The last step's outcome is there twice: on the device (step_tokens,
    step_num_accepted) for drafters that keep device state, and on the host
    (step_emitted, step_accepted) from the step's one device-to-host copy, so no drafter
    needs a transfer of its own.
    """

    sequences: list[list[int]]  # [B][n_b] prompt + emitted tokens, host
    params: "GenerationParams"
    device: torch.device
    noise_dtype: torch.dtype  # dtype of accept-test uniforms and race noise
    seeds: torch.Tensor  # [B] int64 noise seed per row (random when unseeded)
    seq_lens: torch.Tensor  # [B] int64 len(sequences[b]) on the device: the noise counter
    new_kv: Callable[[torch.nn.Module, int | None], "KVState"]  # KV state for a draft model, same path
    cache_layer: Any = None
    rows: list[int] = field(default_factory=list)  # original batch index of each active row
    step_tokens: torch.Tensor | None = None  # [B, K+1] emitted this step, -1 padded (device)
    step_num_accepted: torch.Tensor | None = None  # [B] drafts accepted this step (device)
    step_accepted: list[int] = field(default_factory=list)  # [B] drafts accepted per row (host)
    step_emitted: list[list[int]] = field(default_factory=list)  # [B][<= K+1] tokens emitted (host)
    target_hidden: torch.Tensor | None = None  # [B, K+1, H] last target layer, if a drafter asks
    early_stop: Any = None  # specdec.adaptive.EarlyStop for this step's draft, when K is adaptive
    draft_policy: Any = None  # specdec.adaptive.AdaptiveDraftPolicy, for drafters that choose K themselves
    step_drafted: list[int] = field(default_factory=list)  # [B] drafts verified per row last step (host)

    @property
    def batch_size(self) -> int:
        return len(self.sequences)

    def uniform(self, stream: int, width: int) -> torch.Tensor:  # [B, width]
        """Counter-based U[0, 1) noise of every row for this step (see specdec.noise)."""
        return noise.uniform(self.seeds, self.seq_lens, stream, width, self.noise_dtype)

    def exponential(self, stream: int, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:  # [B, width]
        """Counter-based Exp(1) noise of every row for this step (see specdec.noise)."""
        return noise.exponential(self.seeds, self.seq_lens, stream, width, dtype or self.noise_dtype)


class Drafter(ABC):
    """One drafter per request. The engine calls, in order:

    start(state) once after the prompts are known; then per step propose(state, k),
    the target verifies, and observe(state) with the outcome in the state
    (state.sequences already include the emitted tokens); select_rows(keep) whenever
    finished rows leave the batch; finish(state) once at the end.
    """

    name: ClassVar[str]  # set by register_drafter; a class never registered goes by its own name

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__
    # True if propose() returns draft probabilities (a model); False for one-hot drafters.
    provides_probs: ClassVar[bool] = False
    # True if it runs the generator's draft model (needs one loaded; its weights shape the output
    # of seeded sampling, so they belong in response-cache keys).
    uses_draft_model: ClassVar[bool] = False
    # True if its drafts depend on state shared across requests (the Redis draft store), so
    # seeded sampled output is not a function of the request alone and is never cached.
    reads_shared_state: ClassVar[bool] = False
    # True if it chooses each step's draft length itself (from state.draft_policy when K is
    # adaptive; k is then only a cap).
    chooses_length: ClassVar[bool] = False
    # False if it never proposes anything (drafter "none"): the loop skips the K policy.
    drafts: ClassVar[bool] = True
    # True if it reads the target's last hidden states (state.target_hidden); the target
    # forward returns them only when asked, so other drafters pay nothing.
    wants_hidden_states: ClassVar[bool] = False

    def __init__(self, generator: "SpeculativeGenerator", cache_layer=None) -> None:
        # Raise ValueError here when the drafter cannot serve this request (checked before compute).
        self.generator = generator
        self.cache_layer = cache_layer  # the request's specdec.caching.CacheLayer, or None

    def start(self, state: DecodeState) -> None:
        """Index or prefill the prompts (state.sequences holds them)."""

    @abstractmethod
    def propose(self, state: DecodeState, k: int) -> DraftProposal:
        """Up to k draft tokens for every active row (k >= 1)."""

    def offers(self, state: DecodeState, k: int) -> list[list[int]] | None:
        """A one-hot drafter's proposals as host lists (at most k tokens per row), or None for
        a drafter that proposes on the device. The adaptive K policy reads them before
        anything is packed into tensors, so a step that drafts nothing builds none."""
        return None

    def observe(self, state: DecodeState) -> None:
        """Hook after verification: roll back internal state past the kept tokens."""

    def select_rows(self, keep: list[int]) -> None:
        """Drop finished rows from any per-row state (keep: indices of the rows that stay)."""

    def finish(self, state: DecodeState) -> None:
        """Release per-request resources."""


def empty_proposal(batch: int, device: torch.device | str = "cpu") -> DraftProposal:
    """A proposal with no drafts for any row."""
    return DraftProposal(
        tokens=torch.empty(batch, 0, dtype=torch.int64, device=device),
        num_draft=torch.zeros(batch, dtype=torch.int64, device=device),
    )


def pack_proposals(rows: list[list[int]], k: int, device: torch.device | str = "cpu") -> DraftProposal:
    """Pack per-row token lists (each at most k long) into a one-hot DraftProposal."""
    width = max((min(len(r), k) for r in rows), default=0)
    tokens = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            tokens[i, : len(row)] = torch.tensor(row[:k], dtype=torch.int64)
    counts = [min(len(r), k) for r in rows]
    num_draft = torch.tensor(counts, dtype=torch.int64)
    return DraftProposal(tokens=tokens.to(device), num_draft=num_draft.to(device), host_num_draft=counts)
