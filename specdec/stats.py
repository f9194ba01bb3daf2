"""Per-request results and the speculative-decoding metrics, each defined once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    """Counters for one row of a request; the derived metrics are properties."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # verification steps (the prefill's last logits serve the first one)
    draft_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)  # [K] drafts offered at slot i
    accepted_per_position: list[int] = field(default_factory=list)  # [K] drafts accepted at slot i
    draft_lengths: dict[int, int] = field(default_factory=dict)  # drafts offered in a step -> steps
    drafter_steps: dict[str, int] = field(default_factory=dict)  # drafter that drafted a step -> steps
    # cache_hit: the response came from the cache without the decode loop (a trusted entry,
    # or a cached response the target's one checking forward confirmed to the end).
    cache_hit: bool = False
    # cache_kind: what the cache contributed. "trusted" (authenticated, served without a
    # forward), "verified" (every cached token needed was confirmed), "partial" (a prefix
    # was confirmed, decoding went on from the first mismatch), "rejected" (the first
    # cached token was wrong), or None (no entry used).
    cache_kind: str | None = None
    cache_verified_tokens: int = 0  # cached tokens the target confirmed (kept without decoding)
    cache_errors: int = 0
    wall_time_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward, bonus/correction token included (tau)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """P(draft slot i accepted | slot i drafted) for each slot."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def record_step(self, drafted: int, accepted: int, emitted: int, drafter: str | None = None) -> None:
        """Account one verification step of this row."""
        self.target_forwards += 1
        self.draft_lengths[drafted] = self.draft_lengths.get(drafted, 0) + 1
        if drafter is not None and drafted:
            self.drafter_steps[drafter] = self.drafter_steps.get(drafter, 0) + 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.new_tokens += emitted
        if len(self.drafted_per_position) < drafted:
            grow = drafted - len(self.drafted_per_position)
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(drafted):
            self.drafted_per_position[i] += 1
            if i < accepted:
                self.accepted_per_position[i] += 1

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("acceptance_rate", "mean_accepted_length", "per_position_acceptance", "tokens_per_second"):
            out[name] = getattr(self, name)
        return out


@dataclass
class GenerationResult:
    """One prompt's output."""

    text: str | None  # decoded new tokens; None without a tokenizer
    token_ids: list[int]  # new tokens only (a stop token that ended the row is included)
    finish_reason: str  # "stop" (stop/eos token) or "length" (max_new_tokens)
    stats: GenerationStats
