"""Training an EAGLE-3 head (specdec.eagle): its initialisation from the target and the
training-time test loss. benchmarks/train_head.py drives them over a corpus.

The training-time test (Li et al. 2025): besides the step that reads the target's features
at each position t, further steps j = 1.. are unrolled in which the head reads its own
output of step j - 1 at t, together with the token at t + j + 1, as it does when it drafts.
Step j's query at t attends to step 0's keys at positions 0..t (the target's features) and
to its own earlier steps' keys at t, exactly the keys its draft at position t + j sees at
inference. Each step is scored against the target's distribution at position t + j + 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .eagle import EagleHead

DECAY = 0.8  # weight of unrolled step j's loss: DECAY ** j


def init_head(config: dict, target, draft_ids: torch.Tensor) -> EagleHead:
    """A head for `target` over the draft vocabulary `draft_ids` (sorted target ids): its LM head
    starts from the target's rows, its final norm from the target's, fc from the identity on the
    high layer, and the layer's output projections small, so it starts near the target's own
    reading of its high layer."""
    head = EagleHead(config)
    vocab = config["vocab_size"]
    head.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
    head.t2d.zero_()
    head.t2d[draft_ids] = True
    with torch.no_grad():
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[draft_ids].float())
        norm = getattr(target.get_decoder(), "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape == head.norm.weight.shape:
            head.norm.weight.copy_(norm.weight.float())
        h = config["hidden_size"]
        head.fc.weight.zero_()
        head.fc.weight[:, 2 * h:].copy_(torch.eye(h))
        head.midlayer.self_attn.o_proj.weight.mul_(0.1)
        head.midlayer.mlp.down_proj.weight.mul_(0.1)
    assert vocab == len(head.t2d)
    return head


def ttt_loss(head: EagleHead, embed, tokens, feats, labels, greedy_ok, steps: int):
    """Training-time test over a batch: tokens [B, L], feats [B, L, 3H], labels [B, L, Vd] (the
    target's distribution over the draft vocabulary at each position), greedy_ok [B, L] (the
    target's top token lies in the draft vocabulary). Returns (loss, per-step top-1 agreement,
    per-step counts)."""
    batch, length = tokens.shape
    hidden = head.fc(feats[:, :-1])  # [B, L-1, H] step 0 reads the target's features at t
    keys, values = [], []
    scale = 1.0 / math.sqrt(head.midlayer.self_attn.head_dim)
    causal = torch.ones(length - 1, length - 1, dtype=torch.bool, device=tokens.device).tril()
    total = 0.0
    agree, counts = [], []
    for j in range(steps):
        width = length - 1 - j  # index t with a label at t + j + 1 <= L - 1
        if width <= 0:
            break
        positions = (torch.arange(width, device=tokens.device) + j).unsqueeze(0).expand(batch, -1)
        emb = embed(tokens[:, j + 1: j + 1 + width])  # the token at t + j + 1
        hid = hidden[:, :width]
        cos, sin = head.rope(hid, positions)

        def attend(q, k, v, j=j, width=width):
            groups = q.shape[1] // k.shape[1]
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            keys.append(k)
            values.append(v)
            k0, v0 = keys[0][:, :, :width], values[0][:, :, :width]
            scores = (q @ k0.transpose(-1, -2)) * scale  # [B, h, w, w]
            scores = scores.masked_fill(~causal[:width, :width], float("-inf"))
            diag = [(q * keys[i][:, :, :width]).sum(-1, keepdim=True) * scale for i in range(1, j + 1)]
            probs = torch.softmax(torch.cat([scores, *diag], dim=-1), dim=-1)
            out = probs[..., :width] @ v0
            for i in range(1, j + 1):
                out = out + probs[..., width + i - 1: width + i] * values[i][:, :, :width]
            return out

        out = head.layer(emb, hid, cos, sin, attend)  # [B, w, H]
        logits = head.logits(out)  # [B, w, Vd]
        target = labels[:, j + 1: j + 1 + width]  # [B, w, Vd]
        mask = greedy_ok[:, j + 1: j + 1 + width].float()
        loss = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
        total = total + DECAY ** j * (loss * mask).sum() / mask.sum().clamp(min=1)
        with torch.no_grad():
            agree.append(float(((logits.argmax(-1) == target.argmax(-1)).float() * mask).sum()))
            counts.append(float(mask.sum()))
        hidden = out  # the next step reads the head's own output at t
    return total, agree, counts


def head_config(target, *, draft_vocab: int, intermediate: int = 0, layers: tuple[int, ...] | None = None) -> dict:
    """An EAGLE-3 head config for `target`: its width, heads and rope, a draft vocabulary of
    `draft_vocab` ids, an MLP `intermediate` wide (0: the target's), reading `layers` (default:
    EAGLE-3's low, middle and high)."""
    from .eagle import default_aux_layers

    tconf = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    hidden = int(tconf.hidden_size)
    layers = tuple(layers) if layers is not None else default_aux_layers(int(tconf.num_hidden_layers))
    config = dict(
        hidden_size=hidden, target_hidden_size=hidden, intermediate_size=intermediate or int(tconf.intermediate_size),
        num_attention_heads=int(tconf.num_attention_heads),
        num_key_value_heads=int(getattr(tconf, "num_key_value_heads", None) or tconf.num_attention_heads),
        head_dim=int(getattr(tconf, "head_dim", None) or hidden // tconf.num_attention_heads),
        rms_norm_eps=float(getattr(tconf, "rms_norm_eps", 1e-6)),
        vocab_size=int(target.get_input_embeddings().weight.shape[0]), draft_vocab_size=int(draft_vocab),
        max_position_embeddings=int(getattr(tconf, "max_position_embeddings", 8192)),
        eagle_config={"eagle_aux_hidden_state_layer_ids": list(layers), "use_aux_hidden_state": True},
        hidden_act="silu",
    )
    rope = getattr(tconf, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else getattr(tconf, "rope_theta", None)
    if theta is not None:
        config["rope_theta"] = float(theta)
    return config


@torch.no_grad()
def target_states(target, ids: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target over ids [B, L]: the hidden states entering `layers` concatenated [B, L, 3H],
    its final normed hidden state [B, L, H] (the soft labels' source) and its greedy token [B, L]."""
    base = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    out = base(input_ids=ids, output_hidden_states=True, use_cache=False)
    feats = torch.cat([out.hidden_states[j] for j in layers], dim=-1)
    final = out.last_hidden_state
    greedy = (final @ target.get_output_embeddings().weight.T).argmax(-1)
    return feats, final, greedy


def greedy_draft_ids(counts: torch.Tensor, head: EagleHead, size: int) -> tuple[list[int], float]:
    """The `size` draft ids of `head` its target emits most often as its greedy token (counts [V]
    per target id, over a corpus), sorted, and the share of those emissions they cover: what a
    head's config names as greedy_draft_ids (EagleHead.greedy_logits)."""
    per_draft = counts.to(torch.float64)[head.draft_to_target().cpu()]  # [Vd]
    size = min(size, head.draft_vocab_size)
    order = torch.argsort(per_draft, descending=True, stable=True)[:size]
    coverage = float(per_draft[order].sum() / counts.sum().clamp(min=1))
    return sorted(int(i) for i in order), coverage
