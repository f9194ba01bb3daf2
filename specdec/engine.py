"""The speculative decoding loop.

One step for a batch of B active rows:
  1. the drafter proposes up to K tokens per row (with draft probs q if it is a model);
  2. one target forward over [last emitted token, d1..dK] per row -> logits [B, K+1, V];
  3. verify -> emitted tokens [B, K+1] (-1 padded) and num_accepted [B];
  4. append per row, roll the KV caches back past the kept tokens, apply stop tokens
     and max_new_tokens, drop finished rows from the batch.

KV caches: rows have different prompt lengths and accept different numbers of tokens,
so every model keeps one DynamicCache for the batch plus a 2-D validity mask
[B, S]. Left padding and rejected draft slots are holes (mask 0); position ids are
counted from valid tokens only, so each row sees exactly the positions and keys it
would see alone. Columns that are holes in every row are cropped from the tail, so a
batch of one never carries a hole. Plain autoregressive decoding is the same loop with
drafter "none" (K = 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generator

import torch
from transformers import DynamicCache

from . import kernels
from .drafters.base import DraftProposal, Drafter
from .params import GenerationParams
from .stats import GenerationStats

if TYPE_CHECKING:
    from .generator import SpeculativeGenerator


# --------------------------------------------------------------------------- KV state


class KVState:
    """A model's KV cache for a batch of rows, with holes marked in a validity mask."""

    def __init__(
        self, model: torch.nn.Module, batch_size: int, device: torch.device, vocab_size: int | None = None
    ) -> None:
        self.model = model
        self.device = device
        # Ids at or past the model's vocabulary (a draft whose table is a prefix of the
        # target's) are clamped: it only costs draft quality, never correctness.
        self.max_id = (vocab_size - 1) if vocab_size else None
        self.cache = DynamicCache()
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # [B, S]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] valid tokens
        self.forwards = 0

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]; values in hole slots are ignored
        valid: torch.Tensor,  # [B, T] bool: which inputs are real tokens
        logits_to_keep: int = 0,  # 0 = logits for all T positions
    ) -> torch.Tensor:  # [B, T or logits_to_keep, V]
        valid_long = valid.to(torch.long)
        # A row's position = number of valid tokens before it (holes do not count).
        positions = (self.lengths.unsqueeze(1) + valid_long.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([self.mask, valid_long], dim=1)
        kwargs = {}
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(
            input_ids=input_ids.clamp(min=0, max=self.max_id),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.cache = out.past_key_values
        self.mask = mask
        self.lengths = self.lengths + valid_long.sum(1)
        self.forwards += 1
        return out.logits.to(self.device)

    def rollback(self, keep: torch.Tensor) -> None:  # [B, T] bool over the last T columns
        """Invalidate the last T columns where `keep` is False, then crop dead tail columns."""
        t = keep.shape[1]
        if t == 0:
            return
        self.mask = torch.cat([self.mask[:, :-t], self.mask[:, -t:] * keep.to(torch.long)], dim=1)
        self.lengths = self.mask.sum(1)
        self._crop_tail()

    def select_rows(self, rows: torch.Tensor) -> None:  # [B'] int64 indices of rows to keep
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.lengths = self.lengths[rows]
        self._crop_tail()

    def _crop_tail(self) -> None:
        alive = self.mask.any(dim=0)  # [S]
        width = self.mask.shape[1]
        if width == 0:
            return
        last_alive = int(torch.nonzero(alive).max()) + 1 if bool(alive.any()) else 0
        if last_alive < width:
            self.cache.crop(last_alive - width)  # negative: number of columns to drop
            self.mask = self.mask[:, :last_alive]


def left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and [B, T] validity for left-padded rows."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            valid[i, width - len(row):] = True
    return ids.to(device), valid.to(device)


def prefill(kv: KVState, prompts: list[list[int]]) -> None:
    """Feed every prompt token but the last (the last one opens the first step)."""
    ids, valid = left_pad([p[:-1] for p in prompts], kv.device)
    if ids.shape[1]:
        kv.forward(ids, valid, logits_to_keep=1)


# --------------------------------------------------------------------------- randomness


class RowRandom:
    """Noise for sampling.

    Without a seed, one generator feeds the whole batch. With a seed, each row's noise
    is drawn from a generator seeded by (seed, the row's current length, stream), a
    counter-based scheme: a row's tokens then depend on nothing but its own prompt and
    the seed, not on which other rows share its batch or how long their drafts are.
    Every step has a distinct length, so its noise is fresh.
    """

    UNIFORM_STREAM = 0
    BONUS_STREAM = 1
    DRAFT_STREAM = 2  # + draft slot index

    def __init__(self, seeds: list[int] | None, device: torch.device, batch_size: int) -> None:
        self.device = device
        self.seeds = seeds  # per active row
        self.batch_size = batch_size
        self.shared: torch.Generator | None = None
        if seeds is None:
            self.shared = torch.Generator(device=device)
            self.shared.seed()
        self._row_gen = torch.Generator(device=device)

    def _row(self, seed: int, counter: int, stream: int) -> torch.Generator:
        return self._row_gen.manual_seed(_splitmix64(seed, counter, stream))

    def uniform(self, k: int, width: int, dtype: torch.dtype, counters: list[int]) -> torch.Tensor:  # [B, k]
        """k uniforms per row; seeded rows always draw `width` >= k and keep the first k."""
        if self.shared is not None:
            return torch.rand(self.batch_size, k, generator=self.shared, device=self.device, dtype=dtype)
        return torch.stack(
            [torch.rand(width, generator=self._row(s, c, self.UNIFORM_STREAM), device=self.device, dtype=dtype)[:k]
             for s, c in zip(self.seeds, counters)]
        )

    def exponential(self, v: int, dtype: torch.dtype, counters: list[int], stream: int) -> torch.Tensor:  # [B, v]
        if self.shared is not None:
            return torch.empty(self.batch_size, v, device=self.device, dtype=dtype).exponential_(generator=self.shared)
        return torch.stack(
            [torch.empty(v, device=self.device, dtype=dtype).exponential_(generator=self._row(s, c, stream))
             for s, c in zip(self.seeds, counters)]
        )

    def select_rows(self, rows: list[int]) -> None:
        self.batch_size = len(rows)
        if self.seeds is not None:
            self.seeds = [self.seeds[i] for i in rows]


def _splitmix64(*values: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 finaliser over each value)."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state + (v & mask) + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        state = z ^ (z >> 31)
    return state >> 1


# --------------------------------------------------------------------------- request state


@dataclass
class DecodeState:
    """What drafters may read about the request being decoded."""

    sequences: list[list[int]]  # per active row: prompt + emitted tokens
    prompt_lengths: list[int]  # per active row
    params: GenerationParams
    device: torch.device
    rng: RowRandom
    noise_dtype: torch.dtype
    cache_layer: Any = None
    rows: list[int] = field(default_factory=list)  # original batch index of each active row
    # The last step's outcome on the host, set before Drafter.observe, so that drafters
    # need no device-to-host copies of their own:
    step_accepted: list[int] = field(default_factory=list)  # [B] drafts accepted per row
    step_emitted: list[list[int]] = field(default_factory=list)  # [B][<= K+1] tokens emitted, no padding

    @property
    def batch_size(self) -> int:
        return len(self.sequences)


@dataclass
class RowOutput:
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


# --------------------------------------------------------------------------- the loop


def decode(
    generator: "SpeculativeGenerator",
    prompts: list[list[int]],
    params: GenerationParams,
    drafter: Drafter,
    stop_ids: frozenset[int],
    cache_layer: Any = None,
    stop_check: Callable[[list[int]], bool] | None = None,
) -> list[RowOutput]:
    """Decode every prompt; returns one RowOutput per prompt, in order."""
    steps = iter_decode(generator, prompts, params, drafter, stop_ids, cache_layer, stop_check)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def iter_decode(
    generator: "SpeculativeGenerator",
    prompts: list[list[int]],
    params: GenerationParams,
    drafter: Drafter,
    stop_ids: frozenset[int],
    cache_layer: Any = None,
    stop_check: Callable[[list[int]], bool] | None = None,
) -> Generator[tuple[int, list[int]], None, list[RowOutput]]:
    """Like decode(), but yields (row index, new tokens) as each step emits them.

    `stop_check(row's new tokens) -> True` ends a row early (stop strings); the caller
    cuts the tokens exactly afterwards, so this only saves steps.
    """
    start = time.perf_counter()
    device = generator.device
    batch = len(prompts)
    stats = [GenerationStats(prompt_tokens=len(p)) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    finish: list[str | None] = [None] * batch
    noise_dtype = kernels.compute_dtype(generator.target_dtype)
    state = DecodeState(
        sequences=[list(p) for p in prompts],
        prompt_lengths=[len(p) for p in prompts],
        params=params,
        device=device,
        rng=RowRandom(params.row_seeds(batch), device, batch),
        noise_dtype=noise_dtype,
        cache_layer=cache_layer,
        rows=list(range(batch)),
    )

    if params.max_new_tokens == 0:
        return _finish(outputs, ["length"] * batch, stats, start)

    target = KVState(generator.target_model, batch, device)
    prefill(target, prompts)
    drafter.start(state)
    last = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)  # [B]

    while state.rows:
        remaining = [params.max_new_tokens - len(outputs[r]) for r in state.rows]
        # Never draft past max_new_tokens: a row emits at most num_accepted + 1 tokens.
        k = max(0, min(params.num_draft_tokens, max(remaining) - 1))
        proposal = drafter.propose(state, k) if k else _no_drafts(state.batch_size, device)
        num_draft = torch.minimum(
            proposal.num_draft, torch.tensor([r - 1 for r in remaining], device=device)
        ).clamp(min=0)  # [B]
        k = proposal.tokens.shape[1]

        inputs = torch.cat([last.unsqueeze(1), proposal.tokens], dim=1)  # [B, k+1]
        slots = torch.arange(k + 1, device=device).unsqueeze(0)  # [1, k+1]
        valid = slots <= num_draft.unsqueeze(1)  # [B, k+1]
        logits = target.forward(inputs, valid)  # [B, k+1, V]
        tokens, num_accepted = _verify(state, proposal, logits, num_draft)
        if k:  # with no drafts the one fed token is always kept
            target.rollback(slots <= num_accepted.unsqueeze(1))

        state.step_emitted = [[t for t in r if t >= 0] for r in tokens.tolist()]  # host copy of the step
        state.step_accepted = [len(e) - 1 for e in state.step_emitted]
        drafted_rows = num_draft.tolist()
        finished_now = []
        new_last = []
        for b, row in enumerate(state.rows):
            emitted = state.step_emitted[b]
            accepted = state.step_accepted[b]
            kept, reason = _apply_limits(emitted, stop_ids, remaining[b])
            outputs[row].extend(kept)
            if reason is None and stop_check is not None and stop_check(outputs[row]):
                reason = "stop"
            state.sequences[b].extend(kept)
            stats[row].record_step(drafted_rows[b], accepted, len(kept))
            stats[row].draft_forwards += k if drafter.provides_probs else 0
            if kept:
                yield row, kept
            if reason is not None:
                finish[row] = reason
                finished_now.append(b)
            new_last.append(kept[-1])
        drafter.observe(state, num_accepted, tokens)
        last = torch.tensor(new_last, dtype=torch.long, device=device)

        if finished_now:
            done = set(finished_now)
            keep = [b for b in range(state.batch_size) if b not in done]
            if not keep:
                break
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            target.select_rows(keep_t)
            drafter.select_rows(keep_t)
            state.rng.select_rows(keep)
            state.sequences = [state.sequences[b] for b in keep]
            state.prompt_lengths = [state.prompt_lengths[b] for b in keep]
            state.rows = [state.rows[b] for b in keep]
            last = last[keep_t]

    drafter.finish(state)
    return _finish(outputs, finish, stats, start)


def _no_drafts(batch: int, device: torch.device) -> DraftProposal:
    return DraftProposal(
        tokens=torch.empty(batch, 0, dtype=torch.long, device=device),
        num_draft=torch.zeros(batch, dtype=torch.long, device=device),
    )


def _verify(
    state: DecodeState,
    proposal: DraftProposal,
    logits: torch.Tensor,  # [B, k+1, V]
    num_draft: torch.Tensor,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:
    params = state.params
    draft_tokens = proposal.tokens  # [B, k]
    if params.greedy:
        if draft_tokens.shape[1] == 0:  # nothing to verify: plain greedy decoding
            return torch.argmax(logits[:, 0], dim=-1, keepdim=True), torch.zeros_like(num_draft)
        return kernels.verify_greedy(draft_tokens, logits, num_draft)
    k = draft_tokens.shape[1]
    probs = proposal.probs  # [B, k, V_draft] or None
    if probs is not None and probs.shape[-1] < logits.shape[-1]:
        # A draft vocabulary may be a prefix of the target's (padded embedding tables).
        probs = torch.nn.functional.pad(probs, (0, logits.shape[-1] - probs.shape[-1]))
    counters = [len(s) for s in state.sequences]
    uniforms = state.rng.uniform(k, params.num_draft_tokens, state.noise_dtype, counters)  # [B, k]
    exponentials = state.rng.exponential(
        logits.shape[-1], state.noise_dtype, counters, RowRandom.BONUS_STREAM
    )  # [B, V]
    return kernels.verify_sampling(
        draft_tokens,
        probs,
        logits,
        uniforms,
        exponentials,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        num_draft=num_draft,
    )


def _apply_limits(emitted: list[int], stop_ids: frozenset[int], remaining: int) -> tuple[list[int], str | None]:
    """Cut a step's tokens at the first stop token (kept) or at max_new_tokens."""
    for i, t in enumerate(emitted[:remaining]):
        if t in stop_ids:
            return emitted[: i + 1], "stop"
    kept = emitted[:remaining]
    return kept, ("length" if len(kept) >= remaining else None)


def _finish(outputs, finish, stats, start) -> list[RowOutput]:
    elapsed = time.perf_counter() - start
    for s in stats:
        s.wall_time_s = elapsed
    return [RowOutput(o, f or "length", s) for o, f, s in zip(outputs, finish, stats)]
