"""Fused sampling for the compiled path: a sampled step's noise and verification as one graph.

A sampled step (temperature > 0) eagerly runs about 25 small ops over the vocabulary after
the target forward: the counter-based noise (specdec.noise: splitmix64 in int64 ops, then
uniforms and exponentials) and the verification (kernels.reference: temperature, top-k,
top-p, softmax, accept tests, the residual / bonus exponential race). On CPU at a small
vocabulary each op costs more in dispatch than in arithmetic: about 250 us at B = 1,
V = 4096, an eighth of the bundled target's compiled forward. Here the same computation is
one torch.compile'd graph (inductor with its C++ wrapper): the hash, the noise transforms
and the pointwise parts of verification fuse into a few loops, about 35 us (K = 0) and
55 us (K = 4). benchmarks/fused_sampling.py measures it; results in
benchmarks/results/fused_sampling/. The engine calls it on the compiled path (DecodeState.
compiled) for CPU tensors; CUDA keeps its Triton kernels (kernels.verify_sampling).

Same tokens as the eager path, bit for bit, by construction:
  * Regions. The graph is built in inductor's "lite" mode: every op runs its ATen kernel
    (called from the C++ wrapper, no Python) except those traced inside `with _fused():`,
    which inductor fuses. A region holds only ops whose result cannot depend on how they
    are evaluated: integer ops, exact conversions, IEEE-rounded pointwise ops (a division
    by the temperature stays a division on CPU, never a multiplication by a reciprocal),
    comparisons, gathers, max / argmax, and sums used only in a test against 0. What stays
    ATen is what rounds by its evaluation order: softmax, the top-p cumsum and its
    renormalising sum (and top-k and sort, whose results are exact anyway). One ulp of a
    probability can flip an accept test or the race; tests/test_fused_sampling.py puts
    both on the edge and compares tokens.
  * Noise. specdec.noise's hash, restated for the compiler: the index term index * golden
    (by position also offset * golden) is read from a table (_golden_multiples) rather
    than traced from an arange. Traced, inductor folds it into a loop's index arithmetic,
    x * -7046029254386353131 in signed C++, whose overflow is undefined behaviour the C++
    compiler uses to bound the loop: the kernel read past its buffers. Loaded, the int64
    products wrap as in ATen's kernels, and the ring arithmetic gives the same bits in any
    order. The float64 log1p is the same vectorised routine in inductor as in ATen.
  * NaN handling is written with comparisons (_sanitize): the same values as
    torch.nan_to_num, which inductor would vectorise through a scalar isnan loop.

Graphs. One per kind of call, "bonus" (no drafts: a sample of p, the same for both
verifiers), "verify" (one-hot drafts), "verify_probs" (draft probs), "by_position"
(kernels.reference.verify_by_position), and per filter setting (top-k on and its k, a
shape; top-p on, and whether its threshold is an input), vocabulary size and dtypes.
Temperature and top_p values are 0-dim tensors: a new value does not compile. From
EAGER_TOP_P_VOCAB ids up, top-p's threshold is found before the call
(kernels.reference.top_p_threshold_of_logits, no sort) and given to the graph instead of
top_p, a [B, T, 1] tensor: the same value the graph's own sort would give (its softmax is
the same ATen kernel), for a tenth of the time at 49k ids. Rows B and draft width K are dynamic with size-1
dimensions kept symbolic: one graph serves B = 1..N and K = 1..8. A cold compile is about
7 s a graph on a 2-core CPU; inductor's caches make a later process's a load of about 1 s.
Each compile is counted (compile_stats()) and logged: INFO for a key's first graph,
WARNING for a recompile, with dynamo's reason. A compile that fails is logged and the key
runs its body eagerly: the same tokens, eager speed. warmup() compiles ahead of a request.

Calls. After the call that compiled it, a graph is called directly, not through dynamo:
dynamo's frame and guard evaluation cost as much as the kernels here, three times as much
right after a forward has evicted their data from the caches, and its guards would
recompile for what does not matter (the prefill's logits carry autograd's dispatch keys,
a step's inference-mode logits do not). What dynamo would guard that does matter is the
graph's key, and the dtypes, checked per call; every tensor is given dense strides, and
the graph's C++ wrapper asserts each input's sizes and strides. A graph's direct call is
compared with dynamo's result on the call that compiled it.

Inductor's compile caches key a graph by its ops, not by the region annotations on them:
a no-op post-grad pass whose uuid is this file's hash (_cache_salt) keeps an artifact
built by another version of this module from being reused.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx.traceback import annotate

from . import noise
from .compiled import dense as _dense
from .compiled import failure_counts, new_failures
from .kernels import reference
from .kernels.reference import compute_dtype, sample_exponential_race

__all__ = ["compile_stats", "sample_by_position", "sample_step", "warmup"]

logger = logging.getLogger(__name__)

# Inductor's lite mode: ATen for every op outside an annotated region, fusion inside one.
# Provenance tracking level 1 is what makes inductor keep node metadata (the region
# annotations) through its AOT trace; without it every op would fall back.
# A pointwise value of more than 20 ops read twice is stored, not recomputed (inductor's CPU
# default is 50): the hash's per-row states are then computed once instead of inlined into
# every kernel that reads them, which halves the cold compile (about 7 s a graph here) and
# costs nothing at run time.
_OPTIONS = {
    "cpp_wrapper": True,
    "fallback_by_default": True,
    "selective_decompose": True,
    "trace.provenance_tracking_level": 1,
    "realize_opcount_threshold": 20,
}
_REGION = {"compile_with_inductor": "specdec.fused"}


def _fused():
    """Ops traced in this context are fused by inductor; everything else runs its ATen kernel.
    Only ops whose rounding does not depend on evaluation order belong here (module docstring)."""
    return annotate(_REGION)


# --------------------------------------------------------------------------- traced bodies
# Each mirrors kernels.reference op for op; keep them in sync (the tests compare tokens).


def _sanitize(x: torch.Tensor) -> torch.Tensor:  # [..., V] -> same
    """reference.sanitize_logits, written with comparisons: NaN -> -inf, +inf -> the largest
    finite value, all else as is. The same values as torch.nan_to_num; inductor vectorises
    x != x, where its isnan (from nan_to_num's decomposition) runs a scalar loop per vector."""
    x = torch.where(x != x, float("-inf"), x)  # noqa: PLR0124 - true exactly for NaN
    return torch.where(x == float("inf"), torch.finfo(x.dtype).max, x)


def _probs(
    logits: torch.Tensor,  # [B, T, V] raw logits
    temperature: torch.Tensor,  # [] in compute_dtype(logits.dtype)
    top_p: torch.Tensor,  # [] top_p in compute_dtype(logits.dtype), or [B, T, 1] the top-p threshold
    top_k: int,  # 0 = off, else 0 < top_k < V
    use_top_p: bool,
) -> torch.Tensor:  # [B, T, V] in compute_dtype(logits.dtype)
    """reference.logits_to_probs. A float32 tensor / a Python float divides by the float32
    value, so the 0-dim tensors here give the same quotients and comparisons. Top-p: `top_p`
    is its value, and the graph sorts (a small vocabulary), or the threshold computed before
    the call (reference.top_p_threshold_of_logits, at EAGER_TOP_P_VOCAB ids or more: no sort)."""
    with _fused():
        x = _sanitize(logits.to(compute_dtype(logits.dtype)) / temperature)
        excluded = x.amax(dim=-1, keepdim=True) == float("-inf")  # [B, T, 1]
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # [B, T, 1]
        with _fused():
            x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)  # ATen: its sum's order decides the last bit
    if use_top_p and top_p.dim() > 0:  # the threshold, given
        torch._check(top_p.shape[0] == logits.shape[0])
        torch._check(top_p.shape[1] == logits.shape[1])
        with _fused():
            probs = probs.masked_fill(probs < top_p, 0.0)
    elif use_top_p:
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values  # [B, T, V]
        cumulative = torch.cumsum(sorted_probs, dim=-1)  # ATen (accumulates in float64 on CPU)
        with _fused():
            exclusive_mass = cumulative - sorted_probs
            last_rank = (exclusive_mass < top_p).sum(dim=-1, keepdim=True) - 1  # [B, T, 1]
            threshold = sorted_probs.gather(-1, last_rank.clamp(min=0))
            probs = probs.masked_fill(probs < threshold, 0.0)
    if use_top_p:
        total = probs.sum(dim=-1, keepdim=True)  # ATen: order-dependent
        with _fused():
            probs = probs / total
    with _fused():
        return probs.masked_fill(excluded, 0.0)


def _golden_multiples(n: int) -> torch.Tensor:  # [n] int64: i * golden (mod 2**64) for i in [0, n)
    """The hash's index terms, computed once per size by ATen (int64 multiplication wraps)."""
    table = _multiples.get(n)
    if table is None:
        table = _multiples[n] = torch.arange(n, dtype=torch.int64).mul_(noise._GOLDEN)
    return table


_multiples: dict[int, torch.Tensor] = {}


def _row_state(
    seeds: torch.Tensor,  # [...] int64
    counter_terms: torch.Tensor,  # [...] int64: counter * golden
    stream: int | torch.Tensor,  # the stream, or its term of the hash as a 0-dim int64 tensor (a graph input)
) -> torch.Tensor:  # [...] int64
    """noise.hash_bits' per-row state, with counters * golden given."""
    term = stream if isinstance(stream, torch.Tensor) else noise._wrap(stream * noise._MUL1)
    state = noise._mix_(seeds + noise._GOLDEN)
    return noise._mix_(state + counter_terms + term)


def _bits(
    state: torch.Tensor,  # [...] int64 row states
    multiples: torch.Tensor,  # [>= width + 1] int64 golden multiples
    width: int,
) -> torch.Tensor:  # [..., width] int64: noise.hash_bits
    index_terms = multiples[1 : width + 1]  # [width]: (index + 1) * golden
    return noise._mix_(index_terms + state.unsqueeze(-1))


def _uniform(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noise.uniform from its hash bits
    width = -math.frexp(torch.finfo(dtype).eps)[1] + 1
    mantissa = noise._shr(bits, 64 - width)
    return mantissa.to(torch.float64).add_(0.5).mul_(2.0 ** -width).to(dtype)


def _exponential(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noise.exponential from its hash bits
    e = noise._open_unit64(bits).neg_().log1p_().neg_()
    if dtype == torch.float64:
        return e
    return e.to(dtype).clamp_(min=torch.finfo(dtype).tiny)


def _tie(batch, *sizes) -> None:
    """Tell the tracer that these sizes are the batch: one symbol (and one graph input) for
    B instead of one per tensor that carries it."""
    for size in sizes:
        torch._check(size == batch)


def _bonus(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    multiples: torch.Tensor,  # [V + 1] int64 golden multiples
    logits: torch.Tensor,  # [B, 1, V]
    temperature: torch.Tensor,  # []
    top_p: torch.Tensor,  # [] top_p, or [B, 1, 1] its threshold (_probs)
    top_k: int,
    use_top_p: bool,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, 1], num_accepted [B]
    """No drafts: the next token is a sample of p (verify_sampling and verify_by_position
    with K = 0 both draw it with the bonus stream's noise at the row's counter)."""
    _tie(logits.shape[0], seeds.shape[0], counters.shape[0])
    with _fused():
        state = _row_state(seeds, counters * noise._GOLDEN, noise.BONUS_STREAM)  # [B]
        exponentials = _exponential(_bits(state, multiples, logits.shape[-1]), noise_dtype)  # [B, V]
    p = _probs(logits, temperature, top_p, top_k, use_top_p)  # [B, 1, V]
    with _fused():
        last = sample_exponential_race(p[:, 0], exponentials)  # [B]
        return last.unsqueeze(1), torch.zeros_like(seeds)


def _verify(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    multiples: torch.Tensor,  # [V + 1] int64 golden multiples
    draft_tokens: torch.Tensor,  # [B, K] int64, K >= 1
    draft_probs: torch.Tensor | None,  # [B, K, V] or None = one-hot
    logits: torch.Tensor,  # [B, K+1, V]
    num_draft: torch.Tensor,  # [B]
    temperature: torch.Tensor,  # []
    top_p: torch.Tensor,  # [] top_p, or [B, K+1, 1] its threshold (_probs)
    top_k: int,
    use_top_p: bool,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1], num_accepted [B]
    """The engine's _verify for sampled rows with K >= 1: its noise, then reference.verify_sampling."""
    batch, k = draft_tokens.shape
    vocab = logits.shape[-1]
    _tie(batch, seeds.shape[0], counters.shape[0], logits.shape[0], num_draft.shape[0])
    torch._check(logits.shape[1] == k + 1)
    if draft_probs is not None:
        _tie(batch, draft_probs.shape[0])
        torch._check(draft_probs.shape[1] == k)
    with _fused():
        counter_terms = counters * noise._GOLDEN  # [B]
        uniform_state = _row_state(seeds, counter_terms, noise.UNIFORM_STREAM)  # [B]
        uniforms = _uniform(_bits(uniform_state, multiples, k), noise_dtype)  # [B, K]
        bonus_state = _row_state(seeds, counter_terms, noise.BONUS_STREAM)  # [B]
        exponentials = _exponential(_bits(bonus_state, multiples, vocab), noise_dtype)  # [B, V]
    p = _probs(logits, temperature, top_p, top_k, use_top_p)  # [B, K+1, V]
    with _fused():
        tokens = draft_tokens.to(torch.int64)
        valid = reference._draft_mask(num_draft, batch, k, tokens.device)  # [B, K]
        in_vocab = (tokens >= 0) & (tokens < vocab)  # [B, K]
        safe_tokens = torch.where(in_vocab, tokens, 0).unsqueeze(-1)  # [B, K, 1]
        p_draft = torch.where(in_vocab, p[:, :k].gather(-1, safe_tokens).squeeze(-1), 0.0)  # [B, K]
        if draft_probs is None:
            q_draft = torch.ones_like(p_draft)
        else:
            q_draft = draft_probs.to(p.dtype).gather(-1, safe_tokens).squeeze(-1)  # [B, K]
        accept = (uniforms.to(p.dtype) * q_draft < p_draft) & valid
        num_accepted = reference._accepted_count(accept)  # [B]

        n = num_accepted.view(-1, 1, 1)
        p_next = p.gather(1, n.expand(-1, 1, vocab)).squeeze(1)  # [B, V]
        rejected = valid.gather(1, num_accepted.clamp(max=k - 1).view(-1, 1)).squeeze(1)
        rejected = rejected & (num_accepted < k)  # [B]: a real draft was rejected at n
        n_draft = n.clamp(max=k - 1)
        if draft_probs is None:
            d_rej = tokens.gather(1, n_draft.view(-1, 1))  # [B, 1]
            columns = torch.arange(vocab, device=tokens.device).unsqueeze(0)  # [1, V]
            residual = torch.where(columns == d_rej, 0.0, p_next)
        else:
            q_next = draft_probs.to(p.dtype).gather(1, n_draft.expand(-1, 1, vocab)).squeeze(1)
            residual = (p_next - q_next).clamp(min=0.0)
        # A sum of non-negative numbers is > 0 in any order: this test is order-free.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
        weights = torch.where(rejected.view(-1, 1), residual, p_next)
        last = sample_exponential_race(weights, exponentials)  # [B]
        return reference._emit(tokens, num_accepted, last), num_accepted


def _by_position(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    multiples: torch.Tensor,  # [V + 1] int64 golden multiples
    draft_tokens: torch.Tensor,  # [B, K] int64, K >= 1
    logits: torch.Tensor,  # [B, K+1, V]
    num_draft: torch.Tensor,  # [B]
    temperature: torch.Tensor,  # []
    top_p: torch.Tensor,  # [] top_p, or [B, K+1, 1] its threshold (_probs)
    top_k: int,
    use_top_p: bool,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1], num_accepted [B]
    """The engine's _verify_by_position with K >= 1: noise keyed by absolute position, then
    reference.verify_by_position."""
    batch, k = draft_tokens.shape
    _tie(batch, seeds.shape[0], counters.shape[0], logits.shape[0], num_draft.shape[0])
    torch._check(logits.shape[1] == k + 1)
    with _fused():
        # Slot j uses counter c + j: (c + j) * golden = c * golden + j * golden (mod 2**64).
        counter_terms = (counters * noise._GOLDEN).unsqueeze(1) + multiples[: k + 1]  # [B, K+1]
        state = _row_state(seeds.unsqueeze(1), counter_terms, noise.BONUS_STREAM)  # [B, K+1]
        exponentials = _exponential(_bits(state, multiples, logits.shape[-1]), noise_dtype)  # [B, K+1, V]
    p = _probs(logits, temperature, top_p, top_k, use_top_p)  # [B, K+1, V]
    with _fused():
        samples = sample_exponential_race(p, exponentials)  # [B, K+1]
        tokens = draft_tokens.to(torch.int64)
        valid = reference._draft_mask(num_draft, batch, k, tokens.device)  # [B, K]
        accept = (tokens == samples[:, :k]) & (samples[:, :k] >= 0) & valid
        num_accepted = reference._accepted_count(accept)  # [B]
        last = samples.gather(1, num_accepted.view(-1, 1)).squeeze(1)  # [B]
        return reference._emit(tokens, num_accepted, last), num_accepted


# --------------------------------------------------------------------------- compiling


class _Stats:
    def __init__(self) -> None:
        self.graphs = 0  # graphs compiled
        self.loaded = 0  # graphs an earlier process kept, loaded without a trace (specdec.graph_store)
        self.recompiles = 0  # graphs compiled for a key that already had one
        self.compile_s = 0.0  # seconds spent in calls that compiled
        self.keys: set[tuple] = set()


@dataclass
class _Graph:
    """A compiled graph and how to call it without dynamo: `plan` lists, per graph input,
    (argument index, None) for a tensor argument or (argument index, dim) for a size."""

    fn: Callable
    plan: list[tuple[int, int | None]]
    dtypes: dict[int, torch.dtype]  # the tensor arguments' dtypes when it was compiled


_stats = _Stats()
_lock = threading.Lock()
_compiled: dict[str, Callable] = {}
_graphs: dict[tuple, _Graph] = {}  # key -> its graph, called directly (checked against dynamo's)
_pending: list[_Graph | None] = []  # what _backend built during the current call
_failed: set[tuple] = set()  # keys whose compile failed: they run eagerly
_frozen = False  # freeze(): keys not compiled by then run eagerly instead of compiling
_looked_up: set[tuple] = set()  # keys looked for among kept graphs (specdec.graph_store)
# Keep directly called graphs for later processes and load them from there (specdec.graph_store).
KEEP_GRAPHS = True


def freeze(frozen: bool = True) -> None:
    """Stop compiling new graphs: sampling settings without one by now (another top-k, say)
    run their eager body, with the same tokens. A server freezes after its warm-up, so that no
    request stalls the whole batch for a compile."""
    global _frozen
    _frozen = frozen
def _draft(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    multiples: torch.Tensor,  # [V + 1] int64 golden multiples
    stream_term: torch.Tensor,  # [] int64: the stream's term of the hash (a tensor: one graph for every slot)
    logits: torch.Tensor,  # [B, V] the drafter's raw logits
    temperature: torch.Tensor,  # []
    top_p: torch.Tensor,  # [] top_p, or [B, 1, 1] its threshold (_probs)
    top_k: int,
    use_top_p: bool,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # token [B], q [B, V], q of the token [B]
    """A drafter's sampled token: q = logits_to_probs(logits), the exponential race with the
    slot's stream at the row's counter, and q at the token (what drafters/model.py does eagerly)."""
    _tie(logits.shape[0], seeds.shape[0], counters.shape[0])
    with _fused():
        state = _row_state(seeds, counters * noise._GOLDEN, stream_term)  # [B]
        exponentials = _exponential(_bits(state, multiples, logits.shape[-1]), noise_dtype)  # [B, V]
    q = _probs(logits.unsqueeze(1), temperature, top_p, top_k, use_top_p)[:, 0]  # [B, V]
    with _fused():
        token = sample_exponential_race(q, exponentials)  # [B]
        return token, q, q.gather(1, token.unsqueeze(1)).squeeze(1)


_BODIES: dict[str, Callable] = {"bonus": _bonus, "verify": _verify, "by_position": _by_position, "draft": _draft}
_PARAMETERS = {kind: list(inspect.signature(body).parameters) for kind, body in _BODIES.items()}


@functools.cache
def _cache_salt():
    """A no-op post-grad pass whose uuid is this file's hash. Inductor's compile caches key a
    graph by its ops, not by the region annotations on them: without the salt, a cached
    artifact built with other regions (an earlier version of this module) would be reused."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class _Salt(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            return None

        def uuid(self) -> bytes:
            return get_hash_for_files((__file__,))

    return _Salt()


def _options() -> dict:
    return dict(_OPTIONS, post_grad_custom_post_pass=_cache_salt())


def _store_name(kind: str, key: tuple, args: tuple) -> str:
    from . import graph_store

    options = {k: v for k, v in _options().items() if k != "post_grad_custom_post_pass"}  # the salt: in the code hash
    return graph_store.key({"function": f"{__name__}.{_BODIES[kind].__qualname__}", "key": repr(key),
                            "options": repr(sorted(options.items())), "arguments": graph_store.structure(args)})


def _load(kind: str, key: tuple, args: tuple) -> _Graph | None:
    """key's graph as an earlier process kept it (specdec.graph_store), or None."""
    from . import graph_store
    from .loading import _resolve_dtype

    start = time.perf_counter()
    found = graph_store.load(_store_name(kind, key, args), _options())
    if found is None:
        return None
    fn, recipe = found
    try:
        plan = [(int(i), None if d is None else int(d)) for i, d in recipe["plan"]]
        dtypes = {int(i): _resolve_dtype(d) for i, d in recipe["dtypes"].items()}
    except Exception:  # noqa: BLE001 - a recipe from other code: compile instead
        return None
    _stats.loaded += 1
    logger.info("loaded fused sampling %s in %.1f s", key, time.perf_counter() - start)
    return _Graph(fn=fn, plan=plan, dtypes=dtypes)


def _keep(kind: str, key: tuple, args: tuple, graph: _Graph) -> None:
    from . import graph_store

    recipe = {"plan": [list(entry) for entry in graph.plan],
              "dtypes": {str(i): graph_store.dtype_name(d) for i, d in graph.dtypes.items()}}
    graph_store.save(_store_name(kind, key, args), graph.fn, recipe)


def _plan(gm: torch.fx.GraphModule, example_inputs: list, names: list[str]) -> _Graph | None:
    """How to call the compiled graph from the body's arguments, or None where the graph's
    inputs are not all arguments and their sizes (dynamo names a local x's placeholder
    l_x_; a size input is found as the tensor dimension with the same symbolic size)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        return None
    tensors: dict[int, torch.Tensor] = {}
    plan: list = []
    for node in placeholders:
        value = node.meta.get("example_value")
        match = re.fullmatch(r"l_(\w+)_", node.name)
        if isinstance(value, torch.Tensor) and match and match.group(1) in names:
            index = names.index(match.group(1))
            tensors[index] = value
            plan.append((index, None))
        elif isinstance(value, torch.SymInt):
            plan.append(value)
        else:
            return None

    def canonical(size):
        return size.node.shape_env.replace(size.node.expr) if isinstance(size, torch.SymInt) else None

    for position, entry in enumerate(plan):
        if isinstance(entry, tuple):
            continue
        expr = canonical(entry)
        found = [(i, d) for i, t in tensors.items() for d, size in enumerate(t.shape) if canonical(size) == expr]
        if not found:
            return None
        plan[position] = found[0]
    return _Graph(fn=None, plan=plan, dtypes={i: t.dtype for i, t in tensors.items()})


def _backend(gm: torch.fx.GraphModule, example_inputs: list, *, kind: str) -> Callable:
    """Inductor in lite mode with the C++ wrapper; counts the graphs it compiles and notes
    how to call each directly."""
    from torch._inductor.compile_fx import compile_fx

    from . import graph_store

    _stats.graphs += 1
    with graph_store.bundled():  # so that the graph can be kept for later processes
        fn = compile_fx(gm, example_inputs, config_patches=_options())
    graph = _plan(gm, example_inputs, _PARAMETERS[kind])
    if graph is not None:
        graph.fn = fn
    _pending.append(graph)
    return fn


@contextlib.contextmanager
def _size_oblivious():
    """Keep size-1 dimensions symbolic while tracing: one graph for B = 1 and B > 1, K = 1 and K > 1."""
    try:
        import torch.fx.experimental._config as fx_config
    except ImportError:  # pragma: no cover - older torch: size-1 dims specialize (one more graph)
        yield
        return
    if "backed_size_oblivious" not in getattr(fx_config, "_config", {}):  # pragma: no cover
        yield
        return
    with fx_config.patch(backed_size_oblivious=True):
        yield


# Graphs per body that dynamo keeps (torch's default is 8): every key of a body (filters,
# vocabulary, dtypes) is one; the compiled step forwards raise the same limit.
_RECOMPILE_LIMIT = 64


def _function(kind: str) -> Callable:
    fn = _compiled.get(kind)
    if fn is None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        backend = functools.partial(_backend, kind=kind)
        fn = _compiled[kind] = torch.compile(_BODIES[kind], backend=backend, fullgraph=True, dynamic=None)
    return fn


def _direct(graph: _Graph, args: tuple) -> tuple | None:
    """Run a compiled graph without dynamo, or None where an argument's dtype is not the one
    it was compiled for (its C++ wrapper checks every input's sizes and strides itself)."""
    for index, dtype in graph.dtypes.items():
        if args[index].dtype != dtype:
            return None
    return tuple(graph.fn(*[args[i] if dim is None else args[i].shape[dim] for i, dim in graph.plan]))


def _run(kind: str, key: tuple, args: tuple, dynamic: tuple[tuple[int, int], ...]) -> tuple:
    """Call kind's compiled body: directly once its key has a graph, through dynamo to compile
    (see "Calls" in the module docstring).

    key: what selects a graph; dynamic: (argument index, dimension) pairs that vary. The call
    that compiles marks those dimensions dynamic, keeps size-1 dimensions symbolic and all
    else static (dynamo would otherwise make top_k, an int argument, symbolic once it has
    seen two values), and checks the new graph's direct call against dynamo's result. A
    graph whose inputs cannot be matched to the arguments keeps running through dynamo.
    """
    with _lock:  # dynamo's compile is not thread-safe; the calls themselves take microseconds
        graph = _graphs.get(key)
        if graph is None and KEEP_GRAPHS and key not in _looked_up:
            _looked_up.add(key)
            graph = _load(kind, key, args)
            if graph is not None:
                _graphs[key] = graph
        if graph is not None:
            out = _direct(graph, args)
            if out is not None:
                return out
        if key in _failed or _frozen and key not in _stats.keys:
            return _BODIES[kind](*args)
        out, new = _through_dynamo(kind, key, args, dynamic)
        if new is not None:
            direct = _direct(new, args)
            if direct is not None and len(direct) == len(out) and all(map(torch.equal, direct, out)):
                _graphs[key] = new
                if KEEP_GRAPHS:
                    _keep(kind, key, args, new)
            else:
                logger.warning("fused sampling %s: the direct call disagrees with dynamo's; using dynamo", key)
        return out


def _through_dynamo(
    kind: str, key: tuple, args: tuple, dynamic: tuple[tuple[int, int], ...]
) -> tuple[tuple, _Graph | None]:  # the outputs, and the graph it compiled for a new key (else None)
    fn = _function(kind)
    _pending.clear()
    failures = failure_counts()
    before = _stats.graphs
    start = time.perf_counter()
    try:
        if key in _stats.keys:
            out = fn(*args)
        else:
            for index, dim in dynamic:
                torch._dynamo.maybe_mark_dynamic(args[index], dim)
            with _size_oblivious(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                out = fn(*args)
    except Exception:  # a compiler failure must not stop decoding: the eager body gives the same tokens
        logger.exception("fused sampling %s failed to compile; it runs eagerly", key)
        _failed.add(key)
        return _BODIES[kind](*args), None
    compiled = _stats.graphs - before
    if compiled:
        elapsed = time.perf_counter() - start
        _stats.compile_s += elapsed
        if key in _stats.keys:
            _stats.recompiles += compiled
            logger.warning(
                "recompiled fused sampling %s (%.1f s): %s; shapes %s, strides %s",
                key, elapsed, " | ".join(new_failures(failures)) or "no reason recorded", _shapes(args),
                _strides(args),
            )
        else:
            logger.info("compiled fused sampling %s in %.1f s", key, elapsed)
    # The last graph built is the one dynamo installed: with fullgraph there is one a call, but
    # a compile can restart the trace (a guard found while compiling) and build it again.
    new = _pending[-1] if compiled and _pending and key not in _stats.keys else None
    _stats.keys.add(key)
    return out, new


def _shapes(args: tuple) -> list:
    return [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]


def _strides(args: tuple) -> list:
    return [a.stride() for a in args if isinstance(a, torch.Tensor)]


_scalars: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor holding `value` in `dtype` (kept: a request asks for it every step)."""
    tensor = _scalars.get((value, dtype))
    if tensor is None:
        if len(_scalars) > 256:
            _scalars.clear()
        tensor = _scalars[(value, dtype)] = torch.tensor(value, dtype=dtype)
    return tensor


def _settings(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:  # temperature [], top_p [], top_k (0 = off), top-p on
    """The graph's sampling inputs: the values as 0-dim tensors in the compute dtype (the dtype a
    Python float is cast to when eager divides or compares with it), the switches as constants."""
    if temperature <= 0:
        raise ValueError(f"fused sampling needs temperature > 0, got {temperature}")
    vocab = logits.shape[-1]
    top_k = top_k if 0 < top_k < vocab else 0  # the reference's "off" cases, one graph
    dtype = compute_dtype(logits.dtype)
    return _scalar(float(temperature), dtype), _scalar(float(top_p), dtype), top_k, top_p < 1.0


# At this many vocabulary ids or more, a top-p graph takes the nucleus's threshold as an input,
# found before the call without a sort (reference.top_p_threshold_of_logits: the same value
# bit for bit), instead of sorting the vocabulary inside the graph (3.8 ms a row at 49k ids,
# 22 ms at 262k, on one CPU core). Below it the sort is cheap and the eager ops are not.
EAGER_TOP_P_VOCAB = 16384


def _top_p_argument(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, top_p_t: torch.Tensor,
                    use_top_p: bool) -> torch.Tensor:  # [] top_p, or [B, T, 1] its threshold
    """What a graph's top_p argument is for these logits [B, T, V]: the threshold where the
    vocabulary is large (EAGER_TOP_P_VOCAB), else the value."""
    if not use_top_p or logits.shape[-1] < EAGER_TOP_P_VOCAB:
        return top_p_t
    return _dense(reference.top_p_threshold_of_logits(logits, float(temperature), top_k, float(top_p)))


def _with_threshold(dynamic: tuple, top_p_arg: torch.Tensor, index: int, width: bool) -> tuple:
    """`dynamic` plus the threshold argument's varying dims (rows, and the width where it varies)."""
    if top_p_arg.dim() == 0:
        return dynamic
    return dynamic + ((index, 0), (index, 1)) if width else dynamic + ((index, 0),)


# --------------------------------------------------------------------------- public entry points


# Which (argument, dimension) pairs vary: rows B everywhere, the draft width K (and K+1).
_BONUS_DYNAMIC = ((0, 0), (1, 0), (3, 0))
_VERIFY_DYNAMIC = ((0, 0), (1, 0), (3, 0), (3, 1), (5, 0), (5, 1), (6, 0))
_VERIFY_PROBS_DYNAMIC = _VERIFY_DYNAMIC + ((4, 0), (4, 1))
_BY_POSITION_DYNAMIC = ((0, 0), (1, 0), (3, 0), (3, 1), (4, 0), (4, 1), (5, 0))


def _bonus_call(seeds, counters, logits, temperature, top_k, top_p, noise_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    temperature_t, top_p_t, top_k, use_top_p = _settings(logits, temperature, top_k, top_p)
    vocab = logits.shape[-1]
    top_p_arg = _top_p_argument(logits, temperature, top_k, top_p, top_p_t, use_top_p)
    return _run(
        "bonus", ("bonus", vocab, logits.dtype, top_k, use_top_p, top_p_arg.dim(), noise_dtype),
        (_dense(seeds), _dense(counters), _golden_multiples(vocab + 1), _dense(logits), temperature_t, top_p_arg, top_k,
         use_top_p, noise_dtype),
        _with_threshold(_BONUS_DYNAMIC, top_p_arg, 5, width=False),
    )


_DRAFT_DYNAMIC = ((0, 0), (1, 0), (4, 0))
_stream_terms: dict[int, torch.Tensor] = {}


def sample_draft(
    seeds: torch.Tensor,  # [B] int64 noise seed per row
    counters: torch.Tensor,  # [B] int64 noise counter per row (its sequence length)
    logits: torch.Tensor,  # [B, V] a drafter's raw logits, CPU
    stream: int,  # the noise stream (noise.DRAFT_STREAM + the draft slot)
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # token [B], q [B, V], q of the token [B]
    """What a drafter does for a sampled draft token, in one compiled graph: q =
    logits_to_probs(logits), the exponential race with `stream`'s noise at each row's
    counter, and q at the token. The same values as that eager sequence."""
    temperature_t, top_p_t, top_k, use_top_p = _settings(logits, temperature, top_k, top_p)
    vocab = logits.shape[-1]
    term = _stream_terms.get(stream)
    if term is None:
        term = _stream_terms[stream] = torch.tensor(noise._wrap(stream * noise._MUL1), dtype=torch.int64)
    top_p_arg = _top_p_argument(logits.unsqueeze(1), temperature, top_k, top_p, top_p_t, use_top_p)
    return _run(
        "draft", ("draft", vocab, logits.dtype, top_k, use_top_p, top_p_arg.dim(), noise_dtype),
        (_dense(seeds), _dense(counters), _golden_multiples(vocab + 1), term, _dense(logits), temperature_t, top_p_arg,
         top_k, use_top_p, noise_dtype),
        _with_threshold(_DRAFT_DYNAMIC, top_p_arg, 6, width=False),
    )


def sample_step(
    seeds: torch.Tensor,  # [B] int64 noise seed per row
    counters: torch.Tensor,  # [B] int64 noise counter per row (its sequence length)
    draft_tokens: torch.Tensor,  # [B, K] int64
    draft_probs: torch.Tensor | None,  # [B, K, V_draft] processed draft probs q (V_draft <= V); None = one-hot
    logits: torch.Tensor,  # [B, K+1, V] raw target logits, CPU
    num_draft: torch.Tensor,  # [B] drafts per row (<= K)
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B]
    """What the engine's _verify does for sampled rows, in one compiled graph: uniforms
    (UNIFORM_STREAM, K) and exponentials (BONUS_STREAM, V) at each row's counter, then
    kernels.verify_sampling. The same tokens as that eager sequence."""
    if draft_tokens.shape[1] == 0:
        return _bonus_call(seeds, counters, logits, temperature, top_k, top_p, noise_dtype)
    temperature_t, top_p_t, top_k, use_top_p = _settings(logits, temperature, top_k, top_p)
    vocab = logits.shape[-1]
    kind = "verify"
    if draft_probs is not None:
        kind = ("verify_probs", draft_probs.dtype)
        if draft_probs.shape[-1] < vocab:
            # A draft vocabulary may be a prefix of the target's (padded embedding tables); padded
            # here, as the engine does, so that every draft vocabulary shares the graph.
            draft_probs = torch.nn.functional.pad(draft_probs, (0, vocab - draft_probs.shape[-1]))
        draft_probs = _dense(draft_probs)
    top_p_arg = _top_p_argument(logits, temperature, top_k, top_p, top_p_t, use_top_p)
    return _run(
        "verify",
        (kind, vocab, logits.dtype, top_k, use_top_p, top_p_arg.dim(), noise_dtype),
        (_dense(seeds), _dense(counters), _golden_multiples(vocab + 1), _dense(draft_tokens), draft_probs,
         _dense(logits), _dense(num_draft), temperature_t, top_p_arg, top_k, use_top_p, noise_dtype),
        _with_threshold(_VERIFY_DYNAMIC if draft_probs is None else _VERIFY_PROBS_DYNAMIC, top_p_arg, 8, width=True),
    )


def sample_by_position(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    draft_tokens: torch.Tensor,  # [B, K] int64
    logits: torch.Tensor,  # [B, K+1, V] raw target logits, CPU
    num_draft: torch.Tensor,  # [B]
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    noise_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B]
    """What the engine's _verify_by_position does for sampled rows, in one compiled graph:
    noise.exponential_by_position over K+1 positions, then reference.verify_by_position."""
    if draft_tokens.shape[1] == 0:  # one position: the bonus sample, same noise and same race
        return _bonus_call(seeds, counters, logits, temperature, top_k, top_p, noise_dtype)
    temperature_t, top_p_t, top_k, use_top_p = _settings(logits, temperature, top_k, top_p)
    vocab = logits.shape[-1]
    top_p_arg = _top_p_argument(logits, temperature, top_k, top_p, top_p_t, use_top_p)
    return _run(
        "by_position", ("by_position", vocab, logits.dtype, top_k, use_top_p, top_p_arg.dim(), noise_dtype),
        (_dense(seeds), _dense(counters), _golden_multiples(vocab + 1), _dense(draft_tokens), _dense(logits),
         _dense(num_draft), temperature_t, top_p_arg, top_k, use_top_p, noise_dtype),
        _with_threshold(_BY_POSITION_DYNAMIC, top_p_arg, 7, width=True),
    )


def warmup(
    vocab_size: int,
    *,
    logits_dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    draft_probs: bool = True,
    by_position: bool = False,
    draft_vocab_sizes: tuple[int, ...] = (),
) -> float:
    """Compile the graphs a sampled request with these settings needs (no drafts, drafts
    without and, with draft_probs, with draft probs; by_position: the by-position verifier);
    returns the seconds spent. Values of temperature and top_p do not matter, only whether
    top-k / top-p are on (and top-k's k)."""
    start = time.perf_counter()
    noise_dtype = compute_dtype(logits_dtype)
    seeds = torch.zeros(2, dtype=torch.int64)
    counters = torch.ones(2, dtype=torch.int64)
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "noise_dtype": noise_dtype}
    for k in (0, 2):
        drafts = torch.zeros(2, k, dtype=torch.int64)
        logits = torch.zeros(2, k + 1, vocab_size, dtype=logits_dtype)
        num_draft = torch.full((2,), k, dtype=torch.int64)
        sample_step(seeds, counters, drafts, None, logits, num_draft, **settings)
        if k and draft_probs:
            probs = torch.full((2, k, vocab_size), 1.0 / vocab_size, dtype=noise_dtype)
            sample_step(seeds, counters, drafts, probs, logits, num_draft, **settings)
        if k and by_position:
            sample_by_position(seeds, counters, drafts, logits, num_draft, **settings)
    for vocab in sorted(set(draft_vocab_sizes)):  # sampled draft tokens (a draft model's, a head's)
        sample_draft(seeds, counters, torch.zeros(2, vocab, dtype=logits_dtype), noise.DRAFT_STREAM, **settings)
    return time.perf_counter() - start


def compile_stats() -> dict:
    """Fused sampling in this process: graphs compiled, graphs loaded as an earlier process kept
    them (specdec.graph_store), recompiles among the compiled, seconds spent compiling, keys
    whose graph is called directly, keys that run eagerly (compile failed)."""
    return {
        "graphs": _stats.graphs, "loaded": _stats.loaded, "recompiles": _stats.recompiles,
        "compile_s": round(_stats.compile_s, 3),
        "direct": len(_graphs), "eager": len(_failed),
    }
