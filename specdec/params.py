"""Generation parameters and their validation (everything is checked before compute)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# A draft longer than this costs more in wasted draft forwards than it can ever save;
# values above it are almost certainly a typo (e.g. 4000 for 4).
MAX_DRAFT_TOKENS = 64
# The longest draft num_draft_tokens="auto" considers.
AUTO_MAX_DRAFT_TOKENS = 8


@dataclass(frozen=True)
class GenerationParams:
    """One request's decoding settings, resolved and validated."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | tuple[int, ...] | None = None  # one seed for every row, or one per row
    drafter: str = "auto"
    num_draft_tokens: int | str = "auto"  # an int fixes K; "auto" chooses it every step
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adaptive_draft(self) -> bool:
        """True when the draft length is chosen every step (num_draft_tokens="auto")."""
        return self.num_draft_tokens == "auto"

    @property
    def draft_limit(self) -> int:
        """The most drafts a step may verify: K, or the largest K "auto" considers."""
        return AUTO_MAX_DRAFT_TOKENS if self.adaptive_draft else int(self.num_draft_tokens)

    @property
    def deterministic(self) -> bool:
        """True when the same request always yields the same tokens."""
        return self.greedy or self.seed is not None

    def row_seeds(self, batch: int) -> list[int] | None:
        """The seed of each of `batch` rows, or None when unseeded."""
        if self.seed is None:
            return None
        if isinstance(self.seed, int):
            return [self.seed] * batch
        if len(self.seed) != batch:
            raise ValueError(f"seed has {len(self.seed)} entries but there are {batch} prompts; pass one seed per prompt")
        return list(self.seed)

    def for_row(self, index: int, batch: int) -> "GenerationParams":
        """These params as they apply to one row (a per-row seed becomes that row's int)."""
        if self.seed is None or isinstance(self.seed, int):
            return self
        if len(self.seed) != batch:
            self.row_seeds(batch)  # raises the length error
        return replace(self, seed=self.seed[index])

    def for_rows(self, indices: list[int], batch: int) -> "GenerationParams":
        """These params for a subset of the rows."""
        seeds = self.row_seeds(batch)
        if seeds is None or isinstance(self.seed, int):
            return self
        return replace(self, seed=tuple(seeds[i] for i in indices))


def _check_int(name: str, value, *, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}; {hint}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {hint}")
    return value


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def make_params(
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    drafter: str = "auto",
    num_draft_tokens: int | str = "auto",
    stop_token_ids=None,
    ignore_eos: bool = False,
) -> GenerationParams:
    """Validate user-facing generation arguments and return GenerationParams."""
    _check_int("max_new_tokens", max_new_tokens, minimum=0, hint="pass the number of tokens to generate")
    temperature = _check_float("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}; use 0 for greedy decoding")
    _check_int("top_k", top_k, minimum=0, hint="use 0 to disable top-k filtering")
    top_p = _check_float("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to disable nucleus filtering")
    if isinstance(seed, (list, tuple)):
        for s in seed:
            _check_int("seed", s, minimum=0, hint="pass non-negative ints, one per prompt")
        seed = tuple(seed)
    elif seed is not None:
        _check_int("seed", seed, minimum=0, hint="pass a non-negative int, a list of them (one per prompt), or None")
    if not isinstance(drafter, str):
        raise TypeError(f"drafter must be a str, got {type(drafter).__name__} {drafter!r}")
    if isinstance(num_draft_tokens, str):
        if num_draft_tokens != "auto":
            raise ValueError(
                f'num_draft_tokens must be an int or "auto", got {num_draft_tokens!r}; "auto" chooses '
                "the draft length every step from measured costs and acceptance"
            )
    elif _check_int(
        "num_draft_tokens", num_draft_tokens, minimum=0, hint='0 disables drafting; "auto" chooses it every step'
    ) > MAX_DRAFT_TOKENS:
        raise ValueError(
            f"num_draft_tokens={num_draft_tokens} is larger than the supported maximum of "
            f"{MAX_DRAFT_TOKENS}; typical values are 2 to 8"
        )
    if stop_token_ids is None:
        stops: tuple[int, ...] = ()
    else:
        if isinstance(stop_token_ids, int):
            stop_token_ids = [stop_token_ids]
        stops = tuple(stop_token_ids)
        for t in stops:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got {list(stops)!r}")
    if not isinstance(ignore_eos, bool):
        raise TypeError(f"ignore_eos must be a bool, got {ignore_eos!r}")
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
        stop_token_ids=stops,
        ignore_eos=ignore_eos,
    )
