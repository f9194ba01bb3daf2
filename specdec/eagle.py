"""EAGLE-3 hidden-state draft heads: the published checkpoint layout, the head, its KV cache.

An EAGLE-3 head (Li et al. 2025) drafts from the target's own hidden states. For a
position t the target has verified, it reads three of the target's layers (low, middle,
high: the hidden states entering layers `aux_layers`, transformers' hidden_states[i])
concatenated, projects them with `fc` [3 Ht -> H], and pairs them with the embedding of the
token at t + 1. One decoder layer, whose attention reads [input_layernorm(embedding);
hidden_norm(hidden)] (2H wide), turns that pair into a hidden state; `norm` and `lm_head`
give logits over a reduced draft vocabulary (draft id i is target id i + d2t[i]) for the
token at t + 2. Drafting further, the head feeds its own pre-norm output where the
target's features would be.

The checkpoint layout is the one vLLM's and SGLang's `llama_eagle3` loaders read:
config.json with architectures ["LlamaForCausalLMEagle3"], hidden_size, intermediate_size,
num_attention_heads, num_key_value_heads, vocab_size, draft_vocab_size, target_hidden_size
(when it differs from hidden_size), rms_norm_eps, the rope settings and
eagle_config.eagle_aux_hidden_state_layer_ids; and the weights

    fc.weight                                   [H, 3 Ht]
    midlayer.input_layernorm.weight             [H]   (on the token embedding)
    midlayer.hidden_norm.weight                 [H]   (on the hidden state)
    midlayer.post_attention_layernorm.weight    [H]
    midlayer.self_attn.{q,k,v}_proj.weight      [heads * head_dim, 2 H]
    midlayer.self_attn.o_proj.weight            [H, heads * head_dim]
    midlayer.mlp.{gate,up}_proj.weight          [I, H];  midlayer.mlp.down_proj.weight [H, I]
    norm.weight                                 [H]
    lm_head.weight                              [Vd, H]
    d2t                                         [Vd] int64   target id = draft id + d2t[draft id]
    t2d                                         [V] bool     target ids in the draft vocabulary
    embed_tokens.weight                         [V, H]  optional: without it the target's are shared

A head trained here also records, under config["specdec"], the fingerprint of the target
weights it was trained on; loading it beside another target is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .kv import write_rows

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
DEFAULT_ARCHITECTURE = EAGLE3_ARCHITECTURES[0]
_CHUNK = 64  # KV capacity grows in steps of this many positions


def read_config(path: str | os.PathLike) -> dict | None:
    """config.json of a local folder, or None (no folder, no config, not JSON)."""
    try:
        folder = Path(path)
        if not folder.is_dir():
            return None
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None


def is_eagle3_config(config: dict | None) -> bool:
    """Whether a checkpoint config describes an EAGLE-3 head (not an ordinary causal LM)."""
    if not isinstance(config, dict):
        return False
    archs = config.get("architectures") or []
    if any(a in EAGLE3_ARCHITECTURES for a in archs):
        return True
    eagle = config.get("eagle_config")
    return isinstance(eagle, dict) and "eagle_aux_hidden_state_layer_ids" in eagle and "draft_vocab_size" in config


def is_eagle3_head(path: Any) -> bool:
    """Whether `path` is a local folder holding an EAGLE-3 head."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    return is_eagle3_config(read_config(path))


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The layers EAGLE-3 reads when a head names none: low, middle, high (vLLM's and SGLang's
    default for Llama targets: 2, N // 2, N - 3), kept inside the model."""
    return (min(2, num_layers), num_layers // 2, max(num_layers - 3, 0))


def target_layers(target: nn.Module) -> int:
    config = target.config
    config = getattr(config, "text_config", None) or config
    return int(config.num_hidden_layers)


def weight_fingerprint(model: nn.Module) -> dict:
    """What identifies the target weights a head was trained on, robust to the dtype they are
    loaded in: a hash of every parameter's name and shape, and the mean absolute value of up to
    16 of them (evenly spread, in name order)."""
    named = sorted((n, t) for n, t in model.state_dict().items() if torch.is_floating_point(t))
    shapes = hashlib.sha256(json.dumps([[n, list(t.shape)] for n, t in named]).encode()).hexdigest()
    step = max(1, len(named) // 16)
    stats = {n: float(t.detach().abs().double().mean()) for n, t in named[::step][:16]}
    return {"shapes_sha256": shapes, "mean_abs": stats}


def _greedy_ids(config: dict) -> torch.Tensor | None:
    """config["specdec"]["greedy_draft_ids"] as a sorted id tensor, checked; None when absent or all."""
    ids = (config.get("specdec") or {}).get("greedy_draft_ids")
    if ids is None:
        return None
    size = config["draft_vocab_size"]
    if (not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            or min(ids) < 0 or max(ids) >= size or len(set(ids)) != len(ids)):
        raise ValueError(f"greedy_draft_ids must list distinct draft ids in 0..{size - 1}, at least one")
    if len(ids) == size:
        return None
    return torch.tensor(sorted(ids), dtype=torch.long)


def _identities(tensors) -> list[int]:
    """What tells `tensors` apart from their earlier contents, cheaply: each one's storage
    (another tensor, device or dtype has another; a cache holds the tensors its key names, so
    no later tensor can take their storage while it does) and version counter (bumped by every
    in-place write; a tensor made in inference mode keeps none, so a head whose weights are
    made so and then written in place must build anew: parameters are not made so)."""
    out = []
    for t in tensors:
        out.append(t.data_ptr())
        out.append(t._version if not t.is_inference() else -1)
    return out


def _inference() -> bool:
    """Outside a compiled graph and with gradients off (an eager step): where a head may use
    what it derived from its weights earlier (EagleHead._derived) instead of deriving it again."""
    return not torch.compiler.is_compiling() and not torch.is_grad_enabled()


def same_weights(expected: dict, actual: dict, rtol: float = 1e-2) -> bool:
    """Whether two weight_fingerprint()s name the same weights (up to the dtype's rounding)."""
    if expected.get("shapes_sha256") != actual.get("shapes_sha256"):
        return False
    want, have = expected.get("mean_abs") or {}, actual.get("mean_abs") or {}
    return bool(want) and all(n in have and abs(have[n] - v) <= rtol * max(abs(v), 1e-12) for n, v in want.items())


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel, the same arithmetic
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)


class _MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        hidden, eps = c["hidden_size"], c["rms_norm_eps"]
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.self_attn = _Attention(hidden, c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                                    bool(c.get("attention_bias", False)))
        self.mlp = _MLP(hidden, c["intermediate_size"])


def normalise_config(raw: dict) -> dict:
    """The head's settings from a checkpoint config, with the layout's defaults filled in."""
    c = dict(raw)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if not isinstance(c.get(key), int) or c[key] < 1:
            raise ValueError(f"an EAGLE-3 head config needs a positive int {key!r}, got {c.get(key)!r}")
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    if c.get("head_dim") is None:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    c.setdefault("rms_norm_eps", 1e-6)
    if c.get("draft_vocab_size") is None:
        c["draft_vocab_size"] = c["vocab_size"]
    if c.get("target_hidden_size") is None:
        c["target_hidden_size"] = c["hidden_size"]
    c.setdefault("max_position_embeddings", 8192)
    c.setdefault("norm_before_residual", False)
    if int(c.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"only one-layer EAGLE-3 heads are supported, this one has {c['num_hidden_layers']} layers")
    return c


def _rope_config(c: dict):
    from transformers import LlamaConfig

    keys = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")
    extra = {k: c[k] for k in keys if c.get(k) is not None}
    return LlamaConfig(hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
                       num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                       max_position_embeddings=c["max_position_embeddings"], **extra)


class EagleHead(nn.Module):
    """An EAGLE-3 draft head (see the module docstring for what it computes and its layout)."""

    def __init__(self, config: dict, shared_embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        c = self.config = normalise_config(config)
        hidden = c["hidden_size"]
        self.fc = nn.Linear(3 * c["target_hidden_size"], hidden, bias=False)
        self.midlayer = _MidLayer(c)
        self.norm = RMSNorm(hidden, c["rms_norm_eps"])
        self.lm_head = nn.Linear(hidden, c["draft_vocab_size"], bias=False)
        self.register_buffer("d2t", torch.zeros(c["draft_vocab_size"], dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c["vocab_size"], dtype=torch.bool) if c["draft_vocab_size"] == c["vocab_size"]
                             else torch.zeros(c["vocab_size"], dtype=torch.bool))
        self.embed_tokens: nn.Embedding | None = None
        self._shared = [shared_embedding]  # a list: the target's embedding is not this module's parameter
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.rotary = LlamaRotaryEmbedding(_rope_config(c))
        self._rope_table: tuple | None = None  # (dtype, device, cos [N, D], sin [N, D]) for eager steps
        # Greedy drafts are chosen among these draft ids [N] (sorted) where the checkpoint names them
        # (config["specdec"]["greedy_draft_ids"]): an LM head of N rows instead of Vd. None: all.
        self.register_buffer("greedy_ids", _greedy_ids(c), persistent=False)
        self._derivations: dict[str, tuple] = {}  # name -> (key, sources, value): see _derived
        attn, mlp = self.midlayer.self_attn, self.midlayer.mlp
        # the modules joined_weights() stacks, kept as a plain tuple: reading their parameter dicts
        # directly is a few us a step, the module attributes a us or so each
        self._joined_parts = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        eagle = c.get("eagle_config") or {}
        layers = eagle.get("eagle_aux_hidden_state_layer_ids")
        self.aux_layers: tuple[int, ...] | None = tuple(int(i) for i in layers) if layers else None

    # -------------------------------------------------------------- properties

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def draft_vocab_size(self) -> int:
        return self.config["draft_vocab_size"]

    @property
    def target_fingerprint(self) -> dict | None:
        return (self.config.get("specdec") or {}).get("target_fingerprint")

    def share_embedding(self, embedding: nn.Embedding) -> None:
        self._shared = [embedding]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens if self.embed_tokens is not None else self._shared[0]
        if table is None:
            raise ValueError("this EAGLE-3 head has no embed_tokens: attach the target's with share_embedding()")
        return table(tokens.clamp(min=0)).to(self.fc.weight.dtype)

    def draft_to_target(self) -> torch.Tensor:  # [Vd] target id of each draft id (read only)
        if not _inference():
            return torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t
        return self._maps()[0]

    def _maps(self) -> tuple[torch.Tensor, bool]:
        """draft_to_target() and whether it is the identity (a draft vocabulary of every target
        id, in order: q needs no placing). The identity is read on the host, so only where d2t
        lives there (no device read in a step)."""
        def build():
            d2t = self.d2t
            identity = self.draft_vocab_size == self.vocab_size and d2t.device.type == "cpu" and not bool(d2t.any())
            return torch.arange(self.draft_vocab_size, device=d2t.device) + d2t, identity

        return self._derived("maps", (self.d2t,), build)

    def _derived(self, name: str, sources: tuple[torch.Tensor, ...], build):
        """build()'s value, derived from the tensors `sources` once and again only when one of
        them changes (another tensor, device or dtype, or written in place: _identities). Used
        on eager steps only (_inference()), where each call's overhead counts."""
        key = _identities(sources)
        entry = self._derivations.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = self._derivations[name] = (key, sources, build())  # sources held: see _identities
        return entry[2]

    # -------------------------------------------------------------- compute

    def layer(self, embeds, hidden, cos, sin, attend, *, joined: bool = False) -> torch.Tensor:
        """The decoder layer: embeds [B, T, H], hidden [B, T, H] (fc'd target features or the
        head's own pre-norm output); `attend(q, k, v)` runs the attention over [B, heads, T, D]
        queries and the new keys/values. Returns the pre-norm output [B, T, H].

        joined (inference outside a compiled graph): q, k and v come from one matmul over their
        weights stacked, gate and up from another (joined_weights): 5 matmuls a step instead of
        8, each a vector-matrix product whose call costs about as much as its arithmetic on a
        small head. Each output is the same dot product as the separate projection's."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer = self.midlayer
        attn = layer.self_attn
        if self.config["norm_before_residual"]:
            hidden = layer.hidden_norm(hidden)
            residual = hidden
        else:
            residual = hidden
            hidden = layer.hidden_norm(hidden)
        x = torch.cat([layer.input_layernorm(embeds), hidden], dim=-1)  # [B, T, 2H]
        batch, width, _ = x.shape
        q_size, kv_size = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
        if joined:
            qkv_weight, qkv_bias, gate_up = self.joined_weights()
            q, k, v = F.linear(x, qkv_weight, qkv_bias).split((q_size, kv_size, kv_size), dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(batch, width, attn.heads, attn.head_dim).transpose(1, 2)
        k = k.view(batch, width, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = v.view(batch, width, attn.kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = attend(q, k, v)  # [B, heads, T, D]
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, width, q_size))
        h = residual + out
        x = layer.post_attention_layernorm(h)
        if joined:
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            return h + layer.mlp.down_proj(F.silu(gate) * up)
        return h + layer.mlp(x)

    def joined_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The q, k, v projections' weights stacked [(heads + 2 kv_heads) * D, 2H] (and biases),
        gate's and up's [2I, H] (_derived: built again only when a weight changes)."""
        parts = self._joined_parts
        sources = tuple(t for m in parts for t in m._parameters.values() if t is not None)

        def build():
            bias = torch.cat([p.bias for p in parts[:3]]) if parts[0].bias is not None else None
            return (torch.cat([p.weight for p in parts[:3]]), bias, torch.cat([p.weight for p in parts[3:]]))

        return self._derived("joined", sources, build)

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:  # [..., Vd]
        return self.lm_head(self.norm(prenorm))

    def greedy_logits(self, prenorm: torch.Tensor) -> torch.Tensor:  # [..., N] over greedy_columns()
        """Logits a greedy draft is chosen from: over the greedy draft ids where the head names
        them (the LM head's rows for those ids, each logit the full head's), else logits()."""
        if self.greedy_ids is None:
            return self.logits(prenorm)
        weight = self._greedy_rows()[0] if _inference() else self.lm_head.weight.index_select(0, self.greedy_ids)
        return F.linear(self.norm(prenorm), weight)

    def greedy_columns(self) -> torch.Tensor:  # [N] the target id of each column of greedy_logits()
        if self.greedy_ids is None:
            return self.draft_to_target()
        return self._greedy_rows()[1] if _inference() else self.draft_to_target()[self.greedy_ids]

    def _greedy_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head's rows for the greedy ids [N, H] and their target ids [N] (_derived)."""
        ids = self.greedy_ids
        return self._derived("greedy", (self.lm_head.weight, ids, self.d2t),
                             lambda: (self.lm_head.weight.index_select(0, ids), self.draft_to_target()[ids]))

    def target_probs(self, draft_probs: torch.Tensor) -> torch.Tensor:  # [..., V], zero outside the draft vocabulary
        """Draft-vocabulary probabilities placed at their target ids (`draft_probs` itself where
        the draft vocabulary is the target's, in order)."""
        if _inference() and self._maps()[1]:
            return draft_probs
        shape = (*draft_probs.shape[:-1], self.vocab_size)
        index = self.draft_to_target().expand(*draft_probs.shape[:-1], -1)
        return draft_probs.new_zeros(shape).scatter(-1, index, draft_probs)

    def rope(self, like: torch.Tensor, positions: torch.Tensor, below: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, T, D] at positions [B, T]. below: a host-side bound on the positions;
        given, they are looked up in a table of every position up to it (built by the same
        call, each entry the product of a frequency and a position, so the same values)."""
        if below is None:
            return self.rotary(like, positions)
        table = self._rope_table
        if table is None or table[0] != like.dtype or table[1] != like.device or table[2].shape[0] < below:
            size = max(math.ceil(below / 256) * 256, 2 * table[2].shape[0] if table is not None else 0)
            every = torch.arange(size, device=like.device).unsqueeze(0)  # [1, N]
            cos, sin = self.rotary(like, every)
            table = self._rope_table = (like.dtype, like.device, cos[0], sin[0])
        return table[2][positions], table[3][positions]


def head_step(head: EagleHead, k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: torch.Tensor,
              hidden: torch.Tensor, positions: torch.Tensor, last: torch.Tensor | None, *, features: bool,
              keys: int | None = None, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One head forward over tokens [B, T] at `positions` [B, T], writing their keys and values
    into the caches [B, kv_heads, C, D]; queries see their row's columns up to their own
    position, among the first `keys` (None: all C, as the compiled step does). Returns the
    pre-norm outputs [B, T, H], or with `last` [B] the output at slot last[b] [B, 1, H] and
    its draft-vocabulary logits [B, Vd] (None without `last`); greedy: head.greedy_logits()
    instead [B, N], the columns head.greedy_columns()."""
    batch, width = tokens.shape
    if keys is None:
        keys = k_cache.shape[2]
        torch._check(v_cache.shape[2] == keys)
        torch._check(positions.shape[0] == batch)
        torch._check(positions.shape[1] == width)
        torch._check(hidden.shape[0] == batch)
        torch._check(hidden.shape[1] == width)
        torch._check(k_cache.shape[0] == batch)
        torch._check(v_cache.shape[0] == batch)
    hidden = hidden.to(head.fc.weight.dtype)
    if features:
        hidden = head.fc(hidden)
    # Outside a graph, where every call's overhead counts: rope from a table, joined projections.
    eager = _inference()
    cos, sin = head.rope(hidden, positions, below=keys if eager else None)

    def attend(q, k, v):
        write_rows(k_cache, v_cache, positions, k, v)
        cols = torch.arange(keys, device=tokens.device)
        mask = cols.view(1, 1, 1, keys) <= positions.view(batch, 1, width, 1)  # [B, 1, T, W]
        kk, vv = k_cache[:, :, :keys], v_cache[:, :, :keys]
        groups = q.shape[1] // kk.shape[1]
        if groups > 1:
            kk = kk.repeat_interleave(groups, dim=1)
            vv = vv.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    out = head.layer(head.embed(tokens), hidden, cos, sin, attend, joined=eager)  # [B, T, H]
    if last is None:
        return out, None
    at = out.gather(1, last.view(-1, 1, 1).expand(-1, 1, out.shape[-1]))  # [B, 1, H]
    return at, (head.greedy_logits(at[:, 0]) if greedy else head.logits(at[:, 0]))


def head_chain(head: EagleHead, k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: torch.Tensor,
               hidden: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, after: torch.Tensor, *,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A greedy draft of `length` tokens in one call: the head reads the pending window
    (head_step with features: tokens [B, T], the target's features [B, T, F] at `positions`),
    then feeds each draft with its own output at positions after[b] + i. Returns the drafts
    as target ids [B, length] and the head's probability of each [B, length] (what an early
    stop reads). The same arithmetic as head_step called once per token; traced whole, the
    chain is one graph instead of `length` calls (the Python between them, a call's
    overhead, each a sizeable share of a small head's step)."""
    to_target = head.greedy_columns()  # [N] the target id of each logit's column
    at, logits = head_step(head, k_cache, v_cache, tokens, hidden, positions, last, features=True, greedy=True)
    zero = torch.zeros_like(last)
    drafts, confidence = [], []
    for i in range(length):
        best = torch.argmax(logits, dim=-1)  # [B]
        drafts.append(to_target[best])
        # the softmax at the argmax, 1 / sum(exp(x - max)): no softmax op (a compiled C++
        # wrapper calls one through a slower fallback)
        scores = logits.float()
        confidence.append(1.0 / torch.exp(scores - scores.amax(dim=-1, keepdim=True)).sum(dim=-1))
        if i < length - 1:
            at, logits = head_step(head, k_cache, v_cache, drafts[-1].unsqueeze(1), at, (after + i).unsqueeze(1), zero,
                                   features=False, greedy=True)
    return torch.stack(drafts, dim=1), torch.stack(confidence, dim=1)


class HeadKV:
    """The head's own KV cache for a batch: one layer of [B, kv_heads, C, D] buffers, row b's
    position i at slot i (as specdec.kv's static path). `forward` writes each row's new
    positions at its own length; `set_lengths` rolls rows back (nothing is erased: the stale
    tail is overwritten later and never read). `bound` is a host-side upper bound on the
    longest row, so nothing here reads the device."""

    @torch.inference_mode()  # every buffer an inference tensor: a compiled step's guards see one kind
    def __init__(self, head: EagleHead, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        attn = head.midlayer.self_attn
        self.head = head
        self.shape = (batch, attn.kv_heads, 0, attn.head_dim)
        self.k = torch.zeros(self.shape, dtype=dtype, device=device)
        self.v = torch.zeros(self.shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.bound = 0
        self.compiled = None  # a specdec.compiled.CompiledHead: step() runs as one graph
        self.chained = None  # a specdec.compiled.CompiledChain: chain() drafts greedily in one graph

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _reserve(self, width: int) -> None:
        if width <= self.capacity:
            return
        grow = math.ceil(width / _CHUNK) * _CHUNK - self.capacity
        pad = (0, 0, 0, grow)
        self.k = F.pad(self.k, pad)
        self.v = F.pad(self.v, pad)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, num_valid: torch.Tensor | None = None,
                *, features: bool) -> torch.Tensor:
        """Feed tokens [B, T] with their hidden inputs [B, T, *] (features=True: the target's
        concatenated layers, projected by fc here; False: the head's own pre-norm outputs);
        the first num_valid[b] slots of row b are real. Returns the pre-norm outputs [B, T, H]."""
        return self._feed(tokens, hidden, num_valid, features, None, False)[0]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, hidden: torch.Tensor, num_valid: torch.Tensor | None = None,
             *, features: bool, last: torch.Tensor | None = None, greedy: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(), then the head's output at slot last[b] of each row (default the last slot)
        [B, 1, H] and its logits over the columns columns(greedy) names [B, N]: what drafting the
        next token needs. With a compiled head (`compiled`), all of it is one graph call."""
        if last is None:
            last = torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        return self._feed(tokens, hidden, num_valid, features, last, greedy)

    def columns(self, greedy: bool) -> torch.Tensor:
        """The target id of each column of step(greedy=greedy)'s logits [N]: for a greedy draft on
        an eager step, the head's greedy draft ids (head.greedy_columns()); else its whole draft
        vocabulary (a compiled step's graph has the one LM head)."""
        if greedy and self.compiled is None:
            return self.head.greedy_columns()
        return self.head.draft_to_target()

    def _advance(self, width: int, num_valid: torch.Tensor | None, ahead: int = 0) -> torch.Tensor:
        """Room for `width` new slots per row (and `ahead` more written past them), and the rows'
        lengths moved on by num_valid (default width); returns the new slots' positions [B, T]."""
        positions = self.lengths.unsqueeze(1) + torch.arange(width, device=self.lengths.device)  # [B, T]
        self._reserve(self.bound + width + ahead)
        self.lengths = self.lengths + (num_valid if num_valid is not None else width)
        self.bound += width
        return positions

    def _feed(self, tokens, hidden, num_valid, features: bool, last, greedy: bool):
        batch, width = tokens.shape
        keys = self.bound + width  # the columns an eager step attends over
        positions = self._advance(width, num_valid)
        if self.compiled is not None and last is not None:
            # Whole-buffer attention (the mask hides what a row has not written): no Python int
            # that changes from call to call reaches the graph.
            kind = ("features" if features else "own", batch == 1, width == 1)
            out, logits = self.compiled(kind, self.head, self.k, self.v, tokens, hidden, positions, last,
                                        features=features)
        else:
            out, logits = head_step(self.head, self.k, self.v, tokens, hidden, positions, last, features=features,
                                    keys=keys, greedy=greedy)
        return out, logits

    @torch.inference_mode()
    def chain(self, tokens: torch.Tensor, hidden: torch.Tensor, num_valid: torch.Tensor, last: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the window (as step() with features) and draft `length` tokens greedily, in one
        compiled call where `chained` is set (see head_chain): drafts [B, length] (target ids)
        and their probabilities [B, length]. The lengths afterwards are step()'s: the drafted
        positions are written past them and never kept."""
        positions = self._advance(tokens.shape[1], num_valid, ahead=length)
        if self.chained is None:
            return head_chain(self.head, self.k, self.v, tokens, hidden, positions, last, self.lengths, length=length)
        kind = ("chain", tokens.shape[0] == 1, length)
        return self.chained(kind, self.head, self.k, self.v, tokens, hidden, positions, last, self.lengths,
                            length=length)

    def set_lengths(self, lengths: torch.Tensor, bound: int) -> None:
        self.lengths = lengths
        self.bound = bound

    @torch.inference_mode()
    def select_rows(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.k.device)
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)

    @torch.inference_mode()
    def merge(self, other: HeadKV) -> None:
        width = max(self.capacity, other.capacity)
        self._reserve(width)
        other._reserve(width)
        self.k = torch.cat([self.k, other.k])
        self.v = torch.cat([self.v, other.v])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.bound = max(self.bound, other.bound)


# --------------------------------------------------------------------------- loading and saving

_RENAMES = (("model.layers.0.", "midlayer."), ("layers.0.", "midlayer."), ("model.", ""))


def _canonical(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            weights.update(load_file(str(f)))
    else:
        bins = sorted(folder.glob("*.bin"))
        if not bins:
            raise OSError(f"{folder} holds an EAGLE-3 config but no *.safetensors or *.bin weights")
        for f in bins:
            weights.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return {_canonical(k): v for k, v in weights.items()}


def load_head(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> EagleHead:
    """Load an EAGLE-3 head from a local folder in the published layout (see the module docstring)."""
    folder = Path(path)
    raw = read_config(folder)
    if not is_eagle3_config(raw):
        raise ValueError(f"{folder} is not an EAGLE-3 head (its config.json names no EAGLE-3 architecture)")
    head = EagleHead(raw)
    weights = _read_weights(folder)
    if "embed_tokens.weight" in weights:
        head.embed_tokens = nn.Embedding(*weights["embed_tokens.weight"].shape)
    expected = head.state_dict()
    missing = sorted(k for k in expected if k not in weights and k not in ("d2t", "t2d"))
    unknown = sorted(k for k in weights if k not in expected)
    if missing or unknown:
        raise ValueError(f"{folder}: weights do not match the EAGLE-3 layout; missing {missing[:8]}, "
                         f"unexpected {unknown[:8]}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")
    state = {k: (v.to(expected[k].dtype) if not torch.is_floating_point(expected[k]) else v) for k, v in weights.items()}
    if "d2t" in weights and "t2d" not in weights:  # t2d follows from d2t
        t2d = torch.zeros(head.vocab_size, dtype=torch.bool)
        t2d[torch.arange(head.draft_vocab_size) + state["d2t"]] = True
        state["t2d"] = t2d
    stored = next(iter(v for v in weights.values() if torch.is_floating_point(v)), None)
    head.to(dtype=stored.dtype if stored is not None else torch.float32)  # loaded as stored, then converted
    head.load_state_dict(state, strict=False)
    if dtype is not None:
        head.to(dtype=dtype)
    head.d2t.data = head.d2t.data.long()
    if device is not None:
        head.to(device)
    return head.eval()


def save_head(head: EagleHead, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
              extra: dict | None = None) -> None:
    """Write `head` in the published layout: config.json and model.safetensors (weights in `dtype`)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in head.config.items()}
    config["architectures"] = [DEFAULT_ARCHITECTURE]
    config["model_type"] = "llama"
    config["num_hidden_layers"] = 1
    config["tie_word_embeddings"] = False
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if head.aux_layers is not None:
        config["eagle_config"] = {**(config.get("eagle_config") or {}), "use_aux_hidden_state": True,
                                  "eagle_aux_hidden_state_layer_ids": list(head.aux_layers)}
    if extra:
        config["specdec"] = {**(config.get("specdec") or {}), **extra}
    state = {}
    for name, tensor in head.state_dict().items():
        if name.startswith("rotary."):
            continue
        state[name] = tensor.detach().to("cpu", dtype).contiguous() if torch.is_floating_point(tensor) else tensor.cpu()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_head_fits(head: EagleHead, target: nn.Module, *, name: str = "the EAGLE-3 head") -> tuple[int, ...]:
    """Refuse a head that does not fit `target` (hidden size, vocabulary, layers, the target it
    was trained on); returns the target layers it reads."""
    config = target.config
    config = getattr(config, "text_config", None) or config
    hidden = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    vocab = int(target.get_input_embeddings().weight.shape[0])
    c = head.config
    if c["target_hidden_size"] != hidden:
        raise ValueError(f"{name} reads target hidden states of size {c['target_hidden_size']} (fc takes "
                         f"{3 * c['target_hidden_size']}), but the target's hidden size is {hidden}; "
                         "use a head trained for this target")
    if c["vocab_size"] != vocab:
        raise ValueError(f"{name} maps its draft vocabulary into {c['vocab_size']} target ids, but the target's "
                         f"vocabulary has {vocab}; use a head trained for this target")
    if head.embed_tokens is None and c["hidden_size"] != hidden:
        raise ValueError(f"{name} has no embed_tokens and its hidden size {c['hidden_size']} differs from the "
                         f"target's {hidden}, so it cannot share the target's embeddings")
    d2t_max = int((head.draft_to_target()).max()) if head.draft_vocab_size else -1
    if d2t_max >= vocab or int(head.draft_to_target().min()) < 0:
        raise ValueError(f"{name}'s d2t maps draft ids outside the target's vocabulary (0..{vocab - 1})")
    aux = head.aux_layers or default_aux_layers(layers)
    if len(aux) != 3 or any(not 0 <= i <= layers for i in aux):
        raise ValueError(f"{name} reads target layers {list(aux)}, but the target has {layers} layers "
                         f"(hidden states 0..{layers}); three are needed")
    expected = head.target_fingerprint
    if expected is not None:
        if not same_weights(expected, weight_fingerprint(target)):
            trained = (head.config.get("specdec") or {}).get("target", "another model")
            raise ValueError(f"{name} was trained for other target weights ({trained}), not these; "
                             "it would draft poorly beside them. Load it beside the target it was trained for")
    return tuple(aux)


def attach_head(head: EagleHead, target: nn.Module, *, name: str = "the EAGLE-3 head") -> EagleHead:
    """Check `head` against `target`, fix the layers it reads, share the target's embeddings
    where it has none, and move it to the target's device and dtype."""
    aux = check_head_fits(head, target, name=name)
    head.aux_layers = aux
    embedding = target.get_input_embeddings()
    if head.embed_tokens is None:
        head.share_embedding(embedding)
    weight = embedding.weight
    head.to(device=weight.device, dtype=weight.dtype)
    head.d2t.data = head.d2t.data.long()
    return head.eval()


def parameter_bytes(head: EagleHead) -> int:
    return sum(p.numel() * p.element_size() for p in head.parameters())


# The heads shipped with the package, by the target name they are loaded beside.
_SHIPPED = {"bundled": ("default_pair", "eagle"), "smollm2-135m": ("heads", "smollm2-135m-instruct")}


def shipped_head(name: str) -> str | None:
    """The folder of the head shipped for target `name` ("bundled", "smollm2-135m"), or None."""
    parts = _SHIPPED.get(name) if isinstance(name, str) else None
    if parts is None:
        return None
    from importlib import resources

    folder = resources.files("specdec.assets").joinpath(*parts)
    path = Path(str(folder))
    return str(path) if (path / "config.json").is_file() else None


def default_head_path(target: Any) -> str | None:
    """The head from_pretrained loads for `target` when none is named (head="default"): the one
    shipped for it, by name ("bundled", "smollm2-135m") or, for the bundled target, by path."""
    if not isinstance(target, (str, os.PathLike)):
        return None
    name = os.fspath(target)
    if name in _SHIPPED:
        return shipped_head(name)
    from .loading import bundled_pair

    try:
        if Path(name).resolve() == Path(bundled_pair()[0]).resolve():
            return shipped_head("bundled")
    except OSError:
        return None
    return None
