"""KV state of one model for a batch of rows: the static per-row path and the generic path.

Both paths share one interface. `forward(ids [B, T], num_valid [B])` feeds T tokens per
row, of which the first num_valid[b] are real, at the row's own next positions, and
advances each row's length by num_valid; `set_lengths(lengths)` moves rows back (a
rollback of rejected drafts); `select_rows(keep)` drops finished rows.

Static path (`StaticKV`, the default where the model allows it): one preallocated
buffer [B, H, S, D] per layer (`RowCache`). Row b's token i always lives at position i,
so a row has no holes; its new tokens are scattered to positions lengths[b] + t; a
rollback only moves lengths back (the stale tail is overwritten later and never read).
Attention gets a prefix view of the buffer, [B, H, W, D] with W the longest row rounded
up to a bucket of 64, and a ready 4-D additive mask [B, 1, T, W] built on the device,
which transformers passes through without inspecting it. Nothing in a step reads a
value back to the host, and shapes depend only on (B, T, W), so a step is capturable.
The prefill, whose width is the request's own anyway, attends over exactly the longest
prompt instead.

Numerics (bfloat16): the masked tail of a bucket gets exactly zero attention weight, but
it still takes part in the reduction over keys. torch's CPU attention kernel sums keys in
vector-wide chunks with a separate remainder, so padding L keys to W changes the order of
the float32 sums whenever L is not a multiple of 16 (the float32 vector width of AVX-512;
measured with torch 2.13: never a difference when it is, about one call in three when it
is not). With grouped-query attention, one query token and a mask, transformers' SDPA
integration also packs the query heads of a key/value group into the query axis, where
its unmasked decoding step (a row alone) passes `enable_gqa` instead. Each changes the last bits of the attention
output, so a decoding step of the static path is not bit-identical to transformers' one;
in bfloat16, where the two best logits of a step are often exactly tied, greedy output
can then take the other token. Bit-identical steps need attention over exactly the cached
length, a width that changes every step: that is the generic path (its cache is exactly
as long as the row), whose greedy output for a row alone equals transformers' `generate`.

Generic path (`DynamicKV`): transformers' DynamicCache plus a 2-D validity mask
[B, S] with explicit position ids; rejected slots become holes and dead tail columns
are cropped (which reads the mask on the host). It serves what the static path cannot:
caches whose layers are not plain KV, sliding windows shorter than the request, and
attention implementations that do not take an additive 4-D mask.

`engine_path` makes the choice and says why; recurrent and state-space models are
refused by `check_supported` before any compute, since their state cannot be rolled
back to an earlier position.
"""

from __future__ import annotations

import functools
import inspect
import logging
from abc import ABC, abstractmethod

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .compiled import mark_step_dynamic
from .numerics import StableHead, stable_head

logger = logging.getLogger(__name__)

BUCKET = 64  # attention width granularity: a few shapes, never the unused tail
ENGINE_PATHS = ("auto", "static", "generic")

# Model types whose state is recurrent (or partly so): no per-position KV to roll back.
_RECURRENT_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "zamba", "zamba2",
    "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2", "lfm2_moe", "qwen3_next", "minimax",
})
_RECURRENT_WORDS = ("mamba", "linear", "conv", "recurrent", "rnn", "ssm", "rwkv")
# Attention implementations that take a ready additive [B, 1, T, W] mask.
_MASKED_ATTENTION = ("sdpa", "eager", None)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword `model.forward` takes its KV cache by: "cache" from transformers 5.25 on
    (where "past_key_values" is deprecated, to be removed in 5.40: a warning and a wrapper
    call per forward until then), "past_key_values" before it and for models not converted."""
    return _cache_keyword(type(model))


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:
    try:  # the class's forward: accelerate's hooks replace the instance's, keeping no signature
        parameters = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned (`cache` from transformers 5.25 on, else `past_key_values`)."""
    return out["cache"] if "cache" in out else out.past_key_values


def check_supported(name: str, model: torch.nn.Module) -> None:
    """Raise ValueError for models whose cache cannot be rolled back (recurrent, state-space)."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    layer_types = [str(t) for t in (getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or [])]
    recurrent = [t for t in layer_types if any(w in t.lower() for w in _RECURRENT_WORDS)]
    if not recurrent and model_type not in _RECURRENT_TYPES:
        try:
            cache = DynamicCache(config=config)
            recurrent = [type(layer).__name__ for layer in cache.layers if not isinstance(layer, CacheLayerMixin)]
        except Exception:  # a config the probe does not understand: judged by its type alone
            recurrent = []
    if recurrent or model_type in _RECURRENT_TYPES:
        raise ValueError(
            f"{name} is a recurrent or state-space model ({model_type or type(model).__name__}"
            f"{', layers: ' + ', '.join(sorted(set(recurrent))) if recurrent else ''}); speculative decoding "
            "needs an attention KV cache that can be rolled back to an earlier position. Use a transformer "
            "(attention-only) causal LM"
        )


def static_blocker(model: torch.nn.Module, capacity: int) -> str | None:
    """Why `model` cannot take the static path for requests of `capacity` positions, or None."""
    config = model.config
    attn = getattr(config, "_attn_implementation", None)
    if attn not in _MASKED_ATTENTION:
        return f"attention implementation {attn!r} takes no additive 4-D mask"
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") == "bloom":
        return "ALiBi positions are derived from a 2-D attention mask"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as err:  # noqa: BLE001 - any failure means: not a plain KV cache we can mirror
        return f"its cache layers cannot be inspected ({type(err).__name__})"
    plain = (DynamicLayer, DynamicSlidingWindowLayer)
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) not in plain})
    if odd:
        return f"cache layers are not plain KV ({', '.join(odd)})"
    window = getattr(config, "sliding_window", None)
    # Judged from the config as well as the probe: a transformers version that builds
    # cache layers lazily would show none, and a window must never be ignored.
    sliding = any(isinstance(layer, DynamicSlidingWindowLayer) for layer in layers) or (
        getattr(config, "use_sliding_window", True) is not False
    )
    if sliding and isinstance(window, int) and window < capacity:
        return f"sliding window {window} is shorter than the request ({capacity} positions)"
    return None


def engine_path(model: torch.nn.Module, requested: str, capacity: int, role: str = "target") -> str:
    """"static" or "generic" for this model and request; the reason goes to the debug log."""
    if requested not in ENGINE_PATHS:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_PATHS)}, got {requested!r}")
    if requested == "generic":
        logger.debug("%s: generic KV path (requested)", role)
        return "generic"
    blocker = static_blocker(model, capacity)
    if blocker is None:
        logger.debug("%s: static per-row KV path (%d positions)", role, capacity)
        return "static"
    if requested == "static":
        raise ValueError(
            f'engine="static" cannot serve this {role} model: {blocker}; use engine="auto" (which falls '
            'back to the generic path) or engine="generic"'
        )
    logger.debug("%s: generic KV path: %s", role, blocker)
    return "generic"


def make_kv(
    model, path: str, batch: int, capacity: int, device: torch.device, vocab_size: int | None = None,
    numerics: str = "native", compiled=None,
):
    """The KV state of `model` for a batch on the chosen path; `numerics="stable"` computes its
    final norm and LM head in float32 and its attention eagerly (specdec.numerics);
    `compiled` (a specdec.compiled.CompiledForward) runs the static path's step forwards
    compiled (the generic path has no fixed shapes to compile and stays eager)."""
    cls = StaticKV if path == "static" else DynamicKV
    kv = cls(model, batch, capacity, device, vocab_size)
    if numerics == "stable":
        kv.stable = stable_head(model)
    if compiled is not None and path == "static" and numerics != "stable":
        kv.use_compiled(compiled)
    return kv


def bucket_width(length: int, capacity: int) -> int:
    """Attention width for rows up to `length` tokens: the next multiple of BUCKET."""
    return min(capacity, -(-max(length, 1) // BUCKET) * BUCKET)


# --------------------------------------------------------------------------- shared


class KVState(ABC):
    """A model's KV cache for a batch of rows (see the module docstring)."""

    path: str

    def __init__(self, model, batch: int, capacity: int, device: torch.device, vocab_size: int | None) -> None:
        self.model = model
        self.cache_keyword = cache_keyword(model)  # forward's name for the KV cache, resolved once
        self.device = device
        self.capacity = capacity
        # Ids at or past the model's vocabulary (a draft whose table is a prefix of the
        # target's) are clamped: it only costs draft quality, never correctness.
        self.max_id = (vocab_size - 1) if vocab_size else None
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B] tokens cached per row
        self.bound = 0  # host-side upper bound on max(lengths), so no step reads lengths back
        self.forwards = 0
        self.dtype = next(model.parameters()).dtype
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.stable: StableHead | None = None  # numerics "stable": float32 final norm and head, eager attention
        self.compiled = None  # specdec.compiled.CompiledForward for step forwards (static path only)

    def use_compiled(self, compiled) -> None:
        """Run step forwards (not the prefill) through `compiled`."""
        raise NotImplementedError(f"the {self.path} KV path has no compiled step")

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]; slots past num_valid are ignored
        num_valid: torch.Tensor | None = None,  # [B] real tokens per row (a prefix); None = all T
        *,
        keep: int | torch.Tensor | None = None,  # logits of the last `keep` slots, or of the slots a 1-D tensor lists; None = every slot
        hidden: bool | tuple[int, ...] = False,  # also return hidden states: True the last layer's, a tuple
        # those entering these layers (transformers' hidden_states[i]) concatenated, [B, T, len * H]
        exact_width: bool = False,  # static path: attend over exactly the cached prefix, not its bucket
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # logits [B, T or the kept slots, V], hidden [B, T, H] or None
        batch, width = input_ids.shape
        slots = torch.arange(width, device=self.device)  # [T]
        positions = self.lengths.unsqueeze(1) + slots  # [B, T]: row b's slot t goes to lengths[b] + t
        if num_valid is not None:
            # Slots past a row's real tokens repeat its last real position, so their position
            # ids never pass the model's limit (learned position tables have no row for it).
            last_real = (self.lengths + num_valid - 1).clamp(min=0)  # [B]
            position_ids = torch.minimum(positions, last_real.unsqueeze(1))
        else:
            position_ids = positions
        kwargs = {}
        if keep is not None and self._keep_arg:  # transformers' logits_to_keep: an int or 1-D indices
            kwargs["logits_to_keep"] = keep
        if hidden:
            kwargs["output_hidden_states"] = True
        ids = input_ids.clamp(min=0, max=self.max_id)
        self.hidden_asked = hidden
        if self.stable is None:
            out = self._call(ids, positions, position_ids, num_valid, width, kwargs, exact_width)
        else:
            with self.stable.applied():
                out = self._call(ids, positions, position_ids, num_valid, width, kwargs, exact_width)
        self.lengths = self.lengths + (num_valid if num_valid is not None else width)
        self.forwards += 1
        if not hidden:
            return out.logits, None
        selected = getattr(out, "selected_hidden", None)  # a compiled step's (specdec.compiled.StepOutput)
        return out.logits, selected if selected is not None else select_hidden(out.hidden_states, hidden)

    @abstractmethod
    def _call(self, ids, positions, position_ids, num_valid, width: int, kwargs: dict, exact_width: bool):
        """One model forward; `positions` [B, T] are where slots are written, `position_ids`
        [B, T] what the model is told."""

    @abstractmethod
    def set_lengths(self, lengths: torch.Tensor, bound: int | None = None) -> None:  # [B]
        """Keep the first lengths[b] tokens of row b (never more than it has)."""

    @abstractmethod
    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows, in this order."""

    can_merge = False  # merge() is implemented

    def merge(self, other: "KVState") -> None:
        """Append the rows of `other` (the same model's KV on the same path) after these."""
        raise NotImplementedError(f"the {self.path} KV path cannot merge batches")


def select_hidden(states: tuple[torch.Tensor, ...], hidden: bool | tuple[int, ...]) -> torch.Tensor:
    """The hidden states a forward was asked for: the last layer's (True) or those entering the
    listed layers, concatenated along the feature axis."""
    if hidden is True:
        return states[-1]
    return torch.cat([states[i] for i in hidden], dim=-1)


def prefill(kv: KVState, prompts: list[list[int]]) -> None:
    """Feed every prompt token but the last, which opens a drafter's first window."""
    rows = [p[:-1] for p in prompts]
    if max(len(r) for r in rows) > 0:
        _feed(kv, rows, keep=1)


def prefill_logits(
    kv: KVState, prompts: list[list[int]], *, hidden: bool | tuple[int, ...] = False, all_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:  # logits [B, 1, V], hidden [B, 1, H] ([B, P, H]: all_hidden) or None
    """Feed every prompt token; return the logits (and hidden states, see KVState.forward) after
    each row's last one, which stand in for the first step's forward over that token
    (all_hidden: the hidden states of every prompt position, right-padded, instead).

    This is how transformers' `generate` computes the first new token: one forward over the
    whole prompt. Feeding the last prompt token as a one-token step instead computes the same
    values in another order (a one-query attention against the prompt's keys, not a row of the
    prompt's causal attention); in bfloat16 that changes the last bits of its keys, values and
    logits, and with them which of two tied logits wins a later greedy step.
    """
    ends = sorted({len(p) - 1 for p in prompts})  # the rows' last slots, each once
    keep = torch.tensor(ends, dtype=torch.long, device=kv.device) if kv._keep_arg else None
    logits, states, valid = _feed(kv, prompts, keep=keep, hidden=hidden)  # [B, len(ends) or W, V]
    last = valid - 1  # [B] each row's last prompt slot
    column = torch.tensor([ends.index(len(p) - 1) for p in prompts], device=kv.device) if kv._keep_arg else last
    vocab = logits.shape[-1]
    logits = logits.gather(1, column.view(-1, 1, 1).expand(-1, 1, vocab))  # [B, 1, V]
    if states is not None and not all_hidden:
        states = states.gather(1, last.view(-1, 1, 1).expand(-1, 1, states.shape[-1]))  # [B, 1, H]
    return logits, states


def _feed(kv: KVState, rows: list[list[int]], keep: int | torch.Tensor | None, hidden: bool | tuple[int, ...] = False):
    """One forward over right-padded rows (row b's tokens sit at positions 0.. on the static
    path), attending over exactly the longest row: a prefill's width is the request's own, so
    the bucket saves nothing, and its masked tail would change the attention's rounding.
    `keep`: logits of the last `keep` slots, or of the slots a 1-D tensor lists (the rows'
    last slots of a ragged batch: [B, distinct lengths, V], never [B, W, V]); None = all."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    valid = torch.tensor([len(r) for r in rows], dtype=torch.long).to(kv.device)  # [B]
    logits, states = kv.forward(ids.to(kv.device), valid, keep=keep, hidden=hidden, exact_width=True)
    kv.bound = width
    return logits, states, valid


# --------------------------------------------------------------------------- static path


def write_rows(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
    """Write k, v [B, H, T, D] into the buffers keys, values [B, H, C, D] at row b's positions
    positions[b] [B, T], in place.

    Traced into a compiled step it is an index_put_: inductor turns a scatter_ on a graph input
    into a copy of the whole buffer, the scatter, and a copy back (per layer and step: the
    bundled target's 16 layers at 320 slots moved ~10 MB a step, a third of a one-token step),
    while it keeps an index_put_ in place. Eager, scatter_ is the cheaper call (3 against 6 us).
    Both write the same values."""
    if torch.compiler.is_compiling():
        rows = torch.arange(positions.shape[0], device=positions.device).view(-1, 1)  # [B, 1]
        keys[rows, :, positions] = k.transpose(1, 2).to(keys.dtype)  # the values as [B, T, H, D]
        values[rows, :, positions] = v.transpose(1, 2).to(values.dtype)
        return
    batch, heads, width = k.shape[:3]
    index = positions.view(batch, 1, width, 1)
    keys.scatter_(2, index.expand(-1, heads, -1, k.shape[-1]), k.to(keys.dtype))
    values.scatter_(2, index.expand(-1, v.shape[1], -1, v.shape[-1]), v.to(values.dtype))


class _RowLayer(CacheLayerMixin):
    """One layer's [B, H, S, D] buffers; update() writes each row at its own positions."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "RowCache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        # Zeros, not empty: masked columns still enter the attention matmul, and stale
        # memory could hold NaN or inf.
        self.keys = key_states.new_zeros(batch, heads, self.owner.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.owner.capacity, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True
        if self.owner.compiled:
            self._mark_compiled()

    def _mark_compiled(self) -> None:
        """Rows and capacity vary between requests and steps: one graph serves them all."""
        for buffer in (self.keys, self.values):
            mark_step_dynamic(buffer, (0, 2))
            if self.owner.static_addresses:  # CUDA graphs replay on these very buffers
                torch._dynamo.mark_static_address(buffer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states [B, H, T, Dk], value_states [B, H, T, Dv]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = self.owner.write_positions  # [B, T]
        write_rows(self.keys, self.values, pos, key_states, value_states)
        view = self.owner.attention_width()
        return self.keys[:, :, :view], self.values[:, :, :view]  # [B, H, W, D]: the prefix only

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.attention_width(), 0

    def get_seq_length(self) -> int:
        return self.owner.seen_hint

    def get_max_length(self) -> int:
        return self.owner.capacity

    @torch.inference_mode()
    def select(self, keep: torch.Tensor) -> None:  # [B'] int64
        if self.is_initialized:
            self.keys = self.keys.index_select(0, keep)
            self.values = self.values.index_select(0, keep)
            if self.owner.compiled:
                self._mark_compiled()


class RowCache(Cache):
    """A transformers Cache of per-row static layers; the owner sets where each forward writes."""

    def __init__(self, capacity: int) -> None:
        super().__init__(layers=[])
        self.capacity = capacity
        self.write_positions: torch.Tensor | None = None  # [B, T] set before each forward
        self.view_width = BUCKET  # W: how much of the buffer attention sees
        self.seen_hint = 0  # host int for models that ask for a "past length" (a bound, unused by masks)
        self.compiled = False  # step forwards compiled: buffers marked dynamic, attention over all of them
        self.full_view = False  # attention's width is span's (compiled steps; the prefill never)
        self.span: torch.Tensor | None = None  # [W] arange(W): a compiled step's attention width, as a size
        self.static_addresses = False  # CUDA graphs: buffers keep their addresses

    def attention_width(self):
        """W, the buffer columns attention reads: span's size on a compiled step (a symbol in the
        graph, no Python int), else view_width."""
        return self.span.shape[0] if self.full_view else self.view_width

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(_RowLayer(self))
        return self.layers[layer_idx].update(key_states, value_states)


class StaticKV(KVState):
    """Per-row static KV: rows written at their own positions, rollback = lengths move back."""

    path = "static"

    def __init__(self, model, batch, capacity, device, vocab_size) -> None:
        super().__init__(model, batch, capacity, device, vocab_size)
        self.cache = RowCache(capacity)
        self._spans: dict[int, torch.Tensor] = {}  # attention width -> arange(width) (compiled steps)
        self._min = torch.finfo(self.dtype).min if self.dtype.is_floating_point else float("-inf")

    def use_compiled(self, compiled) -> None:
        self.compiled = compiled
        self.cache.compiled = True
        self.cache.static_addresses = compiled.static_addresses

    def _call(self, ids, positions, position_ids, num_valid, width, kwargs, exact_width):
        if self.compiled is not None and not exact_width and self.cache.layers:  # buffers exist: a step
            return self._compiled_call(ids, positions, position_ids, width, kwargs)
        self.cache.full_view = False
        view = min(self.bound + width, self.capacity) if exact_width else bucket_width(self.bound + width, self.capacity)
        self.cache.write_positions = positions
        self.cache.view_width = view
        self.cache.seen_hint = self.bound
        columns = torch.arange(view, device=self.device)  # [W]
        # Query t of row b sees its row's positions 0 .. lengths[b] + t, nothing else.
        visible = columns.view(1, 1, view) <= positions.unsqueeze(-1)  # [B, T, W]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, self._min)
        out = self.model(
            input_ids=ids,
            attention_mask=mask.unsqueeze(1),  # [B, 1, T, W] additive, passed through as-is
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_keyword: self.cache},
            **kwargs,
        )
        self.bound = self.bound + width
        return out

    def _compiled_call(self, ids, positions, position_ids, width, kwargs):
        """A step forward through the compiled graph: attention over the bucket's first W
        columns as the eager path (the mask is built inside the graph from the write
        positions), W given as the size of a tensor (`span`, arange(W)), so the graph's shapes
        are (B, T, C, W), all dynamic, and nothing in it reads a Python int that changes."""
        if position_ids is positions:  # inputs that alias each other cost a guard and a graph
            position_ids = positions.clone()
        self.cache.write_positions = positions
        self.cache.full_view = True
        view = bucket_width(self.bound + width, self.capacity)
        span = self._spans.get(view)
        if span is None:
            span = self._spans[view] = torch.arange(view, device=self.device)
            mark_step_dynamic(span, (0,))
        self.cache.span = span
        self.cache.view_width = view
        self.cache.seen_hint = 0  # a constant: models that read it only derive unused defaults
        layers = self.compiled.hidden_layers
        asked = kwargs.get("output_hidden_states", False)
        if layers is not None and (not asked or self.hidden_asked == layers):
            # one kind of call for every drafter: the graph returns just these layers' states
            kwargs["output_hidden_states"] = True
            kwargs["hidden_layers"] = layers
        kind = (ids.shape[0] == 1, width == 1, kwargs.get("hidden_layers") or ("hidden" if kwargs.get("output_hidden_states") else "logits"),
                kwargs.get("logits_to_keep"))
        buffers = [b for layer in self.cache.layers for b in (layer.keys, layer.values)]
        out = self.compiled(
            kind, buffers, input_ids=ids, write_positions=positions, position_ids=position_ids, span=span,
            mask_value=self._min, mask_dtype=self.dtype, use_cache=True, **{self.cache_keyword: self.cache}, **kwargs,
        )
        self.bound = self.bound + width
        return out

    def set_lengths(self, lengths: torch.Tensor, bound: int | None = None) -> None:
        self.lengths = lengths
        if bound is not None:
            self.bound = bound

    def select_rows(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            layer.select(index)
        self.lengths = self.lengths.index_select(0, index)

    can_merge = True

    @torch.inference_mode()
    def merge(self, other: "KVState") -> None:
        """Append the rows of `other` after these; the capacity becomes the larger of the two
        (the smaller buffers are padded with zeros, which no row attends to)."""
        if not isinstance(other, StaticKV) or other.model is not self.model:
            raise ValueError("only KV states of the same model on the static path merge")
        mine, theirs = self.cache.layers, other.cache.layers
        if mine and theirs and len(mine) != len(theirs) or bool(mine) != bool(theirs):
            raise ValueError("cannot merge a KV state that has been fed with one that has not")
        capacity = max(self.capacity, other.capacity)
        for a, b in zip(mine, theirs):
            a.keys, a.values = (
                torch.cat([_pad_capacity(x, capacity), _pad_capacity(y, capacity)])  # [B + B', H, C, D]
                for x, y in ((a.keys, b.keys), (a.values, b.values))
            )
            if self.cache.compiled:
                a._mark_compiled()
        self.capacity = self.cache.capacity = capacity
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.bound = max(self.bound, other.bound)


def _pad_capacity(buffer: torch.Tensor, capacity: int) -> torch.Tensor:  # [B, H, C, D] -> [B, H, capacity, D]
    return torch.nn.functional.pad(buffer, (0, 0, 0, capacity - buffer.shape[2]))


# --------------------------------------------------------------------------- generic path


class DynamicKV(KVState):
    """DynamicCache plus a validity mask; rejected slots are holes, dead tail columns cropped."""

    path = "generic"

    def __init__(self, model, batch, capacity, device, vocab_size) -> None:
        super().__init__(model, batch, capacity, device, vocab_size)
        self.cache = DynamicCache()
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)  # [B, S] 1 = a real token

    def _call(self, ids, positions, position_ids, num_valid, width, kwargs, exact_width):
        slots = torch.arange(width, device=self.device).unsqueeze(0)  # [1, T]
        valid = (slots < num_valid.unsqueeze(1)) if num_valid is not None else torch.ones_like(ids, dtype=torch.bool)
        mask = torch.cat([self.mask, valid.to(torch.long)], dim=1)  # [B, S + T]
        # A query that sees no key at all (the padding of a row with nothing to prefill)
        # comes out NaN in eager attention, and its NaN keys would poison later steps even
        # under a zero weight: let such rows see column 0 in this forward only.
        empty = (mask.sum(1, keepdim=True) == 0).to(torch.long)  # [B, 1]
        attention = torch.cat([mask[:, :1] | empty, mask[:, 1:]], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_keyword: self.cache},
            **kwargs,
        )
        self.cache = returned_cache(out)
        self.mask = mask
        self.bound = self.bound + width
        return out

    def set_lengths(self, lengths: torch.Tensor, bound: int | None = None) -> None:
        # A column stays valid while it is among the row's first lengths[b] real tokens.
        kept = self.mask * (self.mask.cumsum(1) <= lengths.unsqueeze(1)).to(torch.long)
        self.mask = kept
        self.lengths = lengths
        if bound is not None:
            self.bound = bound
        self._crop_tail()

    def select_rows(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self._crop_tail()

    def _crop_tail(self) -> None:
        width = self.mask.shape[1]
        if width == 0:
            return
        alive = self.mask.any(dim=0)  # [S]
        last_alive = int(torch.nonzero(alive).max()) + 1 if bool(alive.any()) else 0
        if last_alive < width:
            self.cache.crop(last_alive - width)  # negative: number of columns to drop
            self.mask = self.mask[:, :last_alive]
