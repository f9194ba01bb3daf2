"""compile=True: the static path's step forwards through torch.compile.

What is compiled: each model's forward as the static KV path calls it in a decoding step
(the target's verify forward over [last, d1..dk], the draft model's forwards), whole,
per-layer work and LM head together, and an EAGLE-3 head's step (one head forward and the
logits of each row's drafting slot, `CompiledHead`). What is not: the prefill (its width is
the request's own, one forward per request, and compute-bound anyway), the generic KV path
(its cache grows by a column every step), and the loop's Python bookkeeping (planner,
drafters, stops, the one host copy per step), which stays plain Python between graphs.

Shapes. A step forward sees input ids [B, T], KV buffers [B, H, C, D] and `span` =
arange(W), where B is the batch's active rows, T the verify width (1 + drafts), C the
request's capacity and W the attention width (the next multiple of 64 past the longest row,
as on the eager path); the graph builds the additive mask [B, 1, T, W] and attention reads
the buffers' first W columns. W enters as a tensor's size, so nothing in the graph depends
on a Python int that changes from step to step. B, T, C and W are marked dynamic: one
graph per model and kind of call serves every batch size from 2,
draft length and request length. Width 1 (a one-token step) and batch 1 specialize in
torch (transformers' attention branches on the query length), so the kinds are: one-token
and verify steps (each its own code object, a "slot"), one row or several, and, without a
head, the target with and without its hidden states (with a head every target step
returns the head's layers: one kind for every drafter, for the cost of one more output).
The head has two slots: reading the target's features (a window, kept at least two wide)
and reading its own output (a drafting step); its greedy drafting is a third graph, the
window's step and eight drafting steps unrolled (`CompiledChain`). Any further compile is
a recompile, logged
with dynamo's reason at WARNING (specdec.compiled), and counted.

Calls. Dynamo's frame around a graph (its guards, gathering the ~150 parameters of a
16-layer model through attribute chains, AOTAutograd's wrappers) cost about 0.2 ms a call
on a 2-core CPU, a sixth of the bundled target's one-token step. On CPU, once a kind of
call has run through dynamo as one whole graph whose trace changed no Python state, and a
direct call of that graph on the same inputs gave the same outputs, its calls go to the
compiled function directly (`_DirectCall`: the parameters bound once, the other inputs read
by the sources dynamo recorded, dtypes checked here, sizes and strides by the C++ wrapper).
A call whose inputs do not fit goes through dynamo as before.

Backends. CPU: inductor with `cpp_wrapper` (the graph's kernel calls are one C++
function, which removes most of the per-op Python cost a small model's step is made of),
the wrapper built apart from the kernels at -O2 (-O3 on a 16-layer model's wrapper took
about 12 of a graph's 35 s to build, for no measurable gain per step).
CUDA: inductor with CUDA graphs (`triton.cudagraphs`, one graph per distinct shape, each
recorded once); the KV buffers are marked as static addresses so that steps replay. CUDA
steps go through torch.compile's own inductor entry and dynamo on every call (no direct
calls: the CUDA-graph trees manage their replays there).

Warm-up. Compiling costs tens of seconds per graph on a small CPU, so it is paid once per
(model structure, kind of call): `SpeculativeGenerator.warmup()` pays it up front, and each
graph that runs directly is kept (specdec.graph_store, under `$TORCHINDUCTOR_CACHE_DIR`, by
default `~/.cache/specdec/inductor`, beside torch's own compile caches) with the recipe of its
direct call, so that a later process with the same models loads it and calls it with no
dynamo trace at all (a trace of the target's forward was most of a warm process's warm-up).
The first warm-up of a generator loaded by from_pretrained on two or more cores builds about
half of the graphs in a helper process (`WarmHelper`) while it builds the others, and then
loads the helper's. A request
never pays a compile it cannot earn back: before warm-up, a request whose token budget
(rows x max_new_tokens) is below `compile_min_tokens` runs eager; the first request at or
above it runs the warm-up first (see `StepCompiler.ready_for`). By default that budget
depends on what the compile costs here: small when an earlier warm-up of the same models kept
their graphs in this cache (they load in seconds), large when they would be built from nothing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import re
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# The request budget (rows x max_new_tokens) that earns back a compile, measured on the bundled
# pair on a 2-core CPU, where a compiled step saves ~0.7 ms a token with drafter "auto" (~2.4 ms
# with drafter "none"; benchmarks/results/compiled_bundled):
# - graphs kept by an earlier warm-up of the same models into this cache (specdec.graph_store):
#   they load in ~3 s, which ~4k tokens earn back;
# - nothing kept: they are built (the request runs warmup() first: ~65-110 s with its helper
#   process, benchmarks/results/warmup_cpu), which takes ~100k tokens.
# DEFAULT_COMPILE_MIN_TOKENS (None) picks one of the two per process (StepCompiler.threshold).
KEPT_COMPILE_MIN_TOKENS = 4096
COLD_COMPILE_MIN_TOKENS = 131072
DEFAULT_COMPILE_MIN_TOKENS = None


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


def probe_vector_isa() -> None:
    """Have inductor probe the CPU's vector instruction sets in its order of preference and stop
    at the first that works, instead of probing all it may use before taking that first one.

    Before its first C++ build, inductor tries every set the CPU reports (avx512 with VNNI,
    avx512 and avx2 on this project's CPUs): a test build and a child Python loading it, each,
    about 13 s of a cold warm-up on a 2-core CPU, in every process that compiles. Without
    ATEN_CPU_CAPABILITY (or inductor's simdlen or vec_isa_ok) it then uses the first of its list
    that worked, so probing in order until one works picks the same set with one probe. With any
    of them set, or on another platform, inductor is left to probe as it does."""
    import platform
    import sys

    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa

    if getattr(cpu_vec_isa, "_specdec_probe", False):
        return
    cpu_vec_isa._specdec_probe = True
    cpp = inductor_config.cpp
    if (os.environ.get("ATEN_CPU_CAPABILITY") or cpp.simdlen is not None or cpp.vec_isa_ok is not None
            or sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64")):
        return
    original = getattr(cpu_vec_isa, "valid_vec_isa_list", None)
    if original is None or not hasattr(cpu_vec_isa, "supported_vec_isa_list"):
        return

    @functools.cache
    def first_that_works() -> list:  # run when inductor first asks, as its own probe is
        try:
            flags = cpu_vec_isa.x86_isa_checker()
            candidates = [isa for isa in cpu_vec_isa.supported_vec_isa_list
                          if all(flag in flags for flag in str(isa).split())]
            first = next((isa for isa in candidates if isa), None)  # bool(isa) runs inductor's probe of it
        except Exception:  # another torch's internals: its own probe
            return original()
        return [first] if first is not None else []

    cpu_vec_isa.valid_vec_isa_list = first_that_works  # what pick_vec_isa() reads


def _options(device: torch.device) -> dict:
    if device.type == "cpu":
        probe_vector_isa()
    options = {"triton.cudagraphs": True} if device.type == "cuda" else {"cpp_wrapper": True}
    from torch._inductor import config as inductor_config

    if device.type == "cpu" and hasattr(inductor_config, "cpp_wrapper_build_separate"):
        # The wrapper (one kernel call after another) is built apart at -O2, the kernels at
        # -O3: the wrapper of a 16-layer model is most of the C++, and -O3 on it took about
        # 12 of a graph's 35 s on a 2-core CPU for no measurable gain per step (-O1 cost ~10%).
        options["cpp_wrapper_build_separate"] = True
        options["aot_inductor.compile_wrapper_opt_level"] = "O2"
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
    loaded: int = 0  # graphs an earlier process kept, loaded without a trace (specdec.graph_store)
    recompiles: int = 0  # compiles past the first of each kind of call
    compile_s: float = 0.0  # seconds spent in calls that compiled
    warmup_s: float | None = None  # seconds of the last warmup(), None before one
    reasons: list[str] = field(default_factory=list)  # recompile reasons, as dynamo gave them

    def as_dict(self) -> dict:
        return {
            "graphs": self.graphs, "loaded": self.loaded, "recompiles": self.recompiles,
            "compile_s": round(self.compile_s, 3),
            "warmup_s": None if self.warmup_s is None else round(self.warmup_s, 3), "reasons": list(self.reasons),
        }


_RECOMPILE_LIMIT = 64
# Call compiled step graphs without dynamo once verified (_DirectCall); False: always through dynamo.
DIRECT_CALLS = True
# Keep directly called graphs for later processes and load them from there (specdec.graph_store).
KEEP_GRAPHS = True


def _step_forward(forward, buffers, *, input_ids, write_positions, position_ids, span, mask_value, mask_dtype,
                  hidden_layers=None, **kwargs):
    """The traced step: the additive mask, then the model forward, with varying sizes tied.

    Query t of row b sees its row's positions 0 .. write_positions[b, t] among the first W
    columns of the buffer, span = arange(W) (the caches' update() returns those columns).
    Built here, the mask costs no eager ops per call. Each input's dynamic
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
    view = span.shape[0]
    torch._check(view <= capacity)
    hidden = span.view(1, 1, view) > write_positions.unsqueeze(-1)  # [B, T, W]
    mask = torch.zeros(hidden.shape, dtype=mask_dtype, device=input_ids.device).masked_fill(hidden, mask_value)
    out = forward(input_ids=input_ids, attention_mask=mask.unsqueeze(1), position_ids=position_ids, **kwargs)
    # A flat tuple of tensors (StepOutput.of rebuilds it): what the graph outputs, so that a
    # direct call (_DirectCall) returns the same thing as dynamo's.
    if hidden_layers is not None:
        # Only the layers asked for leave the graph (every layer's output as a graph output cost
        # about a sixth of a one-token step of the bundled target).
        return out.logits, torch.cat([out.hidden_states[i] for i in hidden_layers], dim=-1)
    if kwargs.get("output_hidden_states"):
        return (out.logits, *out.hidden_states)
    return (out.logits,)


def _install_output_hooks(model: torch.nn.Module) -> None:
    """Install transformers' hidden-state capturing hooks now. transformers installs them on the
    first forward that asks for hidden states, under a lock that dynamo cannot trace: traced
    then, the step forward breaks into two graphs with Python between them (about a sixth of
    a one-token step of the bundled target)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # pragma: no cover - transformers without lazy hooks: nothing to install
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)


def _compile_backend(gm: torch.fx.GraphModule, example_inputs: list, *, options: dict, ran: list, **_) -> object:
    """Inductor (as torch.compile(options=options) runs it), and a record of each graph run:
    `ran` gets the graph's _DirectCall (None where it cannot be called directly) every time
    dynamo calls it, which is how _Compiled finds the one graph a kind of call runs."""
    from torch._inductor.compile_fx import compile_fx

    from . import graph_store

    with graph_store.bundled():  # so that the graph can be kept for later processes
        fn = compile_fx(gm, example_inputs, config_patches=options)
    plan = _DirectCall.plan(gm, example_inputs, fn)

    def run(*args):
        ran.append(plan)
        return fn(*args)

    run._boxed_call = getattr(fn, "_boxed_call", False)  # dynamo calls it as it would call fn
    return run


# Dynamo's source text for an input that a kept graph's recipe may name: the call's arguments
# by name, then attributes (no dunders but a bound method's __self__), subscripts, and sizes or
# strides (nothing else is evaluated).
_SOURCE = re.compile(r"L\['\w+'\](?:\.__self__|\.(?!__)\w+|\[\d+\]|\['[\w.]*'\]|\.(?:size|stride)\(\)\[\d+\])*")


def _getter(name: str):
    """A function of a call's arguments (by name, as dynamo's L) reading the input `name` names."""
    return eval(f"lambda L: {name}", {"__builtins__": {}})  # noqa: S307 - dynamo's source text, or checked


class _DirectCall:
    """A compiled step graph called without dynamo. Dynamo's frame around a graph checks its
    guards, gathers its inputs (a 16-layer model's ~150 parameters through attribute
    chains) and goes through AOTAutograd's runtime wrappers: about 0.2 ms a call on a 2-core
    CPU, a sixth of the bundled target's one-token step. Here the parameters are bound once,
    the rest of the inputs read from the call's arguments by the sources dynamo recorded, and
    the compiled function called with them.

    What replaces the guards: a graph is called directly only for the kind of call it was
    compiled for (the kind names every non-shape input that selects a graph, see
    specdec.kv), each input's dtype is checked here and its sizes and strides by the C++
    wrapper, and a graph whose trace mutated Python state (other than transformers'
    output-collector variable, which every forward sets and resets) is never called
    directly. The parameters are bound as they were at compile time, as the step's guards
    already assume (guard_filter_fn)."""

    def __init__(self, fn, getters: list, dtypes: dict[int, torch.dtype], names: list[str] | None = None,
                 params: set[int] = frozenset()) -> None:
        self.fn = fn  # called as dynamo calls it, with the inputs as arguments
        self.getters = getters  # per graph input: a constant tensor, or a function of the frame's locals
        self.dtypes = dtypes  # per-call tensor inputs: index -> dtype at compile time
        self.names = names  # per graph input: dynamo's source text (None: not all of the plain kind kept)
        self.params = params  # indices of the inputs that are model state (bound once)
        self.kept = False  # loaded as an earlier process kept it (from_recipe)
        self.misfit: str | None = None  # why the last call that did not fit did not (a recompile's reason)

    def recipe(self) -> dict | None:
        """How to call the graph in another process (specdec.graph_store), or None."""
        if self.names is None:
            return None
        from .graph_store import dtype_name

        return {"names": self.names, "params": sorted(self.params),
                "dtypes": {str(i): dtype_name(d) for i, d in self.dtypes.items()}}

    @classmethod
    def from_recipe(cls, fn, recipe: dict, frame: dict) -> "_DirectCall | None":
        """A kept graph's direct call (recipe()), its model state bound from `frame` (a call's
        arguments), or None where the recipe does not fit the call."""
        from .loading import _resolve_dtype

        try:
            names, params = list(recipe["names"]), set(recipe["params"])
            if not all(isinstance(name, str) and _SOURCE.fullmatch(name) for name in names):
                return None
            getters = []
            for index, name in enumerate(names):
                getter = _getter(name)  # checked against _SOURCE above
                if index in params:
                    value = getter(frame)
                    if type(value) not in (torch.Tensor, torch.nn.Parameter):
                        return None
                    getters.append(value)
                else:
                    getters.append(getter)
            dtypes = {int(i): _resolve_dtype(d) for i, d in recipe["dtypes"].items()}
        except Exception:  # noqa: BLE001 - a recipe from other code: compile instead
            logger.debug("a kept graph's recipe does not fit", exc_info=True)
            return None
        direct = cls(fn, getters, dtypes, names, params)
        direct.kept = True
        return direct

    @classmethod
    def plan(cls, gm: torch.fx.GraphModule, example_inputs: list, fn) -> "_DirectCall | None":
        try:
            if not _pure(gm):
                return None
            getters, dtypes, names, params = [], {}, [], set()
            placeholders = list(gm.graph.find_nodes(op="placeholder"))
            if len(placeholders) != len(example_inputs):
                return None
            for index, (node, example) in enumerate(zip(placeholders, example_inputs)):
                source = getattr(node.meta.get("grapharg"), "source", None)
                if source is None:
                    return None
                name = source.name() if callable(source.name) else source.name
                names.append(name)
                if ("._parameters[" in name or "._buffers[" in name) and type(example) in (torch.Tensor, torch.nn.Parameter):
                    getters.append(example)  # model state: the same tensor every call
                    params.add(index)
                    continue
                getters.append(_getter(name))  # dynamo's own source text
                if isinstance(example, torch.Tensor):
                    dtypes[index] = example.dtype
        except Exception:  # any surprise in torch's internals: dynamo keeps calling the graph
            logger.debug("no direct call for a step graph", exc_info=True)
            return None
        keepable = all(_SOURCE.fullmatch(name) for name in names)
        return cls(fn, getters, dtypes, names if keepable else None, params)

    def __call__(self, frame: dict) -> tuple | None:
        """The graph's outputs for a call whose arguments are `frame` (the function's locals by
        name), or None where an input is not what the graph was compiled for."""
        try:
            inputs = [g(frame) if callable(g) else g for g in self.getters]
        except Exception as err:
            self.misfit = f"an input is missing ({err!r})"
            return None
        for index, dtype in self.dtypes.items():
            if not isinstance(inputs[index], torch.Tensor) or inputs[index].dtype != dtype:
                got = getattr(inputs[index], "dtype", type(inputs[index]).__name__)
                self.misfit = f"{self.names[index] if self.names else index}: dtype {got} where the graph has {dtype}"
                return None
        return tuple(self.fn(*inputs))


def _pure(gm: torch.fx.GraphModule) -> bool:
    """Whether the trace that produced gm changed no Python state outside the graph: dynamo
    replays such changes after calling the graph, a direct call would not."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._dynamo.variables.base import AttributeMutationExisting, ValueMutationExisting
    from torch._dynamo.variables.tensor import TensorVariable

    tx = InstructionTranslator.current_tx()
    effects = tx.output.side_effects
    for variable in effects.id_to_variable.values():
        if isinstance(variable, TensorVariable):
            continue  # tensor mutations are in the graph
        existing = isinstance(getattr(variable, "mutation_type", None), (AttributeMutationExisting, ValueMutationExisting))
        if existing and effects.is_modified(variable):
            value = getattr(variable, "value", None)
            if type(value).__name__ != "CompileableContextVar":  # transformers' collector: set and reset
                return False
    return True


class StepOutput:
    """A compiled step forward's logits, and the hidden states entering `hidden_layers`
    concatenated (`selected_hidden`) or every layer's (`hidden_states`), as KVState reads a
    model output."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor | None = None,
                 hidden_states: tuple[torch.Tensor, ...] | None = None) -> None:
        self.logits = logits
        self.selected_hidden = hidden
        self.hidden_states = hidden_states

    @classmethod
    def of(cls, outputs: tuple, hidden_layers) -> "StepOutput":
        """From _step_forward's tuple."""
        if hidden_layers is not None:
            return cls(outputs[0], outputs[1])
        return cls(outputs[0], hidden_states=tuple(outputs[1:]) or None)


def _own_code(function, role: str):
    """A copy of `function` with its own code object: dynamo keeps compiled graphs per code
    object, so each model's graphs live apart (no model's call is checked against another's)."""
    _own_code.count += 1
    code = function.__code__.replace(co_name=f"{function.__name__}_{role}_{_own_code.count}")
    copy = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


_own_code.count = 0


class _Compiled:
    """A function through torch.compile, as one code object per slot (a kind of call that
    always needs a graph of its own: dynamo keeps graphs per code object, so each slot's first
    graph is built the same way in every process, and a compile cache filled by another
    process serves it), whose compiles are counted in `stats` and logged (a compile for a kind
    of call that had one already is a recompile, logged at WARNING with dynamo's reason)."""

    def __init__(self, function, role: str, device: torch.device, stats: CompileStats, slots: tuple[str, ...]) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())
        self.role = role
        self.device = device
        self.stats = stats
        self.static_addresses = device.type == "cuda"
        self._kinds: set[tuple] = set()
        # A slot's kinds of call (rows, hidden states) each need a graph of its code object.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        self._fns, self._codes = {}, {}
        self._signature = inspect.signature(function)
        self._ran: list[_DirectCall | None] = []  # the graphs the current dynamo call ran
        self._direct: dict[tuple, _DirectCall] = {}  # (slot, kind) -> its graph, called without dynamo
        self._no_direct: set[tuple] = set()
        self._looked_up: set[tuple] = set()  # (slot, kind)s looked for among kept graphs (graph_store)
        self._function = f"{function.__module__}.{function.__qualname__}"
        options = _options(device)
        inductor = {k: v for k, v in options.items() if k != "guard_filter_fn"}  # what the backend gets
        self._inductor = inductor
        dynamo = {k: v for k, v in options.items() if k == "guard_filter_fn"} or None  # what torch.compile keeps
        for slot in slots:
            step = _own_code(function, f"{role}_{slot}")
            self._codes[slot] = step.__code__  # dynamo records this frame's guard failures under it
            if device.type == "cpu":  # inductor through a backend that notes each graph run (direct calls)
                backend = functools.partial(_compile_backend, options=inductor, ran=self._ran)
                self._fns[slot] = torch.compile(step, backend=backend, options=dynamo)
            else:  # CUDA graphs: torch.compile's own inductor entry, every call through dynamo
                self._fns[slot] = torch.compile(step, options=options)

    def _run(self, kind: tuple, slot: str, *args, dynamic: tuple = (), **kwargs):
        """Call slot's graph for `kind`; `dynamic`: (tensor, dims) pairs to mark varying for
        dynamo (a direct call needs no marks)."""
        key = (slot, kind)
        direct = self._direct.get(key) if DIRECT_CALLS else None
        if direct is None and KEEP_GRAPHS and DIRECT_CALLS and self.device.type == "cpu" and key not in self._looked_up:
            self._looked_up.add(key)
            direct = self._load(key, self._signature.bind(*args, **kwargs).arguments)
        if direct is not None:
            try:
                out = direct(self._signature.bind(*args, **kwargs).arguments)
            except Exception:
                if not direct.kept:
                    raise
                # A kept graph is trusted by its key alone (no dynamo call checked it in this
                # process): one that fails is dropped, and this kind compiles as if none were kept.
                logger.warning("the kept %s graph %s failed; compiling it", self.role, key, exc_info=True)
                self._direct.pop(key, None)
                self._kinds.discard(kind)  # its compile is a first compile, not a recompile
                out = None
            if out is not None:
                return out
        for tensor, dims in dynamic:
            mark_step_dynamic(tensor, dims)
        out = self._through_dynamo(kind, slot, *args, **kwargs)
        if key not in self._direct and key not in self._no_direct:
            self._adopt(key, out, args, kwargs)
        return out

    def _adopt(self, key: tuple, out: tuple, args, kwargs) -> None:
        """After a dynamo call of a kind without a direct call: if it ran one whole graph, call
        that graph directly from now on, once a direct call of it on the same inputs gives the
        same outputs (a step's KV writes are the same values at the same slots: running it
        twice changes nothing)."""
        ran, self._ran[:] = list(self._ran), []
        graph = ran[0] if len(ran) == 1 else None
        frame = self._signature.bind(*args, **kwargs).arguments
        again = graph(frame) if graph is not None else None
        if again is not None and len(again) == len(out) and all(
                isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
                for a, b in zip(again, out)):
            self._direct[key] = graph
            logger.debug("the %s step %s runs its graph directly", self.role, key)
            if KEEP_GRAPHS:
                self._keep(key, graph, frame)
        else:
            self._no_direct.add(key)
            logger.info("the %s step %s runs through dynamo (%s)", self.role, key,
                        "no single graph" if graph is None else "its direct call did not match")

    def _store_name(self, key: tuple, frame: dict) -> str:
        """The graph_store key of slot/kind `key` called with arguments `frame`."""
        from . import graph_store

        return graph_store.key({"function": self._function, "slot": key[0], "kind": repr(key[1]),
                                "device": self.device.type, "options": repr(sorted(self._inductor.items())),
                                "arguments": graph_store.structure(frame)})

    def _load(self, key: tuple, frame: dict) -> "_DirectCall | None":
        """The graph of slot/kind `key` as an earlier process kept it, called directly (no trace),
        or None; `frame`: the call's arguments by name."""
        from . import graph_store

        start = time.perf_counter()
        found = graph_store.load(self._store_name(key, frame), self._inductor)
        direct = _DirectCall.from_recipe(found[0], found[1], frame) if found is not None else None
        if direct is None:
            return None
        self._direct[key] = direct
        self._kinds.add(key[1])
        self.stats.loaded += 1
        logger.info("loaded the %s step forward %s in %.1f s", self.role, key[1], time.perf_counter() - start)
        return direct

    def _keep(self, key: tuple, graph: "_DirectCall", frame: dict) -> None:
        """Keep a graph that runs directly for later processes (specdec.graph_store)."""
        from . import graph_store

        recipe = graph.recipe()
        if recipe is not None:
            graph_store.save(self._store_name(key, frame), graph.fn, recipe)

    def _through_dynamo(self, kind: tuple, slot: str, *args, **kwargs):
        from torch._dynamo.utils import guard_failures

        self._ran.clear()
        code = self._codes[slot]
        before = _graph_count()
        failures = {code: len(guard_failures.get(code, ()))}  # one lookup, not a scan per step
        start = time.perf_counter()
        out = self._fns[slot](*args, **kwargs)
        compiled = _graph_count() - before
        if compiled:
            elapsed = time.perf_counter() - start
            self.stats.graphs += compiled
            self.stats.compile_s += elapsed
            if kind in self._kinds:  # this kind of call had a graph: a recompile
                # dynamo's guard failures; where dynamo never ran this kind (its graph was kept by
                # an earlier process), why the call did not fit the direct call
                misfit = getattr(self._direct.get((slot, kind)), "misfit", None)
                reasons = new_failures(failures, code) or [misfit or "no reason recorded"]
                self.stats.recompiles += compiled
                self.stats.reasons.extend(reasons)
                logger.warning("recompiled the %s step forward (%.1f s): %s", self.role, elapsed, " | ".join(reasons))
            else:
                logger.info("compiled the %s step forward %s in %.1f s", self.role, kind, elapsed)
        self._kinds.add(kind)
        return out


class CompiledForward(_Compiled):
    """One model's step forward through torch.compile (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, role: str, device: torch.device, stats: CompileStats) -> None:
        # One-token steps and verify steps: width 1 specializes (a graph of its own either way)
        super().__init__(_step_forward, role, device, stats, slots=("decode", "verify"))
        self.model = model
        # Every call returns the hidden states entering these layers (StepCompiler.target_hidden):
        # one kind of call for every drafter.
        self.hidden_layers: tuple[int, ...] | None = None

    def __call__(self, kind: tuple, buffers: list[torch.Tensor], **kwargs):
        """Run the compiled forward; `kind` names the graph this call needs (its non-shape
        inputs), `buffers` are the KV buffers the forward writes ([B, H, C, D] each)."""
        dynamic = [(kwargs[name], (0, 1)) for name in ("input_ids", "write_positions", "position_ids")]
        dynamic.append((kwargs["span"], (0,)))
        outputs = self._run(kind, "decode" if kind[1] else "verify", self.model.forward, buffers, dynamic=dynamic,
                            **kwargs)
        return StepOutput.of(outputs, kwargs.get("hidden_layers"))


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with the strides of a fresh contiguous tensor, size-1 dimensions included (a
    row of the prefill's logits is contiguous with another stride; is_contiguous() ignores
    size-1 dimensions, dynamo's stride guards and a C++ wrapper's asserts do not): itself when
    it has them, else a copy."""
    expected = 1
    for size, stride in zip(reversed(tensor.shape), reversed(tensor.stride())):
        if stride != expected:
            return tensor.clone(memory_format=torch.contiguous_format)
        expected *= size
    return tensor


def _head_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A head graph's per-call inputs as its caches are: inference tensors with fresh strides.
    Inputs made outside inference mode (a drafter's window) would differ from the caches in
    dispatch keys, and views in strides, both of which dynamo guards on: one graph per mix
    otherwise. Call under inference mode."""
    return tuple(dense(t) if t.is_inference() else t.clone(memory_format=torch.contiguous_format) for t in tensors)


class CompiledHead(_Compiled):
    """An EAGLE-3 head's step (specdec.eagle.head_step: one head forward, then the logits of
    each row's last slot) through torch.compile. Rows, width and cache capacity are dynamic;
    the kinds are the head reading the target's features or its own output (the drafter
    keeps windows of features at least two wide, so with one-token drafting steps that is
    two graphs)."""

    def __init__(self, device: torch.device, stats: CompileStats) -> None:
        from .eagle import head_step

        super().__init__(head_step, "head", device, stats, slots=("features", "own"))

    def __call__(self, kind: tuple, head, k_cache, v_cache, tokens, hidden, positions, last, *, features: bool):
        with torch.inference_mode():
            tokens, hidden, positions, last = _head_inputs(tokens, hidden, positions, last)
            dynamic = ((tokens, (0, 1)), (hidden, (0, 1)), (positions, (0, 1)), (last, (0,)), (k_cache, (0, 2)),
                       (v_cache, (0, 2)))
            return self._run(kind, kind[0], head, k_cache, v_cache, tokens, hidden, positions, last, features=features,
                             dynamic=dynamic)


class CompiledChain(_Compiled):
    """An EAGLE-3 head's greedy draft chain (specdec.eagle.head_chain: the window's step and
    `length` drafting steps with their argmax, one graph) through torch.compile. Rows, window
    width and cache capacity are dynamic; the length is part of the kind (the loop is
    unrolled), and one length serves a generator (CHAIN_LENGTH drafts, of which a step keeps
    the ones it plans)."""

    def __init__(self, device: torch.device, stats: CompileStats) -> None:
        from .eagle import head_chain

        super().__init__(head_chain, "head chain", device, stats, slots=("chain",))

    def __call__(self, kind: tuple, head, k_cache, v_cache, tokens, hidden, positions, last, after, *, length: int):
        with torch.inference_mode():
            tokens, hidden, positions, last, after = _head_inputs(tokens, hidden, positions, last, after)
            dynamic = ((tokens, (0, 1)), (hidden, (0, 1)), (positions, (0, 1)), (last, (0,)), (after, (0,)),
                       (k_cache, (0, 2)), (v_cache, (0, 2)))
            return self._run(kind, "chain", head, k_cache, v_cache, tokens, hidden, positions, last, after,
                             length=length, dynamic=dynamic)


class StepCompiler:
    """A generator's compiled step forwards, one per model, and their stats."""

    def __init__(self, device: torch.device, min_tokens: int | None = DEFAULT_COMPILE_MIN_TOKENS,
                 kept: Callable[[], bool] | None = None, warm_up: Callable[[], object] | None = None) -> None:
        self.device = device
        self.min_tokens = min_tokens  # None: automatic (threshold())
        self._kept = kept  # whether an earlier warm-up kept these models' graphs in this cache
        # The generator's warmup(), run by the first request that earns the compile back: every
        # graph at once (with the helper process where there is one), kept and noted for later
        # processes, as an explicit warm-up would.
        self._warm_up = warm_up
        self.stats = CompileStats()
        self.warm = False  # warmup() ran, or a request compiled
        self._forwards: dict[int, CompiledForward] = {}
        self._heads: dict[int, CompiledHead] = {}
        self._chains: dict[int, CompiledChain] = {}
        # The layers whose hidden states the target's step forwards always return (a generator
        # with an EAGLE head, whose drafter reads them on most steps), else None: one kind of
        # call for every drafter, so half the graphs, for the cost of one [B, T, 3H] output.
        self.target_hidden: tuple[int, ...] | None = None

    def forward_for(self, model: torch.nn.Module, role: str) -> CompiledForward:
        key = id(model)
        if key not in self._forwards:
            self._forwards[key] = CompiledForward(model, role, self.device, self.stats)
            if role == "target" and self.target_hidden is not None:
                self._forwards[key].hidden_layers = self.target_hidden
                _install_output_hooks(model)
        return self._forwards[key]

    def head_for(self, head: torch.nn.Module) -> CompiledHead:
        """The compiled step of an EAGLE-3 head (one per generator: its graphs take the head's
        weights as inputs, so they are the head's alone only through the guards)."""
        return self._per_head(self._heads, CompiledHead, head)

    def chain_for(self, head: torch.nn.Module) -> CompiledChain:
        """The compiled greedy draft chain of an EAGLE-3 head (one per generator, as head_for)."""
        return self._per_head(self._chains, CompiledChain, head)

    def _per_head(self, table: dict, cls, head: torch.nn.Module):
        if id(head) not in table:
            table[id(head)] = cls(self.device, self.stats)
        return table[id(head)]

    def ready_for(self, rows: int, max_new_tokens: int) -> bool:
        """Whether a request takes the compiled path: always once warm; before that, only a
        request whose token budget earns back the compile (which then warms the process)."""
        if self.warm:
            return True
        if rows * max_new_tokens >= self.threshold():
            if self._warm_up is not None:
                logger.info("a request of %d x %d tokens earns back the compile: warming up", rows, max_new_tokens)
                self._warm_up()
            self.warm = True
            return True
        return False

    def threshold(self) -> int:
        """The token budget from which a request compiles before warm-up: `compile_min_tokens`
        when given, else KEPT_COMPILE_MIN_TOKENS where an earlier warm-up of these models kept
        their graphs in this cache (is_warm) and COLD_COMPILE_MIN_TOKENS where they would be built."""
        if self.min_tokens is not None:
            return self.min_tokens
        if self._kept is not None and self._kept():
            return KEPT_COMPILE_MIN_TOKENS
        return COLD_COMPILE_MIN_TOKENS


# --------------------------------------------------------------------------- parallel warm-up


@functools.cache
def _graph_code_hash() -> str:
    """A hash of the files whose code shapes the step graphs: a marker written by other code
    (an edited checkout, a release with the same version number) does not count."""
    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in ("compiled.py", "kv.py", "eagle.py", "fused.py"):
        try:
            with open(os.path.join(here, name), "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update(name.encode())
    return digest.hexdigest()[:16]


def _warm_marker(spec: dict) -> str:
    from . import __version__

    key = json.dumps({"spec": spec, "torch": torch.__version__, "specdec": __version__, "code": _graph_code_hash()},
                     sort_keys=True)
    return os.path.join(inductor_cache_dir(), "specdec-warm", hashlib.sha256(key.encode()).hexdigest()[:32])


def is_warm(spec: dict | None) -> bool:
    """Whether a warm-up of these models finished into this compile cache before (mark_warm):
    then loading the graphs is quicker than starting a helper process."""
    return spec is not None and os.path.exists(_warm_marker(spec))


def mark_warm(spec: dict | None) -> None:
    """Note that a warm-up of these models finished into this compile cache (best effort)."""
    if spec is None:
        return
    path = _warm_marker(spec)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(spec, f)
    except OSError:  # a read-only cache: the next warm-up starts a helper again, nothing worse
        pass


class WarmHelper:
    """A process that builds some of a generator's graphs (specdec.warm_worker; the generator
    chooses which, see SpeculativeGenerator._helper_parts) and keeps them (specdec.graph_store)
    while the generator builds the others: graph building is single-threaded Python, so on
    two cores the two overlap. The generator then loads the helper's graphs. A helper that
    fails or is slow only costs that overlap: the graphs are built either way."""

    TIMEOUT_S = 600.0

    def __init__(self, proc, log) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    def start(cls, spec: dict, parts: tuple[str, ...]) -> "WarmHelper | None":
        import subprocess
        import sys
        import tempfile

        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_cache_dir())
        log = tempfile.TemporaryFile()
        try:  # run from a neutral folder: a source checkout's root on sys.path would shadow packages
            proc = subprocess.Popen([sys.executable, "-m", "specdec.warm_worker", json.dumps(spec), ",".join(parts)],
                                    env=env, cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
        except OSError as err:
            logger.warning("warm-up helper did not start (%s): compiling in this process alone", err)
            log.close()
            return None
        logger.info("warm-up helper started (pid %d)", proc.pid)
        return cls(proc, log)

    def finish(self) -> bool:
        """Wait for the helper; True when it built its graphs."""
        try:
            code = self.proc.wait(self.TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a stuck helper is killed; this process compiles alone
            self.proc.kill()
            self.proc.wait()
            code = None
        self.log.seek(0)
        tail = self.log.read()[-2000:].decode(errors="replace")
        if code != 0:
            logger.warning("warm-up helper ended with %s; compiling the rest here: %s", code, tail)
        else:
            built = [line for line in tail.splitlines() if line.startswith("built ")]
            logger.info("warm-up helper: %s", "; ".join(built))
        self.log.close()
        return code == 0
