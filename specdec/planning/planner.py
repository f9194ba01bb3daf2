"""The planner: every draft decision of a request, per row and step.

Each step it decides, per row, which source drafts (one of the request's drafters, or
none) and how many tokens, from acceptance estimates (specdec.planning.acceptance) and
costs (specdec.planning.costs); asks the chosen sources for their drafts (a free source,
one that runs no model, is asked for everything it has and cut per row; a source that
runs a model is asked for the chosen K, with an early-stop rule); and merges them into
the one proposal the target verifies. After verification it tells every source what the
target kept and learns from the outcome. Drafters only draft (specdec.drafters.base).

Three ways to plan, by what the request asks:

  fixed K       every row drafts K (a free source: what it has, up to K). With several
                sources (drafter "auto"), each row takes the source with the longer
                expected accepted run; a free source needs evidence of its own first.
  K "auto",     costs are a fixed proxy (costs.proxy_cost) and each row plans on its own
  seeded        counts, so a seeded row's tokens depend on its prompt and seed alone,
  sampling      never on timing or on the other rows of its batch.
  K "auto",     costs are measured; the batch's expected tokens per second, sum_b E_b(k)
  otherwise     / T(k), is maximised over k and over the plans "free sources only" and
                "with source c" (each row taking its best offer). A row at K = 0 is probed
                again after a back-off. With several costly sources, one the plans have
                left idle is tried again after a back-off too (its own best plan for a
                step): a costly source learns only from the steps it drafts, so one
                unlucky early step would otherwise rule it out for good. Seeded rows do
                the same on their own: each costly source drafts one step of the row
                before its estimates are weighed, and one left idle is tried after the
                row's own back-off.

A free source's offers that a row did not verify are scored against what the target
emitted (acceptance.shadow_outcome), so its estimates stay current at no cost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from ..drafters.base import DecodeState, DraftProposal, Drafter, empty_proposal, pack_proposals
from ..params import GenerationParams
from .acceptance import AcceptanceCounts, ConfidenceCalibration, expected_tokens, optimistic_rates, shadow_outcome
from .costs import PROBE_GAIN, StepCosts, Stopwatch, best_proxy_k, could_pay
from .early_stop import EarlyStop, stop_bars

NONE = "none"  # the source of a row that drafts nothing this step
FREE = "free sources"  # the key free sources' drafting time is measured under
# A row parked at K = 0 is probed with one draft after PROBE_MIN idle steps, the wait doubling
# after every probe that is rejected (up to PROBE_MAX) and reset by one that is accepted.
PROBE_MIN = 4
PROBE_MAX = 64
# A free source drafts only when its plan beats plain decoding by this share: its estimate is
# a noisy mean, and taking every plan that looks a little better drafts exactly when the
# noise is high (bench_useless_draft_cpu: lookup at T = 0.8).
FREE_MARGIN = 0.05
# A costly source that the plans leave idle while another costly source drafts is tried for
# one step after SWITCH_MIN idle steps, the wait doubling after every such try (up to
# SWITCH_MAX) and reset when a plan chooses the source on its estimates.
SWITCH_MIN = 8
SWITCH_MAX = 128


@dataclass
class RowPlan:
    """What the planner knows about one row."""

    counts: dict[str, AcceptanceCounts] = field(default_factory=dict)  # per source, discounted
    idle: int = 0  # steps since the row last drafted
    probe_wait: int = PROBE_MIN  # idle steps before the row is probed
    # Seeded plans over several costly sources: per source, [steps since it drafted this row, the
    # wait before it is tried again] (the row's own copy of Planner.switch).
    switch: dict[str, list[int]] = field(default_factory=dict)


def hidden_request(sources: list[Drafter]) -> bool | tuple[int, ...]:
    """What the target returns for these sources: False (no source reads hidden states), True
    (the last layer's) or the layers one reads (Drafter.hidden_layers). Sources that read
    different layers cannot share a request."""
    wanted = {d.hidden_layers for d in sources if d.reads_hidden_states}
    if len(wanted) > 1:
        raise ValueError(f"these drafters read different target layers ({sorted(map(str, wanted))}): "
                         "choose one of them by name")
    if not wanted:
        return False
    layers = wanted.pop()
    return True if layers is None else tuple(layers)


class Planner:
    """One request's draft plan (see the module docstring). The engine calls start, then per
    step propose, mark("verified"), mark("done"), observe, select_rows when rows leave, and
    finish."""

    def __init__(self, params: GenerationParams, sources: list[Drafter], batch: int, device: torch.device,
                 memory: dict | None = None) -> None:
        self.params = params
        self.device = device
        self.sources = {d.name: d for d in sources}  # in the registry's order
        self.k_max = params.draft_limit
        self.adaptive = params.adaptive_draft
        self.seeded = params.seed is not None and not params.greedy
        # Seeded sampling: a row's tokens depend on its prompt and seed alone, but a source that
        # reads shared state (the draft store) drafts what other requests wrote, and sampled
        # tokens depend on where steps begin. Beside other sources (drafter "auto") such a source
        # is left out: it neither drafts nor is scored. Alone (chosen by name) it drafts, and the
        # engine verifies by position (kernels.reference.verify_by_position), whose tokens are
        # plain decoding's whatever was drafted.
        self.verify_by_position = False
        shared = [n for n, d in self.sources.items() if "store" in d.needs]
        if self.seeded and shared:
            if len(shared) < len(self.sources):
                self.sources = {n: d for n, d in self.sources.items() if n not in shared}
            else:
                self.verify_by_position = True
        self.free = [n for n, d in self.sources.items() if d.free]
        self.costly = [n for n, d in self.sources.items() if not d.free]
        if self.adaptive and self.seeded:
            # A source that could not pay under the fixed proxy even with every draft accepted
            # (a draft as large as the target) is never run.
            self.costly = [n for n in self.costly if could_pay(self.k_max, self.sources[n].cost_ratio, gain=0.0)]
        self.active = self.free + self.costly
        self.reads_hidden_states = any(d.reads_hidden_states for d in self.sources.values())
        self.hidden_states = hidden_request(list(self.sources.values()))
        self.rows = [RowPlan() for _ in range(batch)]
        self.switch = {name: [0, SWITCH_MIN] for name in self.costly}  # [idle steps, wait] per costly source
        self.pooled: dict[str, AcceptanceCounts] = {}  # per source, all rows (measured plans' prior)
        self.calibration = ConfidenceCalibration()
        self.costs = StepCosts()
        self.costs.batch_size = batch
        self.watch = Stopwatch(device)
        self._marks: dict[str, Any] = {}
        self._prefill: tuple | None = None
        self._offers: dict[str, list[list[int]]] = {}  # this step's free offers (host)
        self._ran: str | None = None  # the source whose drafting this step's time measures
        self._trying: str | None = None  # this step tries a costly source after its wait (_switch_try)
        self._catch_up = False
        self._row_caps: list[int] | None = None  # this step's per-row caps (propose)
        # Unseeded K "auto" starts from what the generator's last request learned: the costs
        # (any request), the pooled acceptance and calibration (the same sampling settings only).
        self.memory = memory if self.measured else None
        regime = "greedy" if params.greedy else ("sampled", params.temperature, params.top_k, params.top_p)
        pair = (tuple(self.active), self.k_max)
        self._memory_keys = {"costs": ("costs", *pair), "acceptance": ("acceptance", *pair, regime)}
        if self.memory is not None:
            for key in self._memory_keys.values():
                for name, value in copy.deepcopy(self.memory.get(key, {})).items():
                    setattr(self, name, value)
            self.costs.batch_size = batch

    @property
    def measured(self) -> bool:
        """Plans from measured costs (K "auto", not seeded sampling, something to draft with)."""
        return self.adaptive and not self.seeded and bool(self.active)

    # ------------------------------------------------------------------ the request

    def mark(self, name: str) -> None:
        if self.measured:
            self._marks[name] = self.watch.mark()

    def start(self, state: DecodeState, prompt_tokens: int) -> None:
        """After the target's prefill (marks "start" and "target" taken): the sources start."""
        if self.measured:
            self._prefill = (prompt_tokens, self._marks["start"], self._marks["target"])
            if not self.watch.cuda:  # the host clock: known now, so the first step can use it
                self._record_prefill()
        for drafter in self.sources.values():
            drafter.start(state)

    def select_rows(self, keep: list[int]) -> None:
        """Rows `keep` stay in the batch, in this order."""
        self.rows = [self.rows[i] for i in keep]
        self.costs.batch_size = len(keep)
        for drafter in self.sources.values():
            drafter.select_rows(keep)

    def check_merge(self, other: "Planner") -> None:
        """ValueError unless `other`'s rows can join this planner's (the same sources and mode)."""
        if list(other.sources) != list(self.sources) or other.seeded != self.seeded:
            raise ValueError("only batches with the same sources and sampling mode merge")

    def merge(self, other: "Planner", state: DecodeState, other_state: DecodeState) -> None:
        """Append `other`'s rows (a batch of the same settings and sources, between two steps)
        after this planner's: each row keeps what it learned; the pooled estimates and the
        costs stay this planner's."""
        self.check_merge(other)
        for name, drafter in self.sources.items():
            drafter.merge(other.sources[name], state, other_state)
        self.rows = self.rows + other.rows
        self.costs.batch_size = len(self.rows)

    def finish(self, state: DecodeState) -> None:
        for drafter in self.sources.values():
            drafter.finish(state)
        if self.memory is not None:  # what this request learned, for the generator's next one
            self.memory[self._memory_keys["costs"]] = copy.deepcopy({"costs": self.costs})
            self.memory[self._memory_keys["acceptance"]] = copy.deepcopy(
                {"pooled": self.pooled, "calibration": self.calibration})

    # ------------------------------------------------------------------ one step

    def propose(self, state: DecodeState, k_cap: int, row_caps: list[int] | None = None) -> DraftProposal:
        """The step's drafts: at most k_cap per row (and row_caps[b] for row b, the drafts its
        budget leaves room for), num_draft already cut to each row's plan."""
        self.mark("step")
        proposal = self._propose(state, k_cap, row_caps if row_caps is not None else [k_cap] * state.batch_size)
        self.mark("drafted")
        return proposal

    def _propose(self, state: DecodeState, k_cap: int, row_caps: list[int]) -> DraftProposal:
        batch = state.batch_size
        self._offers, self._ran, self._catch_up = {}, None, False
        self._trying = None  # a costly source tried after its wait (see _switch_try)
        self._row_caps = row_caps
        if k_cap <= 0 or not self.active:
            return _nothing(batch, state.device)
        if not self.adaptive and len(self.active) == 1:  # a fixed K from one source: no choice
            name = self.active[0]
            proposal = self.sources[name].propose(state, k_cap)
            proposal.sources = [name] * batch
            self._ran, self._catch_up = name, proposal.catch_up
            return proposal
        for name in self.free:  # free: every row's whole offer (up to its own cap), cut below
            offers = _host_rows(self.sources[name].propose(state, k_cap))
            self._offers[name] = [o[:c] for o, c in zip(offers, row_caps)]
        available = {name: [len(o) for o in offers] for name, offers in self._offers.items()}
        if not self.adaptive:
            ks, chosen = self._plan_fixed(k_cap, available)
        elif self.seeded:
            ks, chosen = self._plan_seeded(k_cap, available)
        else:
            ks, chosen = self._plan_measured(k_cap, available)
        return self._build(state, ks, chosen)

    def _build(self, state: DecodeState, ks: list[int], chosen: list[str]) -> DraftProposal:
        """The proposal of a plan: row b drafts ks[b] tokens from chosen[b]."""
        batch, device = state.batch_size, state.device
        k = max(ks)
        if k == 0:
            return _nothing(batch, device)
        sources = [c if n else NONE for c, n in zip(chosen, ks)]
        costly = [c for c in dict.fromkeys(sources) if c in self.costly]
        if not costly:  # free drafts only: packed on the host, nothing runs
            rows = [self._offers[c][b][:n] if n else [] for b, (c, n) in enumerate(zip(chosen, ks))]
            proposal = pack_proposals(rows, k, device)
            proposal.sources = sources
            self._ran = FREE
            return proposal
        name = costly[0]  # a measured plan runs one costly source a step (it weighs them one at a time)
        only_name = all(s in (name, NONE) for s in sources)
        stop = self._early_stop(name, k, batch) if self.measured and only_name and self._trying != name else None
        if len(costly) == 1:
            drafted = self.sources[name].propose(state, k, early_stop=stop)
        else:  # rows chose different costly sources (seeded or fixed-K plans decide per row): each runs
            drafted = _per_row(state, {c: self.sources[c].propose(state, k) for c in costly}, sources, device)
        self._ran, self._catch_up = name, drafted.catch_up
        k = drafted.tokens.shape[1]  # an early stop may have ended the draft sooner
        limits = torch.tensor([min(n, k) for n in ks], dtype=torch.long).to(device, non_blocking=True)  # [B]
        num_draft = torch.minimum(drafted.num_draft, limits)
        if stop is not None:
            num_draft = torch.minimum(num_draft, stop.num_draft)
        if only_name:
            drafted.num_draft, drafted.sources = num_draft, sources
            return drafted
        # Some rows verify a free source's drafts: their tokens replace the model's, with a
        # one-hot q under sampling (the verifier's rule for them is then exactly the one-hot rule).
        free_rows = [self._offers[c][b][:n] if c in self._offers else [] for b, (c, n) in enumerate(zip(chosen, ks))]
        offer = pack_proposals(free_rows, k, device)
        use_free = torch.tensor([c in self._offers for c in chosen], dtype=torch.bool).to(device, non_blocking=True)
        free_tokens = torch.full_like(drafted.tokens, -1)  # [B, k]
        width = min(k, offer.tokens.shape[1])
        free_tokens[:, :width] = offer.tokens[:, :width]
        tokens = torch.where(use_free.unsqueeze(1), free_tokens, drafted.tokens)  # [B, k]
        num_draft = torch.where(use_free, torch.minimum(offer.num_draft, limits), num_draft)  # [B]
        probs = drafted.probs  # [B, k, V] or None (greedy)
        if probs is not None:
            onehot = torch.nn.functional.one_hot(free_tokens.clamp(min=0), probs.shape[-1]).to(probs.dtype)
            probs = torch.where(use_free.view(-1, 1, 1), onehot, probs)
        return DraftProposal(tokens=tokens, num_draft=num_draft, probs=probs, sources=sources,
                             draft_forwards=drafted.draft_forwards, catch_up=drafted.catch_up)

    def observe(self, state: DecodeState, confidence: list[list[float]] | None, timed: bool) -> None:
        """After the step's host copy (state.step_* hold the outcome): the sources observe, the
        estimates learn. timed=False: the step's verify was not a forward over its width."""
        for drafter in self.sources.values():
            drafter.observe(state)
        for b, (row, source, d, a) in enumerate(zip(self.rows, state.step_sources, state.step_drafted,
                                                    state.step_accepted)):
            if d <= 0:
                row.idle += 1
            else:
                if row.idle >= row.probe_wait:  # this was a probe
                    row.probe_wait = PROBE_MIN if a else min(2 * row.probe_wait, PROBE_MAX)
                row.idle = 0
                self._learn(b, source, d, a)
            for name, offers in self._offers.items():
                # A free offer this row did not verify (another source drafted, or none did),
                # scored against what the target emitted: a free source is never probed, its
                # estimate follows every step at no cost.
                if source != name and offers[b]:
                    self._learn(b, name, *shadow_outcome(offers[b], state.step_emitted[b]))
            if self.seeded and len(self.costly) > 1:  # the row's own switch back-off (_row_switch_try)
                for name in self.costly:
                    idle_wait = row.switch.setdefault(name, [0, SWITCH_MIN])
                    idle_wait[0] = 0 if (source == name and d > 0) else idle_wait[0] + 1
        drafted_by = {s for s, d in zip(state.step_sources, state.step_drafted) if d > 0}
        for name, idle_wait in self.switch.items():
            idle_wait[0] = 0 if name in drafted_by else idle_wait[0] + 1
        if self.measured:
            self._record_costs(max(state.step_drafted, default=0), timed)
            if confidence is not None:
                for conf, d, a in zip(confidence, state.step_drafted, state.step_accepted):
                    if d:
                        self.calibration.record(conf[:d], a)

    @property
    def wants_confidence(self) -> bool:
        """Whether observe() uses the drafts' confidences (the engine copies them only then)."""
        return self.measured

    # ------------------------------------------------------------------ learning

    def _learn(self, row: int, source: str, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.rows[row].counts.setdefault(source, AcceptanceCounts(self.k_max)).observe(drafted, accepted)
        self.pooled.setdefault(source, AcceptanceCounts(self.k_max)).observe(drafted, accepted)

    def _record_costs(self, k: int, timed: bool) -> None:
        m, sec = self._marks, self.watch.seconds
        if not self.watch.cuda:  # on the host clock the step ends now, its bookkeeping included
            m["done"] = self.watch.mark()
        if self._prefill is not None:  # CUDA events: complete after the first step's sync
            self._record_prefill()
        draft_s = sec(m["step"], m["drafted"])
        self.costs.record_step(self._ran, k, sec(m["drafted"], m["verified"]), draft_s, sec(m["step"], m["done"]),
                               timed=timed, draft_clean=not self._catch_up)

    def _record_prefill(self) -> None:
        tokens, start, target = self._prefill
        self._prefill = None
        self.costs.record_prefill(tokens, self.watch.seconds(start, target))

    # ------------------------------------------------------------------ plans

    def _row_cap(self, b: int, k_cap: int) -> int:
        """Row b's cap this step: the batch's, or less where the row's budget ends sooner."""
        return k_cap if self._row_caps is None else min(k_cap, self._row_caps[b])

    def _counts(self, b: int, source: str) -> AcceptanceCounts:
        return self.rows[b].counts.get(source) or AcceptanceCounts(self.k_max)

    def _plan_fixed(self, k_cap_batch: int, available: dict[str, list[int]]) -> tuple[list[int], list[str]]:
        """A fixed K over several sources: per row, the source with the longer expected run (a
        costly source drafts k_cap; a free one what it has, once it has evidence of its own)."""
        ks, chosen = [], []
        for b in range(len(self.rows)):
            k_cap = self._row_cap(b, k_cap_batch)
            if k_cap <= 0:
                ks.append(0)
                chosen.append(NONE)
                continue
            if self.costly:  # the costly source with the longer expected run (optimistic: each gets tried)
                runs = []
                for name in self.costly:
                    counts = self._counts(b, name)
                    runs.append((expected_tokens(optimistic_rates(counts.rates(), counts.trials), k_cap), name))
                name = max(runs, key=lambda r: r[0])[1]  # the first of equals: registration order
                best = (k_cap, name, expected_tokens(self._counts(b, name).rates(), k_cap))
            else:
                best = (0, NONE, 0.0)
            for name in self.free:
                n = min(k_cap, available[name][b])
                if not n:
                    continue
                if not self.costly:  # free sources only: the longest offer
                    if n > best[0]:
                        best = (n, name, 0.0)
                    continue
                counts = self._counts(b, name)
                expected = expected_tokens(counts.rates(), n)
                if any(counts.trials) and expected > best[2] * (1 + 1e-9):
                    best = (n, name, expected)
            ks.append(best[0])
            chosen.append(best[1])
        return ks, chosen

    def _plan_seeded(self, k_cap_batch: int, available: dict[str, list[int]]) -> tuple[list[int], list[str]]:
        """Seeded sampling: each row from its own counts under the fixed cost proxy.

        Per row, the costly source's best K by expected tokens per unit of proxy cost, then
        each free source's best length against that rate (a free offer with no evidence of
        its own waits while a costly source drafts: a step of that source also scores the
        offer, a free step says nothing about the source). A single source at K = 0 is probed
        with one draft after its back-off. With several costly sources, each drafts one step of
        the row (at its own best K) before any is weighed against another, and one the row's
        plans leave idle while another drafts is tried at that K after the row's back-off
        (SWITCH_MIN, doubling): a costly source is judged only on the steps it drafts, and a
        source known to be good would otherwise keep a better one from ever being tried.
        Everything here reads the row's own history: its tokens still depend on its prompt and
        seed alone.
        """
        ks, chosen = [], []
        several = len(self.costly) > 1
        for b, row in enumerate(self.rows):
            # The row's own cap, not the batch's: its plan is what it would be alone.
            k_cap = self._row_cap(b, k_cap_batch)
            first = self._untried(b, k_cap) if several else None
            if first is not None:
                ks.append(first[1])
                chosen.append(first[0])
                continue
            k, source, rate = 0, NONE, 1.0
            for name in self.costly:
                ratio = self.sources[name].cost_ratio
                n, r = best_proxy_k(optimistic_rates(self._counts(b, name).rates(), self._counts(b, name).trials),
                                    k_cap, ratio, floor=rate)
                if n:
                    k, source, rate = n, name, r
            for name in self.free:
                cap = min(k_cap, available[name][b])
                counts = self._counts(b, name)
                if cap and (k == 0 or any(counts.trials)):
                    # No optimism: a free source's offers are scored every step, verified or not,
                    # so every slot of them keeps being judged without exploring.
                    n, r = best_proxy_k(counts.rates(), cap, 0.0, floor=rate if k else 1.0 + FREE_MARGIN)
                    if n:
                        k, source, rate = n, name, r
            if k == 0 and len(self.active) == 1 and self.costly and row.idle >= row.probe_wait:
                name = self.costly[0]  # a single costly source at K = 0: probed after its back-off
                if could_pay(k_cap, self.sources[name].cost_ratio):
                    k, source = 1, name
            if several and k and source in self.costly:
                source = self._row_switch_try(row, source)
            ks.append(k)
            chosen.append(source)
        return ks, chosen

    def _untried(self, b: int, k_cap: int) -> tuple[str, int] | None:
        """Seeded: (source, k) for the first costly source that has never drafted for row b, at
        its own best K from the prior; None when every one has (or none could pay a step)."""
        for name in self.costly:
            counts = self._counts(b, name)
            if not any(counts.trials):
                n, _ = best_proxy_k(optimistic_rates(counts.rates(), counts.trials), k_cap,
                                    self.sources[name].cost_ratio)
                if n:
                    return name, n
        return None

    def _row_switch_try(self, row: RowPlan, source: str) -> str:
        """Seeded: the costly source `source` a row's plan chose, or another costly source that
        the row's plans have left idle for its wait (tried at the same K: judged as deep as the
        source it competes with)."""
        for name in self.costly:
            idle_wait = row.switch.setdefault(name, [0, SWITCH_MIN])
            if name == source:
                idle_wait[1] = SWITCH_MIN
            elif idle_wait[0] >= idle_wait[1]:
                idle_wait[1] = min(2 * idle_wait[1], SWITCH_MAX)
                return name
        return source

    def _rates(self, b: int, source: str, optimistic: bool = True) -> list[float]:
        """a_1..a_k_max of row b from `source`: the row's own counts over the source's pooled
        estimate; optimistic: with the bonus K is chosen from (acceptance.optimistic_rates)."""
        pooled = self.pooled.get(source)
        prior = pooled.rates() if pooled else AcceptanceCounts(self.k_max).rates()
        counts = self.rows[b].counts.get(source)
        rates = counts.rates(prior) if counts else prior
        if not optimistic:
            return rates
        return optimistic_rates(rates, counts.trials if counts else [0.0] * self.k_max)

    def _cost(self, source: str | None, k: int) -> float:
        """Seconds of a step with k drafts from `source` (FREE: free sources; None: plain)."""
        ratio = 0.0 if source in (FREE, None) else self.sources[source].cost_ratio
        cost = self.costs.step(source if k else None, k, ratio)
        return cost if cost is not None and cost > 0 else float("inf")

    def _plan_measured(self, k_cap: int, available: dict[str, list[int]]) -> tuple[list[int], list[str]]:
        """Measured costs: the plan with the most expected tokens per second for the batch."""
        batch = len(self.rows)
        if len(self.costly) > 1:
            # A costly source never verified yet (here or in the generator's earlier requests) drafts
            # one step first: beside a measured one its prior would never win, so it would never be
            # weighed on evidence.
            for name in self.costly:
                pooled = self.pooled.get(name)
                if pooled is None or not any(pooled.trials):
                    return [k_cap] * batch, [name] * batch
        free_rates = {name: [self._rates(b, name) for b in range(batch)] for name in self.free}

        def best_free(b: int, k: int) -> tuple[float, str]:
            """Row b's best free offer at k: (expected tokens, source)."""
            best = (1.0, NONE)
            for name in self.free:
                n = min(k, available[name][b])
                if n:
                    e = expected_tokens(free_rates[name][b], n)
                    if e > best[0] or best[1] == NONE:
                        best = (e, name)
            return best

        plain = batch / self._cost(None, 0)
        best = (0, [NONE] * batch, plain)
        with_source: dict[tuple[str, int], list[str]] = {}  # (costly source, k) -> each row's pick
        costly_rates = {name: [self._rates(b, name) for b in range(batch)] for name in self.costly}
        for k in range(1, k_cap + 1):
            offers = [best_free(b, k) for b in range(batch)]
            if any(s != NONE for _, s in offers):  # free sources only: no model runs
                rate = sum(e for e, _ in offers) / self._cost(FREE, k)
                if rate > best[2] * (1 + (FREE_MARGIN if best[0] == 0 else 1e-9)):
                    best = (k, [s for _, s in offers], rate)
            for name in self.costly:  # `name` runs; each row takes its better offer
                picks, tokens = [], 0.0
                for b, (e, s) in enumerate(offers):
                    mine = expected_tokens(costly_rates[name][b], k)
                    picks.append(s if s != NONE and e >= mine else name)
                    tokens += max(e, mine) if s != NONE else mine
                rate = tokens / self._cost(name, k)
                if rate > best[2] * (1 + 1e-9):
                    best = (k, picks, rate)
                with_source[name, k] = picks
        k, picks, _ = best
        if k and len(self.costly) > 1:
            picks = self._switch_try(k_cap, k, picks, with_source)
        if k == 0:  # parked: a costly source is probed after the back-off (free ones need no probe)
            for name in self.costly:
                if self._probe_due(name, k_cap, [k_cap] * batch):
                    return [1] * batch, [name] * batch
            return [0] * batch, [NONE] * batch
        ks = [min(k, available[s][b]) if s in available else (k if s != NONE else 0) for b, s in enumerate(picks)]
        return ks, picks

    def _switch_try(self, k_cap: int, k: int, picks: list[str], with_source: dict) -> list[str]:
        """The step's picks, or, where a costly source the plans have left idle for its wait
        while another costly source drafts (see SWITCH_MIN), that source's picks at the same k,
        drafted without an early stop: it is judged as deep as the source it competes with."""
        planned = set(picks)
        if not planned & set(self.costly):
            return picks
        for name in self.costly:
            idle_wait = self.switch[name]
            if name in planned:
                idle_wait[1] = SWITCH_MIN
            elif idle_wait[0] >= idle_wait[1] and self._could_pay(name, k_cap):
                idle_wait[1] = min(2 * idle_wait[1], SWITCH_MAX)
                self._trying = name
                return with_source[name, k]
        return picks

    def _probe_due(self, source: str, k_cap: int, caps: list[int]) -> bool:
        """Whether a row parked at K = 0 has waited long enough, and drafting could pay at all."""
        if not any(c and r.idle >= r.probe_wait for c, r in zip(caps, self.rows)):
            return False
        return self._could_pay(source, k_cap)

    def _could_pay(self, source: str, k_cap: int) -> bool:
        """Whether drafts from `source` that are always accepted would beat plain decoding by PROBE_GAIN."""
        base = self._cost(None, 0)
        ratio = self.sources[source].cost_ratio
        for k in range(1, k_cap + 1):  # perfect acceptance: k + 1 tokens a step
            cost = self.costs.step(source, k, ratio)
            if cost and (k + 1) / cost > (1.0 + PROBE_GAIN) / base:
                return True
        return False

    def _early_stop(self, source: str, k: int, batch: int) -> EarlyStop | None:
        """The per-row stop rule for a costly source's drafting this step (None: draft all k)."""
        if not self.sources[source].gives_probs or k < 2:
            return None
        costs = [self.costs.step(source, j, self.sources[source].cost_ratio) for j in range(k + 1)]
        if any(c is None or c <= 0 for c in costs):
            return None
        pooled = self.pooled.get(source)
        rates = pooled.rates() if pooled else AcceptanceCounts(self.k_max).rates()
        expected = sum(expected_tokens(self._rates(b, source, optimistic=False), k) for b in range(batch)) / costs[k]
        table = self.calibration.table(prior=rates[0])
        return EarlyStop(table, stop_bars(rates, costs, expected), batch, self.device)


def _nothing(batch: int, device: torch.device) -> DraftProposal:
    proposal = empty_proposal(batch, device)
    proposal.sources = [NONE] * batch
    return proposal


def _host_rows(proposal: DraftProposal) -> list[list[int]]:
    """A free source's proposal as host lists (a device read only for one built on the device)."""
    if proposal.host_rows is not None:
        return proposal.host_rows
    return [row[:n] for row, n in zip(proposal.tokens.tolist(), proposal.num_draft.tolist())]


def _per_row(state: DecodeState, proposals: dict[str, DraftProposal], sources: list[str],
             device: torch.device) -> DraftProposal:
    """One proposal from several costly sources' proposals: row b takes the one of sources[b]
    (rows of no costly source keep the first's, replaced by their free offer or no draft)."""
    first = next(iter(proposals.values()))
    width = max(p.tokens.shape[1] for p in proposals.values())
    sampled = [p.probs for p in proposals.values() if p.probs is not None]
    vocab = max((q.shape[-1] for q in sampled), default=0)
    pad = torch.nn.functional.pad
    tokens = pad(first.tokens, (0, width - first.tokens.shape[1]), value=-1)  # [B, k]
    num_draft = first.num_draft
    probs = pad(first.probs, (0, vocab - first.probs.shape[-1], 0, width - first.probs.shape[1])) if sampled else None
    for name, proposal in list(proposals.items())[1:]:
        mine = torch.tensor([s == name for s in sources], dtype=torch.bool).to(device, non_blocking=True)  # [B]
        theirs = pad(proposal.tokens, (0, width - proposal.tokens.shape[1]), value=-1)
        tokens = torch.where(mine.unsqueeze(1), theirs, tokens)
        num_draft = torch.where(mine, proposal.num_draft, num_draft)
        if probs is not None:
            q = pad(proposal.probs, (0, vocab - proposal.probs.shape[-1], 0, width - proposal.probs.shape[1]))
            probs = torch.where(mine.view(-1, 1, 1), q, probs)
    return DraftProposal(tokens=tokens, num_draft=num_draft, probs=probs,
                         draft_forwards=sum(p.draft_forwards for p in proposals.values()),
                         catch_up=any(p.catch_up for p in proposals.values()))
