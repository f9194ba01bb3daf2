"""Acceptance estimates: how many drafted tokens the target is expected to keep.

Notation (Leviathan et al. 2023): a draft of K tokens is verified slot by slot, and
a_i = P(draft i accepted | drafts 1..i-1 accepted) is the conditional acceptance of
slot i. A step that drafts K tokens emits on average

    E(K) = 1 + sum_{i=1..K} prod_{j<=i} a_j          (the 1: the correction or bonus token)

Each a_i is a Beta posterior: discounted counts of successes and trials at slot i over
a prior mean, so an estimate follows a request whose text changes character. Nothing
here reads a clock or a tensor; the planner (specdec.planning.planner) reads these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Discount applied to a row's counts at each new observation: an observation is worth half
# after ~35 later ones.
OBS_DISCOUNT = 0.98
PRIOR_MEAN = 0.5  # acceptance prior per slot before anything is observed
PRIOR_WEIGHT = 2.0  # pseudo-observations behind the prior
EXPLORE = 0.5  # standard deviations of optimism in the estimates K is chosen from
CALIBRATION_BINS = 10


def expected_tokens(rates: list[float], k: int) -> float:
    """E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j: tokens a step with k drafts emits on average."""
    total, run = 1.0, 1.0
    for a in rates[:k]:
        run *= a
        total += run
    return total


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
