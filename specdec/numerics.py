"""Numerics modes: how the target's last steps are computed in reduced precision.

In bfloat16 two logits one rounding step apart are a coin toss: the same position
computed in another shape (one token at a time, a K+1-token verify, a cache hit's check)
rounds a little differently, and a near-tie can go the other way. Greedy output then
depends on the drafter, or on whether a cached answer was checked.

    "native"  computes as loaded (the default).
    "stable"  computes the final norm and the LM head in float32 (from float32 copies
              of their weights), so logits are never rounded to bfloat16 and exact ties
              vanish, and runs attention through transformers' eager implementation
              (scores, softmax, weighted sum: each query row computed the same way
              however many queries a forward holds; torch's fused CPU attention sums a
              row differently in a 4-token verify than in a 1-token step). The blocks
              keep the loaded dtype. Costs one float32 copy of the LM head (vocab x
              hidden x 4 bytes), a float32 head matmul and eager attention.

A float32 or float64 model is left as is in both modes (its head already computes at
least in float32). The mode is part of the generator's fingerprint, so cached answers
of one mode never answer for the other.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

NUMERICS = ("native", "stable")
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")
_REDUCED = (torch.bfloat16, torch.float16)


def check_numerics(value: str) -> str:
    """The mode, or a ValueError naming the allowed ones."""
    if value not in NUMERICS:
        raise ValueError(
            f"numerics must be one of {', '.join(map(repr, NUMERICS))}, got {value!r}; "
            '"stable" computes the final norm and the LM head in float32'
        )
    return value


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder's final norm (the module between the last block and the LM head), or None."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    for owner in (decoder, getattr(model, "model", None), getattr(model, "transformer", None)):
        if owner is None:
            continue
        for name in _NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Module) and not isinstance(module, torch.nn.Identity):
                return module
    return None


class StableHead:
    """Float32 copies of a model's final norm and LM head, swapped in around its forwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.norm = final_norm(model)
        dtype = next(model.parameters()).dtype
        # Only reduced precision needs it; a model whose head cannot be found computes as is.
        self.active = dtype in _REDUCED and isinstance(self.head, torch.nn.Module)
        self._head32: torch.nn.Module | None = None
        self._norm32: torch.nn.Module | None = None
        self._versions: tuple = ()

    def _copies(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        # Refreshed if the weights were changed in place since the copies were made.
        versions = tuple(
            (p.data_ptr(), p._version) for m in (self.head, self.norm) if m is not None for p in m.parameters()
        )
        if self._head32 is None or versions != self._versions:
            with torch.no_grad():
                self._head32 = copy.deepcopy(self.head).float()
                self._norm32 = copy.deepcopy(self.norm).float() if self.norm is not None else None
            self._versions = versions
        return self._head32, self._norm32

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the model's final norm and head compute in float32 and return float32."""
        if not self.active:
            yield
            return
        head32, norm32 = self._copies()
        patched = [(self.head, lambda h: head32(h.float()))]
        if self.norm is not None and norm32 is not None:
            patched.append((self.norm, lambda h: norm32(h.float())))
        configs = _configs(getattr(self.model, "config", None))
        attention = [(c, c.__dict__.get("_attn_implementation_internal")) for c in configs]
        for module, forward in patched:
            module.forward = forward  # an instance attribute shadows the class's forward
        for config, _ in attention:
            config.__dict__["_attn_implementation_internal"] = "eager"
        try:
            yield
        finally:
            for module, _ in patched:
                del module.forward
            for config, value in attention:
                config.__dict__["_attn_implementation_internal"] = value


def _configs(config) -> list:
    """A model config and its sub-configs (recursively): each holds its own attention choice."""
    if config is None or "_attn_implementation_internal" not in getattr(config, "__dict__", {}):
        return []
    out = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        out += _configs(getattr(config, key, None))
    return out


def stable_head(model: torch.nn.Module) -> StableHead:
    """The model's StableHead, made once and kept on the model."""
    cached = getattr(model, "_specdec_stable_head", None)
    if cached is None or cached.model is not model:
        cached = StableHead(model)
        object.__setattr__(model, "_specdec_stable_head", cached)  # not a submodule: no state_dict entry
    return cached
