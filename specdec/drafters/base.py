"""The drafter interface, the context a drafter is built from, and the per-request state it reads.

A drafter only drafts: it proposes up to k tokens per row when the planner
(specdec.planning) asks, and hears what the target kept. Which rows draft, from which
source and how many tokens is the planner's decision, never the drafter's. A drafter
sees a narrow, typed `DraftContext` (its model, the vocabulary, its cost ratio, the
shared draft store) and the request's `DecodeState`, never the generator.

Adding a drafter is one module with a `Drafter` subclass under `@register_drafter(name)`
(see specdec.drafters for how modules outside this package are found).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from .. import noise

if TYPE_CHECKING:
    from ..cache.draft_store import DraftStore
    from ..eagle import EagleHead
    from ..kv import KVState
    from ..params import GenerationParams
    from ..planning.early_stop import EarlyStop


@dataclass(frozen=True)
class DraftContext:
    """Everything a drafter may use besides the request's DecodeState."""

    device: torch.device
    vocab_size: int  # the target's vocabulary
    model: torch.nn.Module | None = None  # the draft model, when one is loaded
    model_vocab_size: int | None = None  # its vocabulary (a prefix of the target's)
    # One forward of `model` over one target forward, from the models' sizes (the cost
    # proxy seeded sampling plans with; unseeded requests measure the real one).
    cost_ratio: float = 0.0
    store: "DraftStore | None" = None  # the shared draft-token store, when the cache has one
    head: "EagleHead | None" = None  # an EAGLE-3 head reading the target's hidden states (specdec.eagle)
    head_cost_ratio: float = 0.0  # one head forward over one target forward (the same proxy as cost_ratio)


@dataclass
class DraftProposal:
    tokens: torch.Tensor  # [B, K] int64, -1 in slots past a row's num_draft
    num_draft: torch.Tensor  # [B] int64, drafts proposed per row (0..K)
    probs: torch.Tensor | None = None  # [B, K, V] processed draft probs q; None = one-hot drafter
    confidence: torch.Tensor | None = None  # [B, K] the draft's probability of each of its tokens
    host_rows: list[list[int]] | None = None  # [B][num_draft] the drafts on the host, when built there
    sources: list[str] | None = None  # [B] which drafter drafted each row (set by the planner)
    draft_forwards: int = 0  # forwards of a draft model this proposal cost
    # The draft model also fed its prompt or a long pending window this step: the step's
    # drafting time is not what drafting K tokens costs (the planner does not time it).
    catch_up: bool = False

    @property
    def host_num_draft(self) -> list[int] | None:
        """[B] num_draft on the host, when the drafter built the proposal there."""
        return None if self.host_rows is None else [len(r) for r in self.host_rows]


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
    rows: list[int] = field(default_factory=list)  # original batch index of each active row
    step_tokens: torch.Tensor | None = None  # [B, K+1] emitted this step, -1 padded (device)
    step_num_accepted: torch.Tensor | None = None  # [B] drafts accepted this step (device)
    step_accepted: list[int] = field(default_factory=list)  # [B] drafts accepted per row (host)
    step_emitted: list[list[int]] = field(default_factory=list)  # [B][<= K+1] tokens emitted (host)
    # [B, K+1, H] the target's hidden states over the step's inputs [last, d_1..d_k], if a drafter
    # asks (the last layer's, or the layers its hidden_layers names, concatenated); in start(),
    # those of every prompt position, [B, P, H] right-padded
    target_hidden: torch.Tensor | None = None
    step_drafted: list[int] = field(default_factory=list)  # [B] drafts verified per row last step (host)
    step_sources: list[str] = field(default_factory=list)  # [B] the drafter each row verified last step
    compiled: bool = False  # the request runs on the compiled path (compile=True; specdec.compiled)
    compiler: Any = None  # its specdec.compiled.StepCompiler then (drafters compile their own steps with it)
    # [B] each row's (temperature, top_k, top_p) where rows differ (a server's batch); None: params' for all
    row_sampling: list[tuple[float, int, float]] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.sequences)

    def sampling_groups(self) -> list[tuple["GenerationParams", list[int]]] | None:
        """Rows grouped by their sampling settings, as (params with those settings, row indices);
        None when every row samples as `params` says (one group: the plain path)."""
        rows = self.row_sampling
        if rows is None or len(set(rows)) == 1 and rows[0] == _settings(self.params):
            return None
        groups: dict[tuple[float, int, float], list[int]] = {}
        for b, settings in enumerate(rows):
            groups.setdefault(settings, []).append(b)
        return [(replace(self.params, temperature=t, top_k=k, top_p=p), idx) for (t, k, p), idx in groups.items()]

    def subset(self, rows: list[int], params: "GenerationParams") -> "DecodeState":
        """These rows alone, sampling as `params` says (for a group of sampling_groups())."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return replace(
            self, sequences=[self.sequences[b] for b in rows], params=params, seeds=self.seeds.index_select(0, index),
            seq_lens=self.seq_lens.index_select(0, index), rows=[self.rows[b] for b in rows], row_sampling=None,
        )

    def uniform(self, stream: int, width: int) -> torch.Tensor:  # [B, width]
        """Counter-based U[0, 1) noise of every row for this step (see specdec.noise)."""
        return noise.uniform(self.seeds, self.seq_lens, stream, width, self.noise_dtype)

    def exponential(self, stream: int, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:  # [B, width]
        """Counter-based Exp(1) noise of every row for this step (see specdec.noise)."""
        return noise.exponential(self.seeds, self.seq_lens, stream, width, dtype or self.noise_dtype)


class Drafter(ABC):
    """One drafter per request and source. The planner calls, in order:

    start(state) once after the prompts are known; then per step propose(state, k) when
    it wants this source's drafts, the target verifies, and observe(state) with the
    outcome in the state (state.sequences already include the emitted tokens, and
    state.step_sources says which source each row verified); select_rows(keep) whenever
    finished rows leave the batch; merge(other, ...) when another batch's rows join between
    steps (optional); finish(state) once at the end.

    What a drafter declares, and nothing else, shapes how it is used:
      gives_probs          propose() returns draft probabilities q (a model), else its
                           drafts are one-hot;
      reads_hidden_states  it reads state.target_hidden (the target returns them only then):
                           the last layer's, or, where the drafter's hidden_layers names target
                           layers, the hidden states entering them, concatenated;
      needs                what it reads from its DraftContext: "model" (the draft model:
                           its weights shape seeded samples, so they enter cache keys), "head"
                           (the EAGLE-3 head: the same) and
                           "store" (the shared draft store: its drafts depend on other
                           requests, so seeded samples are never cached).
    A drafter that needs no model drafts for free (cost ratio 0): the planner asks it for
    everything it has and cuts each row to the length it chooses.
    """

    name: ClassVar[str]  # set by register_drafter; a class never registered goes by its own name
    gives_probs: ClassVar[bool] = False
    reads_hidden_states: ClassVar[bool] = False
    hidden_layers: tuple[int, ...] | None = None  # the target layers read (None: the last layer's output)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __init__(self, context: DraftContext) -> None:
        # Raise ValueError here when the drafter cannot serve this request (checked before compute).
        self.context = context
        # Draft forwards per draft token, in target forwards: the planner's prior cost of drafting.
        self.cost_ratio = context.cost_ratio if "model" in self.needs else 0.0

    @property
    def free(self) -> bool:
        """Drafting costs no forward: the planner may ask for every row's whole offer."""
        return self.cost_ratio == 0.0

    def start(self, state: DecodeState) -> None:
        """Index or prefill the prompts (state.sequences holds them)."""

    @abstractmethod
    def propose(self, state: DecodeState, k: int, early_stop: "EarlyStop | None" = None) -> DraftProposal:
        """Up to k draft tokens for every active row (k >= 1). early_stop (drafters that give
        probabilities): the planner's per-row rule for stopping a row's drafting early."""

    def observe(self, state: DecodeState) -> None:
        """After verification: roll internal state back past the kept tokens."""

    def select_rows(self, keep: list[int]) -> None:
        """Drop finished rows from any per-row state (keep: indices of the rows that stay)."""

    def merge(self, other: "Drafter", state: DecodeState, other_state: DecodeState) -> None:
        """Append the rows of `other` (the same drafter, started on another batch; `other_state`
        is its batch's state) after this drafter's own, between two steps: requests joining a
        running batch (specdec.serving). A drafter with per-row state implements this; the
        default refuses, and such a drafter's requests run as batches of their own."""
        raise NotImplementedError(f"drafter {self.name!r} cannot merge batches")

    @classmethod
    def can_merge(cls) -> bool:
        """Whether merge() is implemented (requests may join a running batch)."""
        return cls.merge is not Drafter.merge

    def finish(self, state: DecodeState) -> None:
        """Release per-request resources."""


def _settings(params: "GenerationParams") -> tuple[float, int, float]:
    return (params.temperature, params.top_k, params.top_p)


def row_settings(params: "GenerationParams") -> tuple[float, int, float]:
    """A row's sampling settings as DecodeState.row_sampling holds them."""
    return _settings(params)


def empty_proposal(batch: int, device: torch.device | str = "cpu") -> DraftProposal:
    """A proposal with no drafts for any row."""
    return DraftProposal(
        tokens=torch.empty(batch, 0, dtype=torch.int64, device=device),
        num_draft=torch.zeros(batch, dtype=torch.int64, device=device),
    )


def pack_proposals(rows: list[list[int]], k: int, device: torch.device | str = "cpu") -> DraftProposal:
    """Pack per-row token lists (each cut to k) into a one-hot DraftProposal."""
    cut = [list(r[:k]) for r in rows]
    tokens = torch.full((len(cut), max(map(len, cut), default=0)), -1, dtype=torch.int64)
    for i, row in enumerate(cut):
        if row:
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    num_draft = torch.tensor([len(r) for r in cut], dtype=torch.int64)
    return DraftProposal(tokens=tokens.to(device), num_draft=num_draft.to(device), host_rows=cut)
