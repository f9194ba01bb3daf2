"""Drafter "oracle", for benchmarks only: acceptance under control, cost of a real draft.

It runs the real draft model exactly as drafter "model" does (so every step pays the
draft model's forwards), then throws its tokens away and proposes the target's own
greedy continuation of the prompt instead, each token replaced by a different one with
probability 1 - alpha. Under greedy verification a draft token is then accepted with
probability alpha given the ones before it, so tau = (1 - alpha^(K+1)) / (1 - alpha)
(K + 1 at alpha = 1) and efficiency against the bound measures the engine, not how
well two random models agree.

The continuations come from the benchmark (one greedy decode per prompt, done once up
front) through `OracleDrafter.configure`. Greedy only: its tokens do not come from the
draft's q, so a sampled request is refused. Importing this module registers it.
"""

from __future__ import annotations

import random

import torch

from specdec.drafters import register_drafter
from specdec.drafters.base import DraftProposal
from specdec.drafters.model import ModelDrafter


@register_drafter("oracle")
class OracleDrafter(ModelDrafter):
    """The draft model's cost, the target's greedy continuation (corrupted) as drafts."""

    continuations: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> target's greedy continuation
    alpha: float = 1.0  # probability that a drafted token is the target's own
    _rng = random.Random(0)

    @classmethod
    def configure(cls, continuations: dict[tuple[int, ...], list[int]], alpha: float, seed: int = 0) -> None:
        """Set the continuations (keyed by prompt ids) and alpha for the next requests."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        cls.continuations = dict(continuations)
        cls.alpha = float(alpha)
        cls._rng = random.Random(seed)

    def start(self, state) -> None:
        if not state.params.greedy:
            raise ValueError('drafter="oracle" proposes greedy continuations; use temperature=0')
        rows = []
        self.prompt_lengths = [len(seq) for seq in state.sequences]
        for seq, n in zip(state.sequences, self.prompt_lengths):
            key = tuple(seq[:n])
            if key not in self.continuations:
                raise ValueError("drafter='oracle' has no continuation for a prompt; call OracleDrafter.configure "
                                 "with the target's greedy continuation of every prompt first")
            rows.append(self.continuations[key])
        self.rows = rows  # per active row: the continuation
        super().start(state)

    @torch.inference_mode()
    def propose(self, state, k: int, early_stop=None) -> DraftProposal:
        proposal = super().propose(state, k, early_stop)  # the draft model's forwards: the cost being modelled
        k = proposal.tokens.shape[1]  # the draft model may have stopped early (K "auto")
        vocab = self.context.vocab_size
        tokens = torch.full((state.batch_size, k), -1, dtype=torch.int64)  # [B, k]
        counts = torch.zeros(state.batch_size, dtype=torch.int64)  # [B]
        for b, (seq, n, cont) in enumerate(zip(state.sequences, self.prompt_lengths, self.rows)):
            ahead = cont[len(seq) - n: len(seq) - n + k]
            for i, token in enumerate(ahead):
                if self._rng.random() >= self.alpha:
                    token = (token + self._rng.randrange(1, vocab)) % vocab  # any other token
                tokens[b, i] = token
            counts[b] = len(ahead)
        return DraftProposal(
            tokens=tokens.to(state.device), num_draft=counts.to(state.device), draft_forwards=proposal.draft_forwards
        )

    def _verified_own_drafts(self, state) -> bool:
        return False  # the target verified these tokens, not the draft model's: keep only what it emitted

    def select_rows(self, keep: list[int]) -> None:  # indices of the rows that stay
        super().select_rows(keep)
        self.rows = [self.rows[i] for i in keep]
        self.prompt_lengths = [self.prompt_lengths[i] for i in keep]
