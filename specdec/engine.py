"""The speculative decoding loop.

One step for a batch of B active rows:
  1. the planner (specdec.planning) chooses per row which source drafts and how many
     tokens, and its sources propose them (with draft probs q from a model);
  2. one target forward over [last emitted token, d1..dK] per row -> logits [B, K+1, V];
  3. verify -> emitted tokens [B, K+1] (-1 padded) and num_accepted [B];
  4. on the device: roll the target KV back to the kept tokens (a length change), apply
     stop tokens and max_new_tokens, pick each row's new last token;
  5. ONE device-to-host copy of the step's outcome, which the stream, the stats and the
     drafters share; rows that finished leave the batch (KV and drafter state compacted).

The prefill feeds each whole prompt, and its logits after the last prompt token stand in
for the first step's forward over that token: the first step feeds only its drafts (none:
no forward at all). transformers' `generate` computes the first token the same way, and
in bfloat16 the order of operations decides ties (see specdec.kv).

DecodeBatch holds the loop's state and runs one step at a time: each row has its own budget,
stop ids and stop check (and, in a server's batch, its own sampling settings), finished rows
leave, and the rows of another batch join between steps (merge: continuous batching, see
specdec.serving). iter_decode() and decode() drive one request's batch to the end.

Plain autoregressive decoding is the same loop with drafter "none" (no sources). KV state
(static per-row or generic, chosen per model) lives in specdec.kv, the counter-based
noise in specdec.noise, the drafter-facing DecodeState in specdec.drafters.base.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Callable, Generator

import torch

from . import kernels, noise
from .drafters.base import DecodeState, DraftProposal, Drafter, row_settings
from .drafters.model import MAX_PENDING
from .kv import BUCKET, engine_path, make_kv, prefill_logits
from .params import GenerationParams
from .planning import Planner
from .stats import GenerationStats

# Draft-model pending windows can run this far past a row's length (see drafters.model).
_WRITE_SLACK = MAX_PENDING + 2

_RUNNING, _STOPPED, _LENGTH = 0, 1, 2


@dataclass
class RowOutput:
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats


def decode(
    target_model: torch.nn.Module,
    prompts: list[list[int]],
    params: GenerationParams,
    drafters: list[Drafter],
    stop_ids: frozenset[int],
    *,
    device: torch.device,
    dtype: torch.dtype,
    engine: str = "auto",
    stop_check: Callable[[list[int], int], bool] | None = None,
    plan_memory: dict | None = None,
    numerics: str = "native",
    compiler=None,
) -> list[RowOutput]:
    """Decode every prompt; returns one RowOutput per prompt, in order."""
    steps = iter_decode(
        target_model, prompts, params, drafters, stop_ids,
        device=device, dtype=dtype, engine=engine, stop_check=stop_check, plan_memory=plan_memory,
        numerics=numerics, compiler=compiler,
    )
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def request_capacity(prompts: list[list[int]], params: GenerationParams) -> int:
    """Positions a request can write per row (prompt, output, drafts, slack), in whole buckets."""
    need = max(len(p) for p in prompts) + params.max_new_tokens + params.draft_limit + _WRITE_SLACK
    return -(-need // BUCKET) * BUCKET


def iter_decode(
    target_model: torch.nn.Module,
    prompts: list[list[int]],
    params: GenerationParams,
    drafters: list[Drafter],
    stop_ids: frozenset[int],
    *,
    device: torch.device,
    dtype: torch.dtype,
    engine: str = "auto",
    stop_check: Callable[[list[int], int], bool] | None = None,
    plan_memory: dict | None = None,
    numerics: str = "native",
    compiler=None,
) -> Generator[tuple[int, list[int]], None, list[RowOutput]]:
    """Like decode(), but yields (row index, new tokens) as each step emits them.

    drafters: the request's sources (none: plain decoding); the planner (specdec.planning)
    decides every step which of them drafts for each row, and how many tokens.
    `stop_check(row's new tokens, how many this step added) -> True` ends a row early (stop
    strings); the caller cuts the tokens exactly afterwards, so this only saves steps.
    plan_memory: a dict the caller keeps across requests; unseeded K "auto" starts from
    what the last one learned.
    numerics: "stable" computes the target's final norm and LM head in float32 and its
    attention eagerly (specdec.numerics).
    compiler: a specdec.compiled.StepCompiler (compile=True): the static path's step forwards
    run compiled where the request earns it (StepCompiler.ready_for).
    """
    start = time.perf_counter()
    if params.max_new_tokens == 0:
        return _finish([[] for _ in prompts], ["length"] * len(prompts),
                       [GenerationStats(prompt_tokens=len(p)) for p in prompts], start)
    batch = DecodeBatch(
        target_model, prompts, params, drafters, [stop_ids] * len(prompts),
        device=device, dtype=dtype, engine=engine, stop_checks=[stop_check] * len(prompts),
        plan_memory=plan_memory, numerics=numerics, compiler=compiler,
    )
    while batch.rows:
        yield from batch.step()
    batch.close()
    done = batch.take_finished()
    elapsed = time.perf_counter() - start
    for out in done.values():  # a request's rows share its wall time
        out.stats.wall_time_s = elapsed
    return [done[row] for row in range(len(prompts))]


class DecodeBatch:
    """Rows decoding together, one step() at a time (see the module docstring).

    Each row has its own prompt, budget (max_new_tokens), stop ids and stop check, and ends
    on its own; finished rows leave the batch (take_finished() hands out their outputs). The
    rows of another batch with the same settings and sources can join between two steps
    (merge): continuous batching (specdec.serving). Row ids are the caller's (`row_ids`,
    default 0..B-1).
    """

    def __init__(
        self,
        target_model: torch.nn.Module,
        prompts: list[list[int]],
        params: GenerationParams,
        drafters: list[Drafter],
        stop_ids: list[frozenset[int]],  # [B] each row's stop token ids
        *,
        device: torch.device,
        dtype: torch.dtype,
        engine: str = "auto",
        stop_checks: list[Callable[[list[int], int], bool] | None] | None = None,  # [B]
        budgets: list[int] | None = None,  # [B] max_new_tokens per row (default params.max_new_tokens)
        row_sampling: list[tuple[float, int, float]] | None = None,  # [B] (temperature, top_k, top_p) per row
        row_ids: list[int] | None = None,  # [B]
        plan_memory: dict | None = None,
        numerics: str = "native",
        compiler=None,
    ) -> None:
        self.start_time = time.perf_counter()
        batch = len(prompts)
        self.device = device
        self.params = params
        row_ids = list(range(batch)) if row_ids is None else list(row_ids)
        budgets = [params.max_new_tokens] * batch if budgets is None else list(budgets)
        if min(budgets) < 1:
            raise ValueError(f"every row of a DecodeBatch needs max_new_tokens >= 1, got {budgets}")
        self.budget = dict(zip(row_ids, budgets))
        self.stats = {r: GenerationStats(prompt_tokens=len(p)) for r, p in zip(row_ids, prompts)}
        self.outputs: dict[int, list[int]] = {r: [] for r in row_ids}
        self.stop_checks = dict(zip(row_ids, stop_checks or [None] * batch))
        self.started = {r: self.start_time for r in row_ids}
        self.finished: dict[int, RowOutput] = {}

        capacity = max(request_capacity([p], dataclasses.replace(params, max_new_tokens=n)) for p, n in zip(prompts, budgets))
        self.path = engine_path(target_model, engine, capacity)
        compiled = (
            compiler is not None and self.path == "static" and numerics == "native"
            and compiler.ready_for(batch, max(budgets))
        )
        state = DecodeState(
            sequences=[list(p) for p in prompts],
            params=params,
            device=device,
            noise_dtype=kernels.compute_dtype(dtype),
            seeds=noise.request_seeds(params.row_seeds(batch), batch, device),
            seq_lens=torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device),
            new_kv=functools.partial(
                _draft_kv, engine if self.path == "static" else "generic", batch, capacity, device,
                compiler if compiled else None,
            ),
            rows=row_ids,
        )
        state.compiled = compiled
        state.compiler = compiler if compiled else None
        state.row_sampling = list(row_sampling) if row_sampling is not None else [row_settings(params)] * batch
        self.state = state
        self.stops = _stop_rows(stop_ids, device)  # [B, S]
        self.target = make_kv(
            target_model, self.path, batch, capacity, device, numerics=numerics,
            compiled=compiler.forward_for(target_model, "target") if compiled else None,
        )
        self.planner = planner = Planner(params, drafters, batch, device, plan_memory)
        self.hidden_states = planner.hidden_states  # False, True (the last layer) or the layers read
        planner.mark("start")
        # The whole prompt in one forward, as transformers computes it: its logits after the last
        # prompt token serve the first step, which then feeds only its drafts (see _verify_forward).
        logits, prompt_hidden = prefill_logits(self.target, prompts, hidden=self.hidden_states, all_hidden=True)
        self.opening = (logits, None)  # [B, 1, V]
        if prompt_hidden is not None:  # [B, P, H]: drafters that read hidden states start from every position's
            last = torch.tensor([len(p) - 1 for p in prompts], device=device).view(-1, 1, 1)
            self.opening = (logits, prompt_hidden.gather(1, last.expand(-1, 1, prompt_hidden.shape[-1])))
            state.target_hidden = prompt_hidden
        planner.mark("target")
        planner.start(state, max(len(p) for p in prompts))
        state.target_hidden = None
        self.last = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)  # [B]

    @property
    def rows(self) -> list[int]:
        """The ids of the rows still decoding, in batch order."""
        return self.state.rows

    @property
    def can_merge(self) -> bool:
        """Whether other batches' rows can join this one (static KV, drafters that merge)."""
        return self.target.can_merge and all(type(d).can_merge() for d in self.planner.sources.values())

    def step(self) -> list[tuple[int, list[int]]]:
        """One decoding step of every row: returns (row id, new tokens) for each row that emitted
        any. Rows that finished leave the batch; their outputs wait in take_finished()."""
        state, planner, params, device = self.state, self.planner, self.params, self.device
        outputs = self.outputs
        remaining = [self.budget[r] - len(outputs[r]) for r in state.rows]
        # Never draft past max_new_tokens: a row emits at most num_accepted + 1 tokens.
        row_caps = [max(0, min(params.draft_limit, n - 1)) for n in remaining]
        proposal = planner.propose(state, max(row_caps), row_caps)
        remaining_t = torch.tensor(remaining, dtype=torch.long, device=device)  # [B]
        num_draft = torch.minimum(proposal.num_draft, remaining_t - 1).clamp(min=0)  # [B]
        k = proposal.tokens.shape[1]

        # 2. one target forward over [last, d1..dk]; each row's real slots are a prefix.
        timed = self.opening is None  # the first step's forward is the prefill's, timed with it
        logits, hidden, before = _verify_forward(
            self.target, self.last, proposal.tokens, num_draft, self.opening, self.hidden_states
        )  # [B, k+1, V], [B, k+1, H] or None, [B]
        self.opening = None
        verify = _verify_by_position if planner.verify_by_position else _verify
        tokens, num_accepted = _verify_rows(verify, state, proposal, logits, num_draft)  # [B, k+1], [B]
        planner.mark("verified")

        # 4. device-side bookkeeping: nothing here reads a value back to the host.
        kept, reason = _limits(tokens, num_accepted, remaining_t, self.stops)  # [B], [B]
        self.last = tokens.gather(1, (kept - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [B]
        state.seq_lens = state.seq_lens + kept
        state.step_tokens, state.step_num_accepted, state.target_hidden = tokens, num_accepted, hidden

        # 5. the step's one device-to-host transfer.
        confident = planner.wants_confidence and proposal.confidence is not None and k > 0
        planner.mark("done")
        out = StepOutcome.read(tokens, num_accepted, num_draft, kept, reason, proposal.confidence if confident else None)
        state.step_accepted = out.accepted
        state.step_emitted = [row[: n + 1] for row, n in zip(out.tokens, out.accepted)]
        if k:  # with no drafts the one fed token is always kept
            bound = max(len(s) + n for s, n in zip(state.sequences, out.kept)) - 1
            self.target.set_lengths(_rollback_lengths(before, num_accepted, num_draft), bound)
        emitted, finished_now = [], []
        for b, (row, seq) in enumerate(zip(state.rows, state.sequences)):
            new = out.tokens[b][: out.kept[b]]
            outputs[row].extend(new)
            seq.extend(new)
            stats = self.stats[row]
            stats.record_step(out.drafted[b], out.accepted[b], out.kept[b], proposal.sources[b])
            stats.draft_forwards += proposal.draft_forwards
            if new:
                emitted.append((row, new))
            why = out.reason[b]
            check = self.stop_checks[row]
            if why == _RUNNING and check is not None and check(outputs[row], len(new)):
                why = _STOPPED  # a stop string: the row's KV needs no rollback, it leaves the batch
            if why != _RUNNING:
                self._retire(row, "stop" if why == _STOPPED else "length")
                finished_now.append(b)
        state.step_drafted, state.step_sources = out.drafted, proposal.sources
        planner.observe(state, out.confidence, timed=timed)
        if finished_now:
            done = set(finished_now)
            self._keep([b for b in range(state.batch_size) if b not in done])
        return emitted

    def drop(self, row_ids: list[int], reason: str) -> None:
        """End these rows now (cancelled, past a deadline): they leave the batch with what they
        have, under `reason`."""
        gone = set(row_ids)
        for row in row_ids:
            if row in self.outputs and row not in self.finished:
                self._retire(row, reason)
        self._keep([b for b, r in enumerate(self.state.rows) if r not in gone])

    def take_finished(self) -> dict[int, RowOutput]:
        """The outputs of the rows that finished since the last call, by row id."""
        done, self.finished = self.finished, {}
        return done

    def merge(self, other: "DecodeBatch") -> None:
        """Append the rows of `other` after this batch's, between two steps of each (after
        `other`'s first step, whose forward the prefill stands in for). Both batches must
        have the same sampling settings, drafters and KV path (see batch_key in
        specdec.serving.scheduler); each row decodes on exactly as it would alone."""
        if other.opening is not None or self.opening is not None:
            raise ValueError("a batch merges after its first step")
        if not (self.can_merge and other.can_merge):
            raise ValueError("these batches cannot merge (a KV path or drafter without merge support)")
        if self.state.compiled != other.state.compiled or self.path != other.path:
            raise ValueError("only batches on the same engine path merge")
        self.planner.check_merge(other.planner)  # before anything changes
        mine, theirs = self.state, other.state
        self.target.merge(other.target)
        self.planner.merge(other.planner, mine, theirs)
        width = max(mine.step_tokens.shape[1], theirs.step_tokens.shape[1])
        pad = torch.nn.functional.pad
        mine.step_tokens = torch.cat([pad(t, (0, width - t.shape[1]), value=-1) for t in (mine.step_tokens, theirs.step_tokens)])
        mine.step_num_accepted = torch.cat([mine.step_num_accepted, theirs.step_num_accepted])
        mine.target_hidden = None  # read within a step only
        for name in ("sequences", "rows", "row_sampling", "step_accepted", "step_emitted", "step_drafted", "step_sources"):
            setattr(mine, name, getattr(mine, name) + getattr(theirs, name))
        mine.seeds = torch.cat([mine.seeds, theirs.seeds])
        mine.seq_lens = torch.cat([mine.seq_lens, theirs.seq_lens])
        self.last = torch.cat([self.last, other.last])
        stop_width = max(self.stops.shape[1], other.stops.shape[1])
        self.stops = torch.cat([pad(s, (0, stop_width - s.shape[1]), value=_NO_STOP) for s in (self.stops, other.stops)])
        for name in ("budget", "stats", "outputs", "stop_checks", "started", "finished"):
            getattr(self, name).update(getattr(other, name))
        other.state.rows = []  # its rows live here now

    def close(self) -> None:
        """The batch is done with (no rows left, or the caller drops it): the drafters finish."""
        self.planner.finish(self.state)

    def _retire(self, row: int, reason: str) -> None:
        stats = self.stats.pop(row)
        stats.wall_time_s = time.perf_counter() - self.started.pop(row)
        self.finished[row] = RowOutput(self.outputs.pop(row), reason, stats)
        del self.budget[row], self.stop_checks[row]

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == self.state.batch_size:
            return
        if not keep:
            self.state.rows = []
            return
        _select_rows(self.state, self.target, self.planner, keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.last = self.last.index_select(0, index)
        self.stops = self.stops.index_select(0, index)


_NO_STOP = -2  # pads a row's stop ids (emitted tokens are >= 0, padding slots -1)


def _stop_rows(stop_ids: list[frozenset[int]], device: torch.device) -> torch.Tensor:  # [B, S]
    """Each row's stop ids, padded with _NO_STOP."""
    width = max((len(s) for s in stop_ids), default=0)
    rows = [sorted(s) + [_NO_STOP] * (width - len(s)) for s in stop_ids]
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(stop_ids), width)


# --------------------------------------------------------------------------- step helpers


def _draft_kv(
    engine: str, batch: int, capacity: int, device: torch.device, compiler, model, vocab_size: int | None
):
    """KV state for a drafter's model: the target's path where that model allows it (compiled
    with the target's when the request runs compiled)."""
    path = engine_path(model, "auto" if engine == "auto" else engine, capacity, role="draft")
    compiled = compiler.forward_for(model, "draft") if compiler is not None and path == "static" else None
    return make_kv(model, path, batch, capacity, device, vocab_size, compiled=compiled)


def _verify_forward(
    target,
    last: torch.Tensor,  # [B] each row's last emitted token (the prompt's last on the first step)
    drafts: torch.Tensor,  # [B, k]
    num_draft: torch.Tensor,  # [B] real drafts per row (a prefix)
    opening: tuple[torch.Tensor, torch.Tensor | None] | None,  # the prefill's [B, 1, V], [B, 1, H]
    hidden: bool | tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:  # logits [B, k+1, V], hidden, lengths before `last` [B]
    """The target's logits over [last, d1..dk] per row, and the KV lengths a rollback counts from.

    On the first step `last` is the prompt's last token, which the prefill has already fed
    (`opening` holds its logits): only the drafts go through the model, so the first token
    comes from the forward over the whole prompt, as in transformers, and a step without
    drafts runs no forward at all.
    """
    if opening is None:
        before = target.lengths  # [B]
        inputs = torch.cat([last.unsqueeze(1), drafts], dim=1)  # [B, k+1]
        logits, states = target.forward(inputs, num_draft + 1, hidden=hidden)
        return logits, states, before
    first_logits, first_states = opening
    before = target.lengths - 1  # the prompt's last token counts as this step's first input
    if drafts.shape[1] == 0:
        return first_logits, first_states, before
    logits, states = target.forward(drafts, num_draft, hidden=hidden)  # [B, k, V]
    logits = torch.cat([first_logits, logits], dim=1)
    states = torch.cat([first_states, states], dim=1) if hidden is not False else None
    return logits, states, before


def _rollback_lengths(
    before: torch.Tensor,  # [B] target KV lengths before the step's forward
    num_accepted: torch.Tensor,  # [B]
    num_draft: torch.Tensor,  # [B]
) -> torch.Tensor:  # [B]
    """Target KV lengths after a step: [last, d_1..d_n] stay, rejected drafts go (the
    emitted correction / bonus token is fed as the next step's first input)."""
    return before + num_accepted + 1


def _verify_rows(
    verify: Callable,
    state: DecodeState,
    proposal: DraftProposal,
    logits: torch.Tensor,  # [B, k+1, V]
    num_draft: torch.Tensor,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, k+1] (-1 padded), num_accepted [B]
    """`verify` for every row; rows with other sampling settings than the batch's (a server's
    batch, DecodeState.row_sampling) are verified group by group, each as it would be alone."""
    groups = state.sampling_groups()
    if groups is None:
        return verify(state, proposal, logits, num_draft)
    batch, width = logits.shape[0], proposal.tokens.shape[1] + 1
    tokens = torch.full((batch, width), -1, dtype=torch.long, device=logits.device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=logits.device)
    for params, rows in groups:
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        part = dataclasses.replace(
            proposal, tokens=proposal.tokens.index_select(0, index), num_draft=proposal.num_draft.index_select(0, index),
            probs=proposal.probs.index_select(0, index) if proposal.probs is not None else None,
            confidence=None, host_rows=None, sources=None,
        )
        t, n = verify(state.subset(rows, params), part, logits.index_select(0, index), num_draft.index_select(0, index))
        tokens[index, : t.shape[1]] = t
        num_accepted[index] = n
    return tokens, num_accepted


def _verify(
    state: DecodeState,
    proposal: DraftProposal,
    logits: torch.Tensor,  # [B, k+1, V]
    num_draft: torch.Tensor,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, k+1] (-1 padded), num_accepted [B]
    params = state.params
    draft_tokens = proposal.tokens  # [B, k]
    if params.greedy:
        if draft_tokens.shape[1] == 0:  # nothing to verify: plain greedy decoding
            return torch.argmax(logits[:, 0], dim=-1, keepdim=True), torch.zeros_like(num_draft)
        return kernels.verify_greedy(draft_tokens, logits, num_draft)
    k = draft_tokens.shape[1]
    probs = proposal.probs  # [B, k, V_draft] or None
    if state.compiled and logits.device.type == "cpu":
        from . import fused  # noise and verification as one compiled graph, the same tokens

        return fused.sample_step(
            state.seeds, state.seq_lens, draft_tokens, probs, logits, num_draft,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, noise_dtype=state.noise_dtype,
        )
    if probs is not None and probs.shape[-1] < logits.shape[-1]:
        # A draft vocabulary may be a prefix of the target's (padded embedding tables).
        probs = torch.nn.functional.pad(probs, (0, logits.shape[-1] - probs.shape[-1]))
    uniforms = state.uniform(noise.UNIFORM_STREAM, k)  # [B, k]
    exponentials = state.exponential(noise.BONUS_STREAM, logits.shape[-1])  # [B, V]
    return kernels.verify_sampling(
        draft_tokens, probs, logits, uniforms, exponentials,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, num_draft=num_draft,
    )


def _verify_by_position(
    state: DecodeState,
    proposal: DraftProposal,
    logits: torch.Tensor,  # [B, k+1, V]
    num_draft: torch.Tensor,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, k+1] (-1 padded), num_accepted [B]
    """Seeded rows drafting from shared state (Planner.verify_by_position): every slot's sample
    is keyed by its absolute position, so the tokens are plain decoding's whatever was drafted."""
    params = state.params
    if params.greedy:  # greedy output never depends on the drafts
        return _verify(state, proposal, logits, num_draft)
    k = proposal.tokens.shape[1]
    if state.compiled and logits.device.type == "cpu":
        from . import fused  # noise and verification as one compiled graph, the same tokens

        return fused.sample_by_position(
            state.seeds, state.seq_lens, proposal.tokens, logits, num_draft,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, noise_dtype=state.noise_dtype,
        )
    exponentials = noise.exponential_by_position(
        state.seeds, state.seq_lens, k + 1, noise.BONUS_STREAM, logits.shape[-1], state.noise_dtype
    )  # [B, k+1, V]: slot j as a step starting j tokens later would draw it
    return kernels.reference.verify_by_position(
        proposal.tokens, logits, exponentials,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, num_draft=num_draft,
    )


def _limits(
    tokens: torch.Tensor,  # [B, k+1] emitted, -1 padded
    num_accepted: torch.Tensor,  # [B]
    remaining: torch.Tensor,  # [B] tokens each row may still emit
    stop_ids: torch.Tensor,  # [B, S] each row's stop ids, padded with _NO_STOP
) -> tuple[torch.Tensor, torch.Tensor]:  # kept [B], reason [B] (_RUNNING / _STOPPED / _LENGTH)
    """Cut each row's tokens at its first stop token (kept) or at max_new_tokens."""
    width = tokens.shape[1]
    emitted = num_accepted + 1  # [B]
    slots = torch.arange(width, device=tokens.device).unsqueeze(0)  # [1, k+1]
    is_stop = (tokens.unsqueeze(2) == stop_ids.unsqueeze(1)).any(2) & (slots < emitted.unsqueeze(1))  # [B, k+1]
    # Tokens up to and including the first stop; width + 1 where there is none.
    first_stop = torch.where(is_stop.any(1), is_stop.to(torch.long).argmax(1) + 1, width + 1)  # [B]
    allowed = torch.minimum(emitted, remaining)
    stopped = first_stop <= allowed
    kept = torch.where(stopped, first_stop, allowed)
    reason = torch.where(stopped, _STOPPED, torch.where(kept >= remaining, _LENGTH, _RUNNING))
    return kept, reason


@dataclass
class StepOutcome:
    """What one step produced for each row, from the step's one device-to-host copy."""

    tokens: list[list[int]]  # [B][k+1] emitted tokens: accepted drafts, the target's token, -1 after
    accepted: list[int]  # [B] drafts accepted
    drafted: list[int]  # [B] drafts verified (num_draft after the step's limits)
    kept: list[int]  # [B] emitted tokens kept after stop tokens and max_new_tokens
    reason: list[int]  # [B] _RUNNING, _STOPPED or _LENGTH
    confidence: list[list[float]] | None  # [B][k] the drafts' confidences, when the planner calibrates

    @classmethod
    def read(
        cls,
        tokens: torch.Tensor,  # [B, k+1] int64
        num_accepted: torch.Tensor,  # [B]
        num_draft: torch.Tensor,  # [B]
        kept: torch.Tensor,  # [B]
        reason: torch.Tensor,  # [B]
        confidence: torch.Tensor | None,  # [B, >= k] in [0, 1], or None
    ) -> "StepOutcome":
        """Pack every field into one int64 tensor and copy it to the host once."""
        k = tokens.shape[1] - 1
        packed = [tokens, torch.stack([num_accepted, num_draft, kept, reason], dim=1)]
        if confidence is not None:  # in millionths, to travel in the same int64 copy
            packed.append((confidence[:, :k].float() * 1e6).round().long())
        host = _to_host(torch.cat(packed, dim=1))
        return cls(
            tokens=[row[: k + 1] for row in host],
            accepted=[row[k + 1] for row in host],
            drafted=[row[k + 2] for row in host],
            kept=[row[k + 3] for row in host],
            reason=[row[k + 4] for row in host],
            confidence=[[c / 1e6 for c in row[k + 5:]] for row in host] if confidence is not None else None,
        )


def _to_host(packed: torch.Tensor) -> list[list[int]]:
    """The step's one device-to-host copy (non-blocking into pinned memory on CUDA)."""
    if packed.is_cuda:
        staging = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        staging.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(packed.device).synchronize()
        packed = staging
    return packed.tolist()


def _select_rows(state: DecodeState, target, planner: Planner, keep: list[int]) -> None:
    """Compact the batch to the rows in `keep` (finished rows stop costing compute)."""
    index = torch.tensor(keep, dtype=torch.long, device=state.device)
    target.select_rows(keep)
    planner.select_rows(keep)
    state.sequences = [state.sequences[b] for b in keep]
    state.rows = [state.rows[b] for b in keep]
    if state.row_sampling is not None:
        state.row_sampling = [state.row_sampling[b] for b in keep]
    state.seeds = state.seeds.index_select(0, index)
    state.seq_lens = state.seq_lens.index_select(0, index)
    state.step_tokens = state.step_tokens.index_select(0, index)
    state.step_num_accepted = state.step_num_accepted.index_select(0, index)
    state.step_accepted = [state.step_accepted[b] for b in keep]
    state.step_emitted = [state.step_emitted[b] for b in keep]
    state.step_drafted = [state.step_drafted[b] for b in keep]
    state.step_sources = [state.step_sources[b] for b in keep]
    target.bound = max(len(s) for s in state.sequences) - 1


def _finish(outputs, finish, stats, start) -> list[RowOutput]:
    elapsed = time.perf_counter() - start
    for s in stats:
        s.wall_time_s = elapsed
    return [RowOutput(o, f or "length", s) for o, f, s in zip(outputs, finish, stats)]
