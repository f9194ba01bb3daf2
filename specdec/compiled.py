"""compile=True: the static path's step forwards through torch.compile.

What is compiled: each model's forward as the static KV path calls it in a decoding step
(the target's verify forward over [last, d1..dk], the draft model's forwards), whole,
per-layer work and LM head together. What is not: the prefill (its width is the request's
own, one forward per request, and compute-bound anyway), the generic KV path (its cache
grows by a column every step), and the loop's Python bookkeeping (planner, drafters,
stops, the one host copy per step), which stays plain Python between graphs.

Shapes. A step forward sees input ids [B, T], a 4-D additive mask [B, 1, T, C] and KV
buffers [B, H, C, D], where B is the batch's active rows, T the verify width (1 + drafts)
and C the request's capacity. On the compiled path attention reads the whole buffer
(the mask hides what a row has not written) instead of the eager path's bucket view, so
nothing in the graph depends on a Python int that changes from step to step. B, T and C
are marked dynamic, with size-1 dimensions kept symbolic too (torch's
`backed_size_oblivious`): one graph per model and kind of call serves every batch size,
draft length and request length. The kinds are few: the target with and without its
hidden states (for drafters that read them), the draft model. Any further compile is a
recompile, logged with dynamo's reason at WARNING (specdec.compiled), and counted.

Backends. CPU: inductor with `cpp_wrapper` (the graph's kernel calls are one C++
function, which removes most of the per-op Python cost a small model's step is made of).
CUDA: inductor with CUDA graphs (`triton.cudagraphs`, one graph per distinct shape, each
recorded once); the KV buffers are marked as static addresses so that steps replay.

Warm-up. Compiling costs tens of seconds per graph on a small CPU, so it is paid once per
process per (model, kind of call): `SpeculativeGenerator.warmup()` pays it up front, and
torch's compile caches (inductor's FX graph cache and the AOTAutograd cache, kept under
`$TORCHINDUCTOR_CACHE_DIR`, by default `~/.cache/specdec/inductor`) let a second process
skip code generation. A request never pays a compile it cannot earn back: before warm-up,
a request whose token budget (rows x max_new_tokens) is below `compile_min_tokens` runs
eager; the first request at or above it compiles (see `StepCompiler.ready_for`).
"""

from __future__ import annotations

import logging
import os
import time
import types
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# A request budget (rows x max_new_tokens) that earns back a cold compile: warm-up of the
# bundled pair ~50 s on a 2-core CPU against ~2.5 ms saved per token is ~20k tokens; with the
# compile caches warm (a second process) warm-up is ~10 s, ~4k tokens.
DEFAULT_COMPILE_MIN_TOKENS = 4096


def inductor_cache_dir() -> str:
    """Where torch keeps compiled artifacts for reuse across processes: TORCHINDUCTOR_CACHE_DIR
    when set, else `$SPECDEC_CACHE_DIR/inductor`, else `~/.cache/specdec/inductor`."""
    explicit = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("SPECDEC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specdec")
    return os.path.join(base, "inductor")


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def failure_counts() -> dict:
    """How many guard failures dynamo has recorded per code object (for new_failures)."""
    from torch._dynamo.utils import guard_failures

    return {code: len(reasons) for code, reasons in guard_failures.items()}


def new_failures(before: dict, code=None) -> list[str]:
    """Dynamo's reasons for the recompiles since `before` (failure_counts()), the first line
    of each; of one code object's frames only when `code` is given."""
    from torch._dynamo.utils import guard_failures

    codes = [code] if code is not None else list(guard_failures)
    reasons = []
    for c in codes:
        for entry in list(guard_failures.get(c, ()))[before.get(c, 0):]:
            text = str(getattr(entry, "reason", entry)).strip().splitlines()
            reasons.append(text[0][:300] if text else "")
    return reasons


def _options(device: torch.device) -> dict:
    options = {"triton.cudagraphs": True} if device.type == "cuda" else {"cpp_wrapper": True}
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip is not None:
        # A step's guards would check every parameter of the model on every call (about a
        # quarter of a small model's step); the models' modules never change between steps.
        options["guard_filter_fn"] = skip
    return options


def mark_step_dynamic(tensor: torch.Tensor, dims: tuple[int, ...]) -> None:
    """Mark dims of a step input as varying (batch rows, verify width, capacity)."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


@dataclass
class CompileStats:
    graphs: int = 0  # graphs compiled for this generator's step forwards
    recompiles: int = 0  # compiles past the first of each kind of call
    compile_s: float = 0.0  # seconds spent in calls that compiled
    warmup_s: float | None = None  # seconds of the last warmup(), None before one
    reasons: list[str] = field(default_factory=list)  # recompile reasons, as dynamo gave them

    def as_dict(self) -> dict:
        return {
            "graphs": self.graphs, "recompiles": self.recompiles, "compile_s": round(self.compile_s, 3),
            "warmup_s": None if self.warmup_s is None else round(self.warmup_s, 3), "reasons": list(self.reasons),
        }


_RECOMPILE_LIMIT = 64


def _step_forward(forward, buffers, *, input_ids, write_positions, position_ids, mask_value, mask_dtype, **kwargs):
    """The traced step: the additive mask, then the model forward, with varying sizes tied.

    Query t of row b sees its row's positions 0 .. write_positions[b, t] of the whole
    buffer. Built here, the mask costs no eager ops per call. Each input's dynamic
    dimension gets its own symbol; attention combines the mask with the KV buffers and
    the query, so without the checks the tracer could not prove that their rows, widths
    and capacities agree, and would break the graph there.
    """
    batch, width = input_ids.shape
    capacity = buffers[0].shape[2]
    torch._check(position_ids.shape[0] == batch)
    torch._check(position_ids.shape[1] == width)
    torch._check(write_positions.shape[0] == batch)
    torch._check(write_positions.shape[1] == width)
    for buffer in buffers:
        torch._check(buffer.shape[0] == batch)
        torch._check(buffer.shape[2] == capacity)
    columns = torch.arange(capacity, device=input_ids.device)  # [C]
    hidden = columns.view(1, 1, capacity) > write_positions.unsqueeze(-1)  # [B, T, C]
    mask = torch.zeros(hidden.shape, dtype=mask_dtype, device=input_ids.device).masked_fill(hidden, mask_value)
    return forward(input_ids=input_ids, attention_mask=mask.unsqueeze(1), position_ids=position_ids, **kwargs)


def _own_code(function, role: str):
    """A copy of `function` with its own code object: dynamo keeps compiled graphs per code
    object, so each model's graphs live apart (no model's call is checked against another's)."""
    _own_code.count += 1
    code = function.__code__.replace(co_name=f"{function.__name__}_{role}_{_own_code.count}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


_own_code.count = 0


class CompiledForward:
    """One model's step forward through torch.compile (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, role: str, device: torch.device, stats: CompileStats) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())
        self.model = model
        self.role = role
        self.device = device
        self.stats = stats
        self.static_addresses = device.type == "cuda"
        self._kinds: set[tuple] = set()
        # A model's kinds of call (rows, width, hidden states) each need a graph of this code object.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        step = _own_code(_step_forward, role)
        self._code = step.__code__  # dynamo records this frame's guard failures under it
        self._fn = torch.compile(step, options=_options(device))

    def __call__(self, kind: tuple, buffers: list[torch.Tensor], **kwargs):
        """Run the compiled forward; `kind` names the graph this call needs (its non-shape
        inputs), `buffers` are the KV buffers the forward writes ([B, H, C, D] each)."""
        from torch._dynamo.utils import guard_failures

        before = _graph_count()
        failures = {self._code: len(guard_failures.get(self._code, ()))}  # one lookup, not a scan per step
        start = time.perf_counter()
        out = self._fn(self.model.forward, buffers, **kwargs)
        compiled = _graph_count() - before
        if compiled:
            elapsed = time.perf_counter() - start
            self.stats.graphs += compiled
            self.stats.compile_s += elapsed
            if kind in self._kinds:  # this kind of call had a graph: a recompile
                reasons = new_failures(failures, self._code) or ["no reason recorded"]
                self.stats.recompiles += compiled
                self.stats.reasons.extend(reasons)
                logger.warning("recompiled the %s step forward (%.1f s): %s", self.role, elapsed, " | ".join(reasons))
            else:
                logger.info("compiled the %s step forward %s in %.1f s", self.role, kind, elapsed)
        self._kinds.add(kind)
        return out


class StepCompiler:
    """A generator's compiled step forwards, one per model, and their stats."""

    def __init__(self, device: torch.device, min_tokens: int = DEFAULT_COMPILE_MIN_TOKENS) -> None:
        self.device = device
        self.min_tokens = min_tokens
        self.stats = CompileStats()
        self.warm = False  # warmup() ran, or a request compiled
        self._forwards: dict[int, CompiledForward] = {}

    def forward_for(self, model: torch.nn.Module, role: str) -> CompiledForward:
        key = id(model)
        if key not in self._forwards:
            self._forwards[key] = CompiledForward(model, role, self.device, self.stats)
        return self._forwards[key]

    def ready_for(self, rows: int, max_new_tokens: int) -> bool:
        """Whether a request takes the compiled path: always once warm; before that, only a
        request whose token budget earns back a cold compile (which then warms the process)."""
        if self.warm:
            return True
        if rows * max_new_tokens >= self.min_tokens:
            self.warm = True
            return True
        return False
