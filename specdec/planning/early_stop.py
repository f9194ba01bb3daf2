"""Early stop of a draft model's drafting within a step (lossless: drafts only shrink).

The draft's own probability q of the token it proposes predicts its acceptance: a
calibration table (specdec.planning.acceptance.ConfidenceCalibration) maps q to the
observed acceptance a(q), and a row stops at the first slot whose expected extra tokens
per second fall below the step's expected rate, so the threshold follows from the cost
model instead of being a constant (transformers' `assistant_confidence_threshold`,
llama.cpp's `p_min`).
"""

from __future__ import annotations

import torch


def stop_bars(rates: list[float], costs: list[float], rate: float) -> list[float]:
    """bars[i-1]: the least chance reached_i that slot i's drafts are all accepted at which
    drafting on past slot i (1-based) still pays.

    rates: a_1..a_k; costs[j]: seconds of a step with j drafts (j = 0..k); rate: the step's
    expected tokens per second. Drafting on to slot j > i pays when
    reached_i * G(i, j) >= rate * (costs[j] - costs[i]), with G(i, j) = sum_{m=i+1..j}
    prod_{l=i+1..m} a_l the tokens slots i+1..j add once slot i is reached. Looking to every
    j, not only i+1, keeps a slot that pays only with the ones after it.
    """
    k = len(costs) - 1
    bars = []
    for i in range(1, k):
        best, gain, run = float("inf"), 0.0, 1.0
        for j in range(i + 1, k + 1):
            run *= rates[j - 1]
            gain += run  # G(i, j)
            if gain > 0:
                best = min(best, rate * max(costs[j] - costs[i], 0.0) / gain)
        bars.append(best)
    return bars


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
