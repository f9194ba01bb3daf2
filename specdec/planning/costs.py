"""Cost estimates: what a step that drafts k tokens per row costs.

T(k) = overhead + verify(k + 1) + draft(k): verify(n) is a target forward over n tokens
per row at the batch's size, draft(k) drafting k tokens with a source, overhead the rest
of a step. Unseeded requests measure them (`StepCosts`, from `Stopwatch` marks); seeded
sampling prices a step with a fixed proxy instead (`proxy_cost`), so that a seed's tokens
never depend on the machine's load.
"""

from __future__ import annotations

import math
import time

import torch

from .acceptance import expected_tokens

# Seeded sampling prices a step that verifies drafts with a fixed proxy, in shares of a
# one-token target forward: FIRST_DRAFT_PROXY once for a step that verifies any draft,
# VERIFY_WIDTH_PROXY for each draft verified. A forward over two or more tokens takes another
# path than a one-token decode (an attention mask is built, no decode kernel), so the first
# draft costs more than the next ones. Measured on CPU (the bundled target, 180 tokens of
# context): 1 token 6.4 ms, 2 tokens 7.6 ms, then about 0.2 ms (3%) per token up to 9; on a
# GPU at small batch both are smaller.
FIRST_DRAFT_PROXY = 0.15
VERIFY_WIDTH_PROXY = 0.04
# A parked source is probed only if drafts that are always accepted would beat plain
# decoding by PROBE_GAIN (see Planner).
PROBE_GAIN = 0.2
EMA = 0.2  # weight of a new cost measurement
FIT_WEIGHT_CAP = 8  # a cost curve weighs a width measured this often or more as fully known
OUTLIER_CAP = 1.5  # a cost measurement counts at most this multiple of its current estimate


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
            # Once a line is known (two sizes besides a decode step), a size's first call counts
            # at most OUTLIER_CAP times what the line predicts for it: a stall on the first
            # draft after a long plain stretch would otherwise price that width out, and it
            # would never be measured again.
            known = [x for x in self.values if not (self.decode_step and x == 1)]
            predicted = self(size) if len(known) >= 2 else None
            self.values[size] = min(seconds, OUTLIER_CAP * predicted) if predicted else seconds
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


class StepCosts:
    """The measured costs of one request's steps: verify(n) per batch size, draft(k) per
    source, and the overhead; what a step with k drafts from a source is expected to cost."""

    def __init__(self) -> None:
        self.batch_size = 0
        self.verify_curves: dict[int, CostCurve] = {}  # batch size -> seconds of a forward over n tokens per row
        self.draft: dict[str, CostCurve] = {}  # source -> seconds to draft k tokens
        self.overhead: float | None = None  # seconds of a step outside the forwards and drafting
        self.draft_ratio: float | None = None  # a draft forward over a target forward (prior)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """The prompt's prefill: a verify-cost point at n = tokens, until the decode widths are known."""
        if tokens > 0 and seconds > 0:
            self._verify_curve(exact=True).observe(tokens, seconds, prior=True)

    def record_step(self, source: str | None, k: int, verify_s: float, draft_s: float, step_s: float,
                    timed: bool = True, draft_clean: bool = True) -> None:
        """One step's times. timed=False: its verify was not a forward over k + 1 tokens (the
        first step reuses the prefill's logits). draft_clean=False: drafting included a catch-up
        (a prompt or a long window), which is not what drafting k tokens costs."""
        if timed:
            self._verify_curve(exact=True).observe(k + 1, verify_s)
            rest = max(step_s - verify_s - draft_s, 0.0)
            self.overhead = rest if self.overhead is None else self.overhead + EMA * (rest - self.overhead)
        if source is not None and k > 0 and draft_s > 0 and draft_clean:
            self.draft.setdefault(source, CostCurve(proportional=True)).observe(k, draft_s)

    def _verify_curve(self, exact: bool = False) -> CostCurve:
        """The verify-cost curve at the current batch size (else the nearest one measured)."""
        curve = self.verify_curves.get(self.batch_size)
        if curve is not None or exact or not self.verify_curves:
            if curve is None:
                curve = self.verify_curves.setdefault(self.batch_size, CostCurve(decode_step=True))
            return curve
        nearest = min(self.verify_curves, key=lambda b: abs(b - self.batch_size))
        return self.verify_curves[nearest]

    def verify(self, tokens: int) -> float | None:
        """Estimated seconds of a target forward over `tokens` tokens per row at this batch size."""
        return self._verify_curve()(tokens)

    def draft_cost(self, source: str, k: int, cost_ratio: float) -> float | None:
        """Seconds to draft k tokens: measured; else k draft forwards at the prior cost ratio (a
        model), or nothing (a free source); None while a model's cost is still unknown."""
        if k == 0:
            return 0.0
        curve = self.draft.get(source)
        if curve is not None and curve.values:
            return curve(k)
        if cost_ratio == 0.0:
            return 0.0
        verify_1 = self.verify(1)
        ratio = self.draft_ratio if self.draft_ratio is not None else cost_ratio
        return None if verify_1 is None else k * ratio * verify_1

    def step(self, source: str | None, k: int, cost_ratio: float = 0.0) -> float | None:
        """Estimated seconds of a step with k drafts from `source`, or None while a cost is unknown."""
        verify = self.verify(k + 1)
        draft = self.draft_cost(source, k, cost_ratio) if source is not None else 0.0
        if verify is None or draft is None:
            return None
        return (self.overhead or 0.0) + verify + draft
