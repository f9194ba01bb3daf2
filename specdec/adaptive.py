"""Adaptive drafting: how many tokens to draft each step, from measured costs and observed acceptance.

The decision is the one Leviathan et al. (2023) make offline, made online every step:
with per-position conditional acceptance rates a_1..a_K (a_i = P(draft i accepted | drafts
before it accepted)), a step that drafts K tokens emits on average

    E(K) = 1 + sum_{i=1..K} prod_{j<=i} a_j          (the 1 is the correction/bonus token)

and costs T(K) = overhead + verify(K + 1) + draft(K) seconds. We draft the K in 0..K_max that
maximises the batch's E/T. Nothing in T is assumed: verify(n) is the measured time of a target
forward over n tokens per row at this batch size, draft(K) the measured time of drafting K tokens
with this drafter, overhead the rest of a step, each an exponential moving average over the
request, interpolated between the token counts measured so far (the prefill gives a first
point at a large n for free; the draft model's prefill over the same prompt gives the draft/
target cost ratio before the first step). K = 0 is plain decoding and is reachable: a drafter
whose drafts are rejected falls to K = 0, and its estimates drift back to their prior between
steps (discounted counts), so it is probed again, rarely, and left again when drafts pay.

Acceptance estimates are discounted Beta counts per drafter and draft position, one set per row
(rows of a batch differ: one is repetitive, one is not) with the drafter's pooled estimate as
the row's prior, so a new row starts from what the request has learned so far.

Draft-model early stop: the draft's own probability q of the token it proposes predicts its
acceptance. A calibration table maps q to the observed acceptance (bins of q with Beta counts,
prior = q itself, which is exact when draft and target agree), and a row stops drafting at the
first slot whose expected extra tokens per second fall below the step's current rate, so the
threshold follows from the cost model instead of being a constant (transformers'
`assistant_confidence_threshold`, llama.cpp's `p_min`). It is lossless: it only shortens drafts.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# Discount applied to a row's acceptance counts at each new observation: an observation is worth
# half after ~35 later ones, so the estimates follow a request whose text changes character.
OBS_DISCOUNT = 0.98
# A row parked at K = 0 is probed with one draft after PROBE_MIN idle steps, the wait doubling
# after every probe that is rejected (up to PROBE_MAX) and reset by one that is accepted. Probes
# of a draft model are skipped unless drafts that are always accepted would beat plain decoding
# by PROBE_GAIN (a lookup probe is always made: it costs one token of verify width): a
# probe of a model drafter also pays the draft model's catch-up over every token it skipped, so
# a draft that could at best save a sliver of the step overhead (one as large as the target)
# is never probed.
PROBE_MIN = 4
PROBE_MAX = 64
PROBE_GAIN = 0.2
# Seeded sampling prices a step that verifies drafts with a fixed proxy (so seeded outputs never
# depend on timing), in shares of a one-token target forward: FIRST_DRAFT_PROXY once for a
# step that verifies any draft, VERIFY_WIDTH_PROXY for each draft verified. A forward over two
# or more tokens takes another path than a one-token decode (an attention mask is built, no
# decode kernel), so the first draft costs more than the next ones. Measured on CPU (the
# bundled target, 180 tokens of context): 1 token 6.4 ms, 2 tokens 7.6 ms, then about 0.2 ms
# (3%) per token up to 9; on a GPU at small batch both are smaller.
FIRST_DRAFT_PROXY = 0.15
VERIFY_WIDTH_PROXY = 0.04
PRIOR_MEAN = 0.5  # acceptance prior per position before anything is observed
PRIOR_WEIGHT = 2.0  # pseudo-observations behind the prior
EXPLORE = 0.5  # standard deviations of optimism in the acceptance estimates K is chosen from
EMA = 0.2  # weight of a new cost measurement
FIT_WEIGHT_CAP = 8  # a cost curve weighs a width measured this often or more as fully known
OUTLIER_CAP = 1.5  # a cost measurement counts at most this multiple of its current estimate
CALIBRATION_BINS = 10


# --------------------------------------------------------------------------- acceptance


@dataclass
class AcceptanceCounts:
    """Discounted per-position Beta counts: successes[i] / trials[i] is a_{i+1}'s evidence."""

    max_k: int
    successes: list[float] = field(default_factory=list)  # [max_k]
    trials: list[float] = field(default_factory=list)  # [max_k]

    def __post_init__(self) -> None:
        if not self.successes:
            self.successes = [0.0] * self.max_k
            self.trials = [0.0] * self.max_k

    def record(self, drafted: int, accepted: int) -> None:
        """One row-step: `drafted` tokens offered, the first `accepted` of them kept.

        Slots before the first rejection are successes, the rejected slot a failure; slots after
        it were never judged (verification stops at the first rejection) and say nothing.
        """
        for i in range(min(drafted, self.max_k)):
            if i < accepted:
                self.successes[i] += 1.0
                self.trials[i] += 1.0
            else:
                self.trials[i] += 1.0
                break

    def observe(self, drafted: int, accepted: int) -> None:
        """One more row-step: older evidence is discounted (OBS_DISCOUNT), then this one recorded."""
        self.discount(OBS_DISCOUNT)
        self.record(drafted, accepted)

    def discount(self, factor: float) -> None:
        for i in range(self.max_k):
            self.successes[i] *= factor
            self.trials[i] *= factor

    def rates(self, prior: list[float] | None = None, weight: float = PRIOR_WEIGHT) -> list[float]:
        """Posterior means of a_1..a_max_k.

        prior: a prior mean per position; None chains them: position 1 starts from PRIOR_MEAN,
        every later position from the estimate of the one before it, so slots beyond the longest
        draft so far are expected to behave like the last one observed instead of like a coin.
        """
        out: list[float] = []
        for i, (s, t) in enumerate(zip(self.successes, self.trials)):
            base = prior[i] if prior is not None else (out[-1] if out else PRIOR_MEAN)
            out.append((weight * base + s) / (weight + t))
        return out


def optimistic_rates(rates: list[float], trials: list[float]) -> list[float]:
    """Each rate plus EXPLORE standard deviations of its Beta estimate (PRIOR_WEIGHT + trials
    observations), capped at 1: what K is chosen from.

    Verification never judges the slots past the chosen K, so a slot whose estimate fell
    early would never be tried again; its evidence decays (OBS_DISCOUNT), its bonus grows,
    and the choice looks one slot further once the bonus makes it worth it.
    """
    return [min(1.0, a + EXPLORE * math.sqrt(a * (1.0 - a) / (PRIOR_WEIGHT + t))) for a, t in zip(rates, trials)]


def proxy_cost(k: int, cost_ratio: float) -> float:
    """Seeded sampling's fixed cost of a step with k drafts: a one-token target forward costs 1,
    a wider one FIRST_DRAFT_PROXY more, each verified draft VERIFY_WIDTH_PROXY more, each
    draft forward cost_ratio."""
    return 1.0 + (FIRST_DRAFT_PROXY if k > 0 else 0.0) + k * (VERIFY_WIDTH_PROXY + cost_ratio)


def best_proxy_k(rates: list[float], cap: int, cost_ratio: float, floor: float = 1.0) -> tuple[int, float]:
    """Seeded sampling's choice: (k, rate) for the k in 1..cap with the most expected tokens per
    unit of proxy_cost, when that beats `floor` (plain decoding's 1, or another source's
    rate); else (0, floor)."""
    best = (0, floor)
    for k in range(1, cap + 1):
        rate = expected_tokens(rates, k) / proxy_cost(k, cost_ratio)
        if rate > best[1] * (1 + 1e-9):
            best = (k, rate)
    return best


def could_pay(k_max: int, cost_ratio: float, gain: float = PROBE_GAIN) -> bool:
    """Seeded sampling: whether drafts always accepted would beat plain decoding by `gain`
    under the fixed cost proxy (PROBE_GAIN: whether a parked row is probed; 0: whether any
    K can ever be chosen)."""
    return any((k + 1) / proxy_cost(k, cost_ratio) > 1.0 + gain for k in range(1, k_max + 1))


def shadow_outcome(offer: list[int], emitted: list[int]) -> tuple[int, int]:
    """(drafted, accepted) that one-hot drafts `offer` would have scored in a step that emitted
    `emitted` (the target's tokens: accepted drafts of another source, then its own token).

    A slot is judged while the offer matches everything emitted before it, up to the tokens
    emitted. Under greedy decoding this is exactly what verifying the offer would have
    accepted. Under sampling a one-hot draft x is accepted with probability p(x), and the
    emitted token equals x with the same probability p(x) (the output follows the target's
    distribution token by token), so the estimate is unbiased. Slots past the emitted tokens
    are not judged, as slots past a rejection are not.
    """
    judged = min(len(offer), len(emitted))
    match = 0
    while match < judged and offer[match] == emitted[match]:
        match += 1
    return (judged, match) if match == judged else (match + 1, match)


def expected_tokens(rates: list[float], k: int) -> float:
    """E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j: tokens a step with k drafts emits on average."""
    total, run = 1.0, 1.0
    for a in rates[:k]:
        run *= a
        total += run
    return total


# --------------------------------------------------------------------------- costs


class CostCurve:
    """Measured seconds as a function of an integer size (tokens per row, drafts per step).

    An exponential moving average per measured size, and a prediction from the straight
    line fitted through those averages (least squares, each size weighted by how often it
    was measured, up to FIT_WEIGHT_CAP): a size seen once in a noisy moment cannot bend the
    curve, and the marginal cost of one more token is the same at every width, so the
    early-stop thresholds derived from it are consistent. A size's first measurement is often
    cold (a new shape): the faster of its first two stands. With a single measured size the
    curve is flat, or proportional to the size (`proportional=True`, for costs that are one
    forward per unit, like drafting with a model). Prior points (`prior=True`: the prompt's
    prefill, far from the decode widths) serve only until two sizes are measured. None
    before any measurement.

    `decode_step=True` (a target forward over n tokens per row): size 1 stands apart. A
    one-token forward is a decode (no attention mask to build, decode kernels), every wider
    one is not, so the cost jumps from 1 to 2 tokens and then grows gently (bundled target on
    CPU: 6.4 ms, 7.6 ms, then 0.2 ms a token). Size 1 is its own measured average, and the
    line is fitted through the wider sizes as soon as two points besides size 1 are known; a
    line through size 1 would make the first draft look almost free.
    """

    def __init__(self, proportional: bool = False, decode_step: bool = False) -> None:
        self.proportional = proportional
        self.decode_step = decode_step
        self.values: dict[int, float] = {}  # measured size -> moving average
        self.counts: dict[int, int] = {}
        self.priors: dict[int, float] = {}
        self._line: tuple[float, float] | None = None  # (intercept, slope), refitted lazily

    def observe(self, size: int, seconds: float, prior: bool = False) -> None:
        if seconds <= 0 or not math.isfinite(seconds):
            return
        if prior:
            self.priors[size] = seconds
            self._line = None
            return
        old = self.values.get(size)
        if old is None:
            self.values[size] = seconds
            self.counts[size] = 1
        elif self.counts[size] == 1:  # the first call at a new shape is often cold (allocation, kernel choice)
            self.values[size] = min(old, seconds)
            self.counts[size] = 2
        else:
            # Interference (another process, a stolen CPU) only ever adds time: one call counts
            # at most OUTLIER_CAP times the estimate, so a stall cannot make a width look
            # unaffordable for good, while a real change still moves the estimate up to 10% a call.
            self.values[size] = old + EMA * (min(seconds, OUTLIER_CAP * old) - old)
            self.counts[size] += 1
        self._line = None

    def _points(self) -> dict[int, float]:
        """The points the line goes through."""
        if self.decode_step and 1 in self.values:
            wide = {x: v for x, v in self.values.items() if x != 1}
            points = wide if len(wide) >= 2 else {**self.priors, **wide}
            if len(points) >= 2:
                return points
        if len(self.values) >= 2 or not self.priors:
            return self.values
        return {**self.priors, **self.values}

    def _fit(self) -> tuple[float, float]:
        """(intercept, slope): through one point flat (or proportional), else least squares."""
        points = self._points()
        if len(points) == 1:
            (only, value), = points.items()
            return (0.0, value / only) if self.proportional and only else (value, 0.0)
        weights = {x: min(self.counts.get(x, 1), FIT_WEIGHT_CAP) for x in points}
        total = sum(weights.values())
        mx = sum(w * x for x, w in weights.items()) / total
        my = sum(w * points[x] for x, w in weights.items()) / total
        sxx = sum(w * (x - mx) ** 2 for x, w in weights.items())
        slope = max(sum(w * (x - mx) * (points[x] - my) for x, w in weights.items()) / sxx, 0.0)
        return my - slope * mx, slope

    def __call__(self, size: int) -> float | None:
        if self.decode_step and size == 1 and 1 in self.values:
            return self.values[1]
        if not self.values and not self.priors:
            return None
        if self._line is None:  # refitted after each measurement, not at each prediction
            self._line = self._fit()
        intercept, slope = self._line
        return max(intercept + slope * size, 0.0)


# --------------------------------------------------------------------------- the policy


class AdaptiveDraftPolicy:
    """Chooses each step's draft length and tracks what it learns during one request.

    The engine calls, per step: `choose(drafter, k_max, available)` -> K; after verification
    `record_step(...)` with the step's measured times and per-row outcome; `select_rows` when
    rows leave the batch. Drafter names key the estimates, so drafters combined per row
    (drafter="auto") each keep their own.
    """

    def __init__(self, k_max: int, batch_size: int) -> None:
        self.k_max = k_max
        self.batch_size = batch_size
        self._verify: dict[int, CostCurve] = {}  # per batch size: seconds of a target forward over n tokens per row
        self.draft: dict[str, CostCurve] = {}  # per drafter: seconds to draft K tokens
        self.overhead: float | None = None  # seconds of a step outside the forwards and drafting
        self.pooled: dict[str, AcceptanceCounts] = {}  # per drafter, all rows of the request
        self.rows: list[dict[str, AcceptanceCounts]] = [{} for _ in range(batch_size)]
        self.idle = [0] * batch_size  # steps since the row last drafted
        self.probe_wait = [PROBE_MIN] * batch_size  # idle steps before the row is probed
        # Steps a model drafter parked at K = 0 skips the full choice (nothing it would weigh
        # changes but the slowly drifting costs); any drafted row re-opens it.
        self._parked = 0
        self.calibration = ConfidenceCalibration()
        self.draft_ratio: float | None = None  # draft forward / target forward, from the prefills

    # What a later request of the same generator starts from (never a row's own counts): the
    # measured costs, which any request may reuse, and the pair's pooled acceptance and
    # confidence calibration, which hold only for the same sampling settings (a lookup draft
    # accepted half the time under greedy decoding is accepted a few percent at T = 0.8).
    COSTS = ("_verify", "draft", "overhead", "draft_ratio")
    ACCEPTANCE = ("pooled", "calibration")

    def learned(self, names: tuple[str, ...] = COSTS + ACCEPTANCE) -> dict[str, Any]:
        """A copy of what this request learned about the pair and the machine."""
        return copy.deepcopy({name: getattr(self, name) for name in names})

    def start_from(self, learned: dict[str, Any]) -> None:
        """Begin from an earlier request's estimates (they keep being discounted and updated)."""
        for name, value in copy.deepcopy(learned).items():
            setattr(self, name, value)

    # -------------------------------------------------------------- measurements

    def record_prefill(self, tokens: int, target_s: float, draft_s: float | None = None) -> None:
        """The prefills: a verify-cost point at n = tokens and the draft/target cost ratio."""
        if tokens <= 0 or target_s <= 0:
            return
        self._verify_curve(exact=True).observe(tokens, target_s, prior=True)
        if draft_s is not None and draft_s > 0:
            self.draft_ratio = draft_s / target_s

    def record_step(
        self,
        drafter: str,
        k: int,  # drafts per row the step verified (its width - 1)
        verify_s: float,  # the target forward
        draft_s: float,  # drafting (0 when k = 0)
        step_s: float,  # the whole step
        drafted: list[int],  # [B] drafts offered per row
        accepted: list[int],  # [B] drafts accepted per row
        idle: bool | list[bool] = True,  # rows without drafts are idle (per row: False where they drafted from another source)
        draft_clean: bool = True,  # False: draft_s includes a catch-up (prompt or long window), not a K cost
        step_costs: bool = True,  # False: this step's verify and overhead were already recorded (drafter "auto")
    ) -> None:
        """One step's measured times and outcome (discounting the observed rows' counts)."""
        if step_costs:
            self._verify_curve(exact=True).observe(k + 1, verify_s)
            rest = max(step_s - verify_s - draft_s, 0.0)
            self.overhead = rest if self.overhead is None else self.overhead + EMA * (rest - self.overhead)
        if k > 0 and draft_s > 0 and draft_clean:
            self.draft.setdefault(drafter, CostCurve(proportional=True)).observe(k, draft_s)
        self.pooled.setdefault(drafter, AcceptanceCounts(self.k_max))  # known even when no row drafted
        idle_rows = idle if isinstance(idle, list) else [idle] * len(drafted)
        for b, (d, a) in enumerate(zip(drafted, accepted)):
            if d <= 0:
                self.idle[b] += idle_rows[b]
                continue
            self._parked = 0
            if self.idle[b] >= self.probe_wait[b]:  # this was a probe
                self.probe_wait[b] = PROBE_MIN if a else min(2 * self.probe_wait[b], PROBE_MAX)
            self.idle[b] = 0
            self._learn(drafter, b, d, a)

    def record_shadow(self, drafter: str, row: int, drafted: int, accepted: int) -> None:
        """An outcome a source would have had this step without being verified (shadow_outcome):
        acceptance evidence only, no costs, and the row's probe schedule is left alone."""
        if drafted > 0:
            self._learn(drafter, row, drafted, accepted)

    def _learn(self, drafter: str, row: int, drafted: int, accepted: int) -> None:
        """Acceptance evidence for one row and the drafter's pooled estimate."""
        self.rows[row].setdefault(drafter, AcceptanceCounts(self.k_max)).observe(drafted, accepted)
        self.pooled.setdefault(drafter, AcceptanceCounts(self.k_max)).observe(drafted, accepted)

    def select_rows(self, keep: list[int]) -> None:
        """Rows `keep` stay in the batch, in this order."""
        self.rows = [self.rows[i] for i in keep]
        self.batch_size = len(keep)
        self.idle = [self.idle[i] for i in keep]
        self.probe_wait = [self.probe_wait[i] for i in keep]

    # -------------------------------------------------------------- estimates

    def _verify_curve(self, exact: bool = False) -> CostCurve:
        """The verify-cost curve at the current batch size (else the nearest one measured)."""
        curve = self._verify.get(self.batch_size)
        if curve is not None or exact or not self._verify:
            return curve if curve is not None else self._verify.setdefault(self.batch_size, CostCurve(decode_step=True))
        nearest = min(self._verify, key=lambda b: abs(b - self.batch_size))
        return self._verify[nearest]

    def verify(self, tokens: int) -> float | None:
        """Estimated seconds of a target forward over `tokens` tokens per row at this batch size."""
        return self._verify_curve()(tokens)

    def row_rates(self, drafter: str, row: int, optimistic: bool = False) -> list[float]:
        """a_1..a_k_max for one row: its own counts over the drafter's pooled estimate.

        optimistic: with the bonus K is chosen from (optimistic_rates).
        """
        pooled = self.pooled.get(drafter)
        prior = pooled.rates() if pooled else AcceptanceCounts(self.k_max).rates()
        counts = self.rows[row].get(drafter)
        rates = counts.rates(prior) if counts else prior
        if not optimistic:
            return rates
        return optimistic_rates(rates, counts.trials if counts else [0.0] * self.k_max)

    def draft_cost(self, drafter: str, k: int, uses_model: bool) -> float | None:
        """Seconds to draft k tokens: measured; else k draft forwards at the prefill's cost ratio
        (a model) or nothing (a lookup drafter); None when a model's cost is still unknown."""
        if k == 0:
            return 0.0
        curve = self.draft.get(drafter)
        if curve is not None and curve.values:
            return curve(k)
        if not uses_model:
            return 0.0
        verify_1 = self.verify(1)
        if self.draft_ratio is None or verify_1 is None:
            return None
        return k * self.draft_ratio * verify_1

    def step_cost(self, drafter: str, k: int, uses_model: bool) -> float | None:
        """Estimated seconds of a step with k drafts, or None while a needed cost is unknown."""
        verify = self.verify(k + 1)
        draft = self.draft_cost(drafter, k, uses_model)
        if verify is None or draft is None:
            return None
        return (self.overhead or 0.0) + verify + draft

    def choose(self, drafter: str, k_max: int, uses_model: bool, available: list[int] | None = None) -> int:
        """The draft length in 0..k_max that maximises the batch's expected tokens per second.

        available: per row, how many drafts the drafter can offer this step (None: k_max for
        every row, as for a draft model); a row contributes E(min(k, available)).
        """
        k_max = max(0, min(k_max, self.k_max))
        caps = available if available is not None else [k_max] * len(self.rows)
        if k_max == 0 or not any(caps):
            return 0
        if self._parked > 0 and available is None:
            self._parked -= 1
            return 0
        rates = [self.row_rates(drafter, r, optimistic=True) for r in range(len(self.rows))]
        best_k, best_rate = 0, 0.0
        for k in range(k_max + 1):
            cost = self.step_cost(drafter, k, uses_model)
            if cost is None:
                return 1  # a cost is still unknown: the shortest draft measures it
            if cost <= 0:
                continue
            rate = sum(expected_tokens(r, min(k, c)) for r, c in zip(rates, caps)) / cost
            if rate > best_rate * (1 + 1e-9):
                best_k, best_rate = k, rate
        if best_k == 0 and self.probe_due(drafter, k_max, uses_model, caps):
            return 1
        if best_k == 0 and available is None:
            self._parked = PROBE_MIN - 1
        return best_k

    def probe_due(self, drafter: str, k_max: int, uses_model: bool, caps: list[int]) -> bool:
        """Whether a row parked at K = 0 has waited long enough, and drafting could pay at all."""
        if not any(c and i >= w for c, i, w in zip(caps, self.idle, self.probe_wait)):
            return False
        if not uses_model:
            # A lookup probe drafts for free and widens one verify by a token: its cost is
            # bounded and small, and it refreshes the width costs the promise below relies on.
            return True
        base = self.step_cost(drafter, 0, uses_model)
        if not base:
            return False
        for k in range(1, k_max + 1):  # perfect acceptance: k + 1 tokens a step
            cost = self.step_cost(drafter, k, uses_model)
            if cost and (k + 1) / cost > (1.0 + PROBE_GAIN) / base:
                return True
        return False

    def choose_per_row(self, drafter: str, k_max: int, cost_ratio: float, available: list[int] | None = None) -> list[int]:
        """Deterministic per-row draft lengths, for seeded sampling.

        A seeded row's tokens must be a function of its prompt and seed alone, not of timing or
        of the other rows in its batch. So each row chooses from its own counts only, and the
        costs are a fixed proxy (proxy_cost): a one-token target forward costs 1, each verified
        draft VERIFY_WIDTH_PROXY more, a draft forward `cost_ratio` (the draft/target size ratio,
        specdec.generator.size_cost_ratio; 0 for lookup drafters). A drafter whose drafts are
        almost never accepted (prompt lookup at a high temperature) then settles at K = 0.
        """
        k_max = max(0, min(k_max, self.k_max))
        caps = available if available is not None else [k_max] * len(self.rows)
        out = []
        for b, cap in enumerate(caps):
            counts = self.rows[b].get(drafter) or AcceptanceCounts(self.k_max)
            best_k, _ = best_proxy_k(optimistic_rates(counts.rates(), counts.trials), min(k_max, cap), cost_ratio)
            if best_k == 0 and cap and self.idle[b] >= self.probe_wait[b] and could_pay(min(k_max, cap), cost_ratio):
                best_k = 1
            out.append(best_k)
        return out

    def expected_rate(self, drafter: str, k: int, uses_model: bool) -> float | None:
        """Expected tokens per second of the batch for a step with k drafts per row."""
        cost = self.step_cost(drafter, k, uses_model)
        if cost is None or cost <= 0:
            return None
        return sum(expected_tokens(self.row_rates(drafter, r), k) for r in range(len(self.rows))) / cost


# --------------------------------------------------------------------------- timing


class Stopwatch:
    """Marks on the host clock (CPU) or CUDA events (read only after the step's one sync,
    when they are complete, so timing adds no synchronisation of its own)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


# --------------------------------------------------------------------------- calibration


class ConfidenceCalibration:
    """Maps the draft's probability of its token to the observed acceptance probability."""

    def __init__(self, bins: int = CALIBRATION_BINS) -> None:
        self.bins = bins
        self.successes = [0.0] * bins
        self.trials = [0.0] * bins

    def _bin(self, q: float) -> int:
        return min(int(q * self.bins), self.bins - 1)

    def record(self, confidences: list[float], accepted: int) -> None:
        """One row-step: the confidences of its drafts in order and how many were accepted."""
        for i, q in enumerate(confidences):
            b = self._bin(q)
            self.trials[b] += 1.0
            if i < accepted:
                self.successes[b] += 1.0
            else:
                break

    def __call__(self, q: float) -> float:
        return self.table()[self._bin(q)]

    def table(self, prior: float | None = None) -> list[float]:
        """Calibrated acceptance of each confidence bin.

        prior: the bins' prior mean (e.g. the drafter's observed first-slot acceptance, which
        suits a draft whose probabilities are not calibrated); None: the bin's own confidence.
        """
        return [
            (PRIOR_WEIGHT * ((b + 0.5) / self.bins if prior is None else prior) + s) / (PRIOR_WEIGHT + t)
            for b, (s, t) in enumerate(zip(self.successes, self.trials))
        ]


# --------------------------------------------------------------------------- in the loop


class EarlyStop:
    """Per-row stop of a draft model's drafting within one step (lossless: drafts only shrink).

    After drafting slot i a row continues while reached_i >= bars[i]: reached_i = prod_{j<=i}
    a(q_j) is the chance that the row's drafts so far are all accepted, from the calibrated
    acceptance a(q) of each draft's confidence q. A bar is the least such chance at which
    drafting on still pays: for some j > i, reached_i * G(i, j) >= rate * (cost(j) - cost(i)),
    with G(i, j) the tokens slots i+1..j add on average once slot i is reached (the drafter's
    per-position estimates) and rate the step's expected tokens per second. Looking to every
    j, not only i+1, keeps a slot that pays only with the ones after it (a myopic rule stops
    too early). Everything is on the device; only on CPU (where reading a value is no
    transfer) does `update` also say when every row has stopped, so the draft loop can end early.
    """

    def __init__(self, table: list[float], bars: list[float], batch: int, device: torch.device) -> None:
        self.table = torch.tensor(table, dtype=torch.float32, device=device)  # [bins]
        self.bars = bars  # [K-1] host floats: continue past slot i while reached_i >= bars[i]
        self.reached = torch.ones(batch, dtype=torch.float32, device=device)  # [B]
        self.active = torch.ones(batch, dtype=torch.bool, device=device)  # [B]
        self.num_draft = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.host_exit = device.type == "cpu"

    def update(self, slot: int, confidence: torch.Tensor) -> bool:  # confidence [B]
        """Account slot `slot` (0-based) just drafted; True when no row continues (CPU only)."""
        bins = (confidence.float() * len(self.table)).long().clamp(0, len(self.table) - 1)
        accept = self.table[bins]  # [B]
        self.num_draft = self.num_draft + self.active.long()
        self.reached = self.reached * accept
        if slot < len(self.bars):
            self.active = self.active & (self.reached >= self.bars[slot])
        return self.host_exit and not bool(self.active.any())


class DraftController:
    """What the loop asks about drafting: this step's proposal, and what the step taught.

    With a fixed K it only asks the drafter for K tokens. With num_draft_tokens="auto" it
    times the step (Stopwatch), feeds an AdaptiveDraftPolicy, and asks the drafter for the
    K the policy chooses; lookup drafters are asked first for everything they have (it costs
    nothing) so the choice can weigh what is on offer per row.
    """

    def __init__(
        self, params, drafter, batch: int, device: torch.device, cost_ratio: float, memory: dict | None = None
    ) -> None:
        self.drafter = drafter
        self.name = drafter.name
        self.uses_model = drafter.uses_draft_model
        self.device = device
        # Seeded sampling: the K choice must not depend on timing or on other rows.
        self.seeded = params.seed is not None and not params.greedy
        self.cost_ratio = cost_ratio if self.uses_model else 0.0
        # Plain decoding, without the policy's bookkeeping on every step: a drafter that never
        # proposes, or a seeded model drafter whose drafts could not pay under the fixed proxy
        # even if all were accepted (a draft as large as the target).
        self.plain = not getattr(drafter, "drafts", True) or (
            params.adaptive_draft and self.seeded and self.uses_model and not drafter.chooses_length
            and not could_pay(params.draft_limit, self.cost_ratio, gain=0.0))
        adaptive = params.adaptive_draft and not self.plain
        self.policy = AdaptiveDraftPolicy(params.draft_limit, batch) if adaptive else None
        if self.policy is not None and self.uses_model:
            # The size-based draft/target cost ratio (size_cost_ratio): the prior cost ratio
            # until its forwards are timed (its prompt is fed on the first draft, not up front).
            self.policy.draft_ratio = self.cost_ratio
        # memory: the generator's store of what earlier requests learned (unseeded requests
        # only: seeded sampling chooses from nothing measured). Costs are kept per drafter and
        # K_max, acceptance also per sampling settings (AdaptiveDraftPolicy.COSTS, ACCEPTANCE).
        self.memory = memory if self.policy is not None and not self.seeded else None
        regime = "greedy" if params.greedy else ("sampled", params.temperature, params.top_k, params.top_p)
        self._memory_keys = {
            AdaptiveDraftPolicy.COSTS: (self.name, params.draft_limit),
            AdaptiveDraftPolicy.ACCEPTANCE: (self.name, params.draft_limit, regime),
        }
        for key in self._memory_keys.values() if self.memory is not None else ():
            if key in self.memory:
                self.policy.start_from(self.memory[key])
        self.watch = Stopwatch(device)
        self._marks: dict[str, Any] = {}
        self._prefill: tuple | None = None
        self.limits: torch.Tensor | None = None  # [B] per-row draft caps of this step
        self._catch_up = False  # this step's drafting included a catch-up (see DraftProposal)

    @property
    def adaptive(self) -> bool:
        return self.policy is not None

    def mark(self, name: str) -> None:
        if self.policy is not None:
            self._marks[name] = self.watch.mark()

    def prefilled(self, tokens: int) -> None:
        """Call after the target and drafter prefills (marks 'start', 'target', 'draft')."""
        if self.policy is not None:
            self._prefill = (tokens, self._marks["start"], self._marks["target"], self._marks["draft"])
            if not self.watch.cuda:  # host clock: known now, so the first step's choice can use it
                self._record_prefill()

    def propose(self, state, k_cap: int):
        """The step's DraftProposal (k_cap: the most drafts any row may take)."""
        from .drafters.base import empty_proposal, pack_proposals

        self.limits = None
        self._catch_up = False
        state.early_stop = None
        if k_cap <= 0 or self.plain:
            return empty_proposal(state.batch_size, state.device)
        if self.policy is None:
            return self.drafter.propose(state, k_cap)
        if self.drafter.chooses_length:  # seeded rows plan on their own counts (no policy)
            state.draft_policy = None if self.seeded else self.policy
            proposal = self.drafter.propose(state, k_cap)
            self._catch_up = proposal.catch_up
            return proposal
        if not self.uses_model:
            offers = self.drafter.offers(state, k_cap)
            if offers is not None:  # host lists: cut to each row's choice, packed only if any
                ks = self._choose(k_cap, [min(len(o), k_cap) for o in offers])
                if max(ks) == 0:
                    return empty_proposal(state.batch_size, state.device)
                return pack_proposals([o[:n] for o, n in zip(offers, ks)], max(ks), state.device)
            offer = self.drafter.propose(state, k_cap)
            available = offer.host_num_draft or [k_cap] * state.batch_size
            ks = self._choose(k_cap, available)
            k = max(ks)
            if k == 0:
                return empty_proposal(state.batch_size, state.device)
            proposal = offer.truncate(k)
        else:
            ks = self._choose(k_cap, None)
            k = max(ks)
            if k == 0:
                return empty_proposal(state.batch_size, state.device)
            if not self.seeded:
                state.early_stop = self._early_stop(k, state.batch_size)
            proposal = self.drafter.propose(state, k)
        if min(ks) < k:
            self.limits = torch.tensor(ks, dtype=torch.long).to(state.device, non_blocking=True)
        self._catch_up = proposal.catch_up
        return proposal

    def _choose(self, k_cap: int, available: list[int] | None) -> list[int]:
        policy = self.policy
        if self.seeded:
            return policy.choose_per_row(self.name, k_cap, self.cost_ratio, available)
        k = policy.choose(self.name, k_cap, self.uses_model, available)
        caps = available or [k] * len(policy.rows)
        return [min(k, c) for c in caps]

    def _early_stop(self, k: int, batch: int) -> EarlyStop | None:
        policy = self.policy
        rate = policy.expected_rate(self.name, k, True)
        if rate is None:
            return None
        pooled = policy.pooled.get(self.name)
        rates = pooled.rates() if pooled else AcceptanceCounts(policy.k_max).rates()
        costs = [policy.step_cost(self.name, j, True) for j in range(k + 1)]
        if any(c is None for c in costs):
            return None
        bars = []
        for i in range(1, k):  # after slot i (1-based) is drafted: whether to draft on
            best, gain, run = float("inf"), 0.0, 1.0
            for j in range(i + 1, k + 1):
                run *= rates[j - 1]
                gain += run  # G(i, j): tokens slots i+1..j add once slot i is reached
                if gain > 0:
                    best = min(best, rate * max(costs[j] - costs[i], 0.0) / gain)
            bars.append(best)
        table = policy.calibration.table(prior=rates[0])
        return EarlyStop(table, bars, batch, self.device)

    def record(
        self, k: int, drafted: list[int], accepted: list[int], confidence: list[list[float]] | None,
        sources: list[str] | None = None, timed: bool = True,
    ) -> None:
        """After the step's host copy: costs (marks 'step', 'drafted', 'verified', 'done') and outcome.
        timed=False: the step's verify was not a forward over its K+1 tokens (the first step
        reuses the prefill's logits), so only its drafting cost and its outcome count."""
        policy = self.policy
        if policy is None:
            return
        m, sec = self._marks, self.watch.seconds
        if not self.watch.cuda:  # on the host clock the step ends now, its bookkeeping included
            m["done"] = self.watch.mark()
        if self._prefill is not None:  # CUDA events: complete after the first step's sync
            self._record_prefill()
        draft_s = sec(m["step"], m["drafted"])
        verify_s = sec(m["drafted"], m["verified"])
        step_s = sec(m["step"], m["done"])
        if sources is None:
            policy.record_step(self.name, k, verify_s, draft_s, step_s, drafted, accepted, draft_clean=not self._catch_up,
                               step_costs=timed)
        else:  # rows drafted by different drafters: each learns from its own rows
            ran_model = any(s == "model" for s in sources)
            for i, name in enumerate(sorted(set(sources))):  # "model" first when it ran: its call sees draft_s
                mine = [s == name for s in sources]
                policy.record_step(
                    name, k, verify_s, draft_s if (name == "model") == ran_model else 0.0, step_s,
                    [d if m else 0 for d, m in zip(drafted, mine)], [a if m else 0 for a, m in zip(accepted, mine)],
                    # A row that drafted nothing is idle (a parked row waits for its probe);
                    # a row of the other source is not.
                    idle=[m and d <= 0 for d, m in zip(drafted, mine)], draft_clean=not self._catch_up,
                    step_costs=i == 0 and timed,
                )
        if confidence is not None and not self.seeded:
            for conf, d, a in zip(confidence, drafted, accepted):
                if d:
                    policy.calibration.record(conf[:d], a)

    def _record_prefill(self) -> None:
        tokens, start, target, draft = self._prefill
        self._prefill = None
        sec = self.watch.seconds
        self.policy.record_prefill(tokens, sec(start, target))

    def select_rows(self, keep: list[int]) -> None:
        if self.policy is not None:
            self.policy.select_rows(keep)

    def finish(self) -> None:
        """Leave what this request learned for the generator's next one."""
        if self.memory is not None:
            for names, key in self._memory_keys.items():
                self.memory[key] = self.policy.learned(names)
