"""Drafter "auto": per row and step, prompt lookup where it is expected to pay, the draft model otherwise.

Each step the n-gram index offers what it has for every row (free: a dictionary lookup).
Every source keeps per-row acceptance estimates (specdec.adaptive), so the expected
accepted length of each offer is known. Two plans are weighed:

  lookup only   rows with an n-gram offer draft it, the draft model does not run;
  with model    the draft model drafts K for the batch, and each row verifies whichever
                of its two offers has the larger expected accepted length.

The plan with more expected tokens per second wins (with num_draft_tokens="auto" the
costs are the measured ones and K is chosen too; with a fixed K the model runs whenever a
row expects more from it). Rows that verify n-gram tokens under sampling get a one-hot q,
so the verifier's rule for them is exactly the one-hot rule. The draft model's cache keeps
its own drafts only as far as they equal what the target emitted (ModelDrafter handles
replaced rows), so switching sources costs nothing in correctness.
"""

from __future__ import annotations

import torch

from ..adaptive import AcceptanceCounts, best_proxy_k, could_pay, expected_tokens, optimistic_rates, shadow_outcome
from . import register_drafter
from .base import DraftProposal, Drafter, empty_proposal, pack_proposals
from .model import ModelDrafter
from .ngram import NgramDrafter

LOOKUP, MODEL = "ngram", "model"


def plan_row(
    lookup: AcceptanceCounts, model: AcceptanceCounts, available: int, k_cap: int, ratio: float | None
) -> tuple[int, str]:
    """(drafts, source) of one row from its own counts alone (seeded sampling, or a fixed K).

    ratio: the draft/target cost proxy under K "auto" (the best K by expected tokens per unit
    of proxy_cost, drafting only where it beats plain decoding); None for a fixed K = k_cap
    (the source with the longer expected accepted run).

    A lookup offer with no evidence of its own waits while the model drafts: a model step also
    scores the offer (AutoDrafter.observe), a lookup step says nothing about the model, and
    the prior alone would prefer the free lookup, which at sampling temperatures is rarely
    accepted (each such step costs a target forward for about one token).
    """
    if ratio is None:  # a fixed K: the source with the longer expected run
        n = min(k_cap, available)
        if n and any(lookup.trials) and (
                expected_tokens(lookup.rates(), n) > expected_tokens(model.rates(), k_cap) * (1 + 1e-9)):
            return n, LOOKUP
        return k_cap, MODEL
    # K "auto" chooses from optimistic rates, as the measured-cost policy does. A draft model
    # that could not pay even with every draft accepted is not weighed (a draft as large as
    # the target).
    k, rate = 0, 1.0
    if could_pay(k_cap, ratio, gain=0.0):
        k, rate = best_proxy_k(optimistic_rates(model.rates(), model.trials), k_cap, ratio)
    if available and (k == 0 or any(lookup.trials)):
        n, _ = best_proxy_k(optimistic_rates(lookup.rates(), lookup.trials), min(k_cap, available), 0.0, floor=rate)
        if n:
            return n, LOOKUP
    return k, MODEL if k else LOOKUP


@register_drafter("auto")
class AutoDrafter(Drafter):
    """Combines the n-gram and draft-model drafters per row (see the module docstring)."""

    provides_probs = True
    uses_draft_model = True
    chooses_length = True  # picks K itself from the policy the loop hands it

    def __init__(self, generator, cache_layer=None) -> None:
        super().__init__(generator, cache_layer)
        self.model = ModelDrafter(generator, cache_layer)
        self.lookup = NgramDrafter(generator, cache_layer)

    def start(self, state) -> None:
        self.model.start(state)
        self.lookup.start(state)
        self.k_max = state.params.draft_limit
        # Acceptance per row and source when no adaptive policy is running (fixed K).
        self.counts = [{LOOKUP: AcceptanceCounts(self.k_max), MODEL: AcceptanceCounts(self.k_max)}
                       for _ in range(state.batch_size)]
        self.sources = [LOOKUP] * state.batch_size
        self.offers: list[list[int]] | None = None  # [B] this step's lookup offers (host)

    # ------------------------------------------------------------------ choosing

    def _rates(self, policy, source: str, b: int) -> list[float]:
        if policy is not None:  # optimistic, as the policy's own choice of K (see row_rates)
            return policy.row_rates(source, b, optimistic=True)
        return self.counts[b][source].rates()

    def _cost(self, policy, source: str, k: int) -> float:
        if policy is None:
            return 1.0  # fixed K: only the expected lengths decide
        cost = policy.step_cost(source, k, source == MODEL)
        return cost if cost is not None else float("inf")

    def plan(self, state, k_cap: int, available: list[int], policy) -> tuple[list[int], list[str]]:
        """Per row: (drafts, source), from the plan with the most expected tokens per second."""
        if policy is None:
            return self._plan_per_row(state, k_cap, available)
        batch = state.batch_size
        lookup = [self._rates(policy, LOOKUP, b) for b in range(batch)]
        model = [self._rates(policy, MODEL, b) for b in range(batch)]
        best = (0, [LOOKUP] * batch, batch / self._cost(policy, LOOKUP, 0))  # plain decoding
        for k in range(1, k_cap + 1):
            if any(available):  # lookup only: the draft model does not run
                tokens = sum(expected_tokens(lookup[b], min(k, available[b])) for b in range(batch))
                rate = tokens / self._cost(policy, LOOKUP, k)
                if rate > best[2] * (1 + 1e-9):
                    best = (k, [LOOKUP] * batch, rate)
            sources, tokens = [], 0.0  # the draft model runs; each row takes its better offer
            for b in range(batch):
                from_lookup = expected_tokens(lookup[b], min(k, available[b])) if available[b] else 0.0
                from_model = expected_tokens(model[b], k)
                sources.append(LOOKUP if from_lookup >= from_model else MODEL)
                tokens += max(from_lookup, from_model)
            rate = tokens / self._cost(policy, MODEL, k)
            if rate > best[2] * (1 + 1e-9):
                best = (k, sources, rate)
        k, sources, _ = best
        if k == 0:  # parked: probe a source after the policy's back-off (lookup first: it is free)
            if any(available) and policy.probe_due(LOOKUP, k_cap, False, available):
                return [min(k_cap, a) for a in available], [LOOKUP] * batch
            if policy.probe_due(MODEL, k_cap, True, [k_cap] * batch):
                return [1] * batch, [MODEL] * batch
        return [min(k, available[b]) if s == LOOKUP else k for b, s in enumerate(sources)], sources

    def _plan_per_row(self, state, k_cap: int, available: list[int]) -> tuple[list[int], list[str]]:
        """Each row on its own counts: a fixed K, or (seeded sampling with K "auto") the best K
        under the fixed cost proxy, so a row's tokens never depend on the rest of its batch."""
        adaptive = state.params.adaptive_draft
        ratio = self.generator._draft_cost_ratio() if adaptive else None
        plans = [plan_row(self.counts[b][LOOKUP], self.counts[b][MODEL], available[b], k_cap, ratio)
                 for b in range(state.batch_size)]
        return [k for k, _ in plans], [source for _, source in plans]

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def propose(self, state, k: int) -> DraftProposal:
        self.offers = offers = self.lookup.offers(state, k)  # [B] host lists of at most k tokens
        ks, sources = self.plan(state, k, [len(o) for o in offers], state.draft_policy)
        self.sources = sources
        k = max(ks)
        if k == 0:
            return empty_proposal(state.batch_size, state.device)
        if MODEL not in sources:
            offer = pack_proposals([o[:n] for o, n in zip(offers, ks)], k, state.device)
            offer.sources = sources
            return offer
        limits = torch.tensor(ks, dtype=torch.long).to(state.device, non_blocking=True)  # [B]
        offer = pack_proposals(offers, k, state.device)
        drafted = self.model.propose(state, k)
        k = drafted.tokens.shape[1]
        use_lookup = [s == LOOKUP for s in sources]
        if not any(use_lookup):
            drafted.num_draft = torch.minimum(drafted.num_draft, limits)
            drafted.sources = sources
            return drafted
        self.model.replaced = True
        rows = torch.tensor(use_lookup, dtype=torch.bool).to(state.device, non_blocking=True)  # [B]
        width = min(k, offer.tokens.shape[1])
        lookup_tokens = torch.full_like(drafted.tokens, -1)  # [B, k]
        lookup_tokens[:, :width] = offer.tokens[:, :width]
        tokens = torch.where(rows.unsqueeze(1), lookup_tokens, drafted.tokens)  # [B, k]
        num_draft = torch.minimum(torch.where(rows, offer.num_draft, drafted.num_draft), limits)  # [B]
        probs = drafted.probs  # [B, k, V] or None (greedy)
        if probs is not None:  # sampling: one-hot q for the rows that verify lookup tokens
            onehot = torch.nn.functional.one_hot(lookup_tokens.clamp(min=0), probs.shape[-1]).to(probs.dtype)
            probs = torch.where(rows.view(-1, 1, 1), onehot, probs)
        return DraftProposal(
            tokens=tokens, num_draft=num_draft, probs=probs, sources=sources, draft_forwards=drafted.draft_forwards,
            catch_up=drafted.catch_up,
        )

    def observe(self, state) -> None:
        self.model.observe(state)
        offers, self.offers = self.offers, None  # this step's only (None: propose did not run)
        for b, (source, d, a) in enumerate(zip(self.sources, state.step_drafted, state.step_accepted)):
            if d:  # per-row counts of the source the row used (the plan without a policy)
                self.counts[b][source].observe(d, a)
            if offers is not None and source == MODEL and offers[b]:
                # The lookup offer this row did not verify, scored against what the target
                # emitted: its estimate stays current while the draft model drafts, so a
                # lookup that would be accepted as well takes over without a draft forward.
                shadow = shadow_outcome(offers[b], state.step_emitted[b])
                self.counts[b][LOOKUP].observe(*shadow)
                if state.draft_policy is not None:
                    state.draft_policy.record_shadow(LOOKUP, b, *shadow)

    def select_rows(self, keep: list[int]) -> None:
        self.model.select_rows(keep)
        self.lookup.select_rows(keep)
        self.counts = [self.counts[i] for i in keep]

    def finish(self, state) -> None:
        self.model.finish(state)
        self.lookup.finish(state)
