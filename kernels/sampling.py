"""Lossless sampling verification in Triton (Leviathan et al. 2023; Chen et al. 2023).

Two launches, no host synchronisation:
  1. `_target_rows_kernel`, one program per (row b, position i <= num_draft[b]): the
     target distribution's statistics for target_logits[b, i] (the same row helpers
     as the logits -> probs kernel: 1 pass over V without top-k/top-p, see probs.py
     for the passes with them), then, for a real draft slot, the accept test
     u * q(d_i) < p(d_i) from two gathered elements.
  2. `_sample_kernel`, one program per row: the accepted prefix n from the accept
     bits, then one pass over position n that computes p (and the residual
     max(0, p - q), or p without d_n for one-hot drafters) tile by tile and runs the
     exponential race argmax(r / E) on both at once, so a residual that rounds to all
     zeros falls back to p without a second pass. Emits drafts, the sample, -1 after.

Non-finite logits follow reference.py's policy: a position whose row allows no token
accepts no draft and emits -1.

p and q are never materialised: the verifier reads every target row it may need once,
then per batch row the sampled position's logits again, one row of noise and (after a
rejection with draft probabilities) one row of q, and writes K+1 tokens per row.
Without top-k/top-p that is about (K+2)/(K+1) reads of the logits in total.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .greedy import _num_draft
from .probs import _load_scaled, _probs_of, _row_distribution, filter_flags

__all__ = ["verify_sampling_triton"]

# Per-position statistics passed from launch 1 to launch 2 (see _row_distribution).
_NUM_STATS = 8  # m, 1/sum, top-k logit, top-p threshold, 1/kept mass, 3 spare
# Exp(1) noise is clamped away from 0 like the reference, so r / E stays finite (the
# engine's noise never reaches the clamp, see specdec.noise).
_MIN_EXPONENTIAL = tl.constexpr(1e-30)


@triton.jit
def _target_rows_kernel(
    logits_ptr, stride_lb, stride_lk,  # [B, K+1, V]
    draft_ptr, stride_db, stride_dk,  # [B, K] int
    q_ptr, stride_qb, stride_qk,  # [B, K, V] draft probs (unread for one-hot drafters)
    u_ptr, stride_ub, stride_uk,  # [B, K] U[0, 1)
    num_draft_ptr,  # [B]
    stats_ptr,  # [B, K+1, _NUM_STATS] float32 out
    accept_ptr, stride_ab,  # [B, max(K, 1)] int8 out
    V, K, temperature, top_k, top_p,
    HAS_Q: tl.constexpr, HAS_NUM_DRAFT: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, NUM_STATS: tl.constexpr,
    BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_CANDIDATES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    nd = _num_draft(num_draft_ptr, b, K, HAS_NUM_DRAFT)
    # Positions past num_draft[b] can never be emitted: do not read their rows.
    if i <= nd:
        row_ptr = logits_ptr + b * stride_lb + i.to(tl.int64) * stride_lk
        m, inv_sum, kth, threshold, inv_kept = _row_distribution(
            row_ptr, V, temperature, top_k, top_p,
            SCALE_BY_RECIPROCAL, HAS_TOP_K, HAS_TOP_P, BLOCK, SEARCH_BLOCK, NUM_CANDIDATES,
        )
        stats = stats_ptr + (b * (K + 1) + i) * NUM_STATS
        tl.store(stats + 0, m)
        tl.store(stats + 1, inv_sum)
        tl.store(stats + 2, kth)
        tl.store(stats + 3, threshold)
        tl.store(stats + 4, inv_kept)
        if i < nd:
            d = tl.load(draft_ptr + b * stride_db + i * stride_dk).to(tl.int64)
            in_vocab = (d >= 0) & (d < V)
            d_safe = tl.where(in_vocab, d, 0)
            x = _load_scaled(row_ptr, d_safe, in_vocab, temperature, SCALE_BY_RECIPROCAL)
            # Same formula as every element of the row: p(d) equals the full row's p[d].
            p_d = tl.where(in_vocab, _probs_of(x, m, inv_sum, kth, threshold, inv_kept, HAS_TOP_K, HAS_TOP_P), 0.0)
            if HAS_Q:
                q_d = tl.load(q_ptr + b * stride_qb + i * stride_qk + d_safe, mask=in_vocab, other=0.0).to(tl.float32)
            else:
                q_d = 1.0
            u = tl.load(u_ptr + b * stride_ub + i * stride_uk).to(tl.float32)
            # u < min(1, p / q) without dividing; a token outside the vocabulary has p = 0.
            tl.store(accept_ptr + b * stride_ab + i, (u * q_d < p_d).to(tl.int8))


@triton.jit
def _sample_kernel(
    logits_ptr, stride_lb, stride_lk,  # [B, K+1, V]
    draft_ptr, stride_db, stride_dk,  # [B, K] int
    q_ptr, stride_qb, stride_qk,  # [B, K, V] draft probs (unread for one-hot drafters)
    e_ptr, stride_eb,  # [B, V] Exp(1)
    num_draft_ptr,  # [B]
    stats_ptr,  # [B, K+1, NUM_STATS] float32
    accept_ptr, stride_ab,  # [B, max(K, 1)] int8
    tokens_ptr,  # [B, K+1] int64 out
    accepted_ptr,  # [B] int64 out
    V, K, temperature,
    HAS_Q: tl.constexpr, HAS_NUM_DRAFT: tl.constexpr, SCALE_BY_RECIPROCAL: tl.constexpr,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, NUM_STATS: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    nd = _num_draft(num_draft_ptr, b, K, HAS_NUM_DRAFT)
    pos = tl.arange(0, BLOCK_K)  # slots 0..K
    accepted = tl.load(accept_ptr + b * stride_ab + pos, mask=pos < nd, other=1)
    n = tl.min(tl.where((pos < nd) & (accepted == 0), pos, nd), axis=0)  # accepted drafts
    rejected = n < nd  # a real draft was rejected at position n (else: bonus sample)
    draft = tl.load(draft_ptr + b * stride_db + pos * stride_dk, mask=pos < nd, other=-1).to(tl.int64)
    d_n = tl.sum(tl.where((pos == n) & rejected, draft, 0), axis=0) - tl.where(rejected, 0, 1)

    stats = stats_ptr + (b * (K + 1) + n) * NUM_STATS
    m = tl.load(stats + 0)
    inv_sum = tl.load(stats + 1)
    kth = tl.load(stats + 2)
    threshold = tl.load(stats + 3)
    inv_kept = tl.load(stats + 4)
    row_ptr = logits_ptr + b * stride_lb + n.to(tl.int64) * stride_lk
    q_row = q_ptr + b * stride_qb + n.to(tl.int64) * stride_qk
    q_cols = tl.where(rejected, V, 0)  # q's row n is read only after a rejection

    # Two races side by side: on p (bonus, or fallback) and on the residual.
    best_p = tl.full([BLOCK], -1.0, tl.float32)
    idx_p = tl.zeros([BLOCK], dtype=tl.int32)
    best_r = tl.full([BLOCK], -1.0, tl.float32)
    idx_r = tl.zeros([BLOCK], dtype=tl.int32)
    residual_mass = tl.zeros([BLOCK], dtype=tl.int32)  # any residual weight > 0
    p_mass = tl.zeros([BLOCK], dtype=tl.int32)  # any p > 0 (none: the row allows no token)
    for start in range(0, V, BLOCK):  # three loads per tile already overlap; no unroll
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = _load_scaled(row_ptr, cols, mask, temperature, SCALE_BY_RECIPROCAL)
        p = tl.where(mask, _probs_of(x, m, inv_sum, kth, threshold, inv_kept, HAS_TOP_K, HAS_TOP_P), 0.0)
        if HAS_Q:
            q = tl.load(q_row + cols, mask=cols < q_cols, other=0.0).to(tl.float32)
            r = tl.maximum(p - q, 0.0)
        else:
            r = tl.where(cols == d_n, 0.0, p)
        e = tl.load(e_ptr + b * stride_eb + cols, mask=mask, other=1.0).to(tl.float32)
        e = tl.maximum(e, _MIN_EXPONENTIAL)
        score_p = tl.math.div_rn(p, e)
        score_r = tl.math.div_rn(r, e)
        # Strictly greater: within a lane the earlier (lower) id keeps a tie.
        better_p = mask & (score_p > best_p)
        best_p = tl.where(better_p, score_p, best_p)
        idx_p = tl.where(better_p, cols, idx_p)
        better_r = mask & (score_r > best_r)
        best_r = tl.where(better_r, score_r, best_r)
        idx_r = tl.where(better_r, cols, idx_r)
        residual_mass = residual_mass | (mask & (r > 0.0)).to(tl.int32)
        p_mass = p_mass | (mask & (p > 0.0)).to(tl.int32)
    top_p_score = tl.max(best_p, axis=0)
    sample_p = tl.min(tl.where(best_p == top_p_score, idx_p, V), axis=0)
    top_r_score = tl.max(best_r, axis=0)
    sample_r = tl.min(tl.where(best_r == top_r_score, idx_r, V), axis=0)
    use_residual = rejected & (tl.max(residual_mass, axis=0) > 0)
    sample_p = tl.where(tl.max(p_mass, axis=0) > 0, sample_p, -1)
    last = tl.where(use_residual, sample_r, sample_p).to(tl.int64)

    tokens = tl.where(pos < n, draft, tl.where(pos == n, last, -1))
    tl.store(tokens_ptr + b * (K + 1) + pos, tokens, mask=pos <= K)
    tl.store(accepted_ptr + b, n.to(tl.int64))


def verify_sampling_triton(
    draft_tokens: torch.Tensor,  # [B, K] int32/int64
    draft_probs: torch.Tensor | None,  # [B, K, V] processed draft probs q; None = one-hot drafter
    target_logits: torch.Tensor,  # [B, K+1, V] float32/bfloat16/float16 raw target logits
    uniforms: torch.Tensor,  # [B, K] U[0, 1) noise for the accept tests
    exponentials: torch.Tensor,  # [B, V] Exp(1) noise for the residual / bonus sample
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_draft: torch.Tensor | None = None,  # [B] int, drafts per row (clamped to [0, K]); None = K
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B] int64
    """Triton version of `reference.verify_sampling` (two launches).

    A draft token outside [0, V) has p = 0 there and is always rejected.
    `block_size` (a power of two) overrides the vocabulary tile.
    """
    draft_tokens = _launch.require_tensor("draft_tokens", draft_tokens)
    target_logits = _launch.require_tensor("target_logits", target_logits)
    uniforms = _launch.require_tensor("uniforms", uniforms)
    exponentials = _launch.require_tensor("exponentials", exponentials)
    temperature, top_k, top_p = _launch.check_sampling_params(temperature, top_k, top_p)
    _launch.require_dtype("uniforms", uniforms, _launch.FLOAT_DTYPES)
    _launch.require_dtype("exponentials", exponentials, _launch.FLOAT_DTYPES)
    if target_logits.dim() == 3:
        vocab_note = f" and V={target_logits.shape[-1]} from target_logits"
    else:
        vocab_note = ""
    batch, k, vocab = _launch.check_verify_shapes(draft_tokens, target_logits, vocab_note)
    from_drafts = f"from draft_tokens {tuple(draft_tokens.shape)} and V={vocab} from target_logits"
    _launch.require_shape("uniforms", uniforms, (batch, k), f"one uniform per draft slot, {from_drafts}")
    _launch.require_shape("exponentials", exponentials, (batch, vocab), f"one Exp(1) per token and row, {from_drafts}")
    _launch.require_unit_last_stride("target_logits", target_logits)
    _launch.require_unit_last_stride("exponentials", exponentials)
    if draft_probs is not None:
        draft_probs = _launch.require_tensor("draft_probs", draft_probs)
        _launch.require_dtype("draft_probs", draft_probs, _launch.FLOAT_DTYPES)
        _launch.require_shape("draft_probs", draft_probs, (batch, k, vocab), f"q for every draft slot, {from_drafts}")
        _launch.require_unit_last_stride("draft_probs", draft_probs)
    if num_draft is not None:
        num_draft = _launch.require_tensor("num_draft", num_draft)
        _launch.require_dtype("num_draft", num_draft, _launch.INDEX_DTYPES)
        _launch.require_shape("num_draft", num_draft, (batch,), "one draft count per row")
    _launch.require_device(
        {"draft_tokens": draft_tokens, "draft_probs": draft_probs, "uniforms": uniforms,
         "exponentials": exponentials, "num_draft": num_draft},
        target_logits.device, _target_rows_kernel,
    )

    device = target_logits.device
    tokens = torch.empty(batch, k + 1, dtype=torch.int64, device=device)
    num_accepted = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return tokens, num_accepted
    block = _launch.pick_block(vocab, block_size)
    has_top_k, has_top_p = filter_flags(vocab, top_k, top_p)
    stats = torch.empty(batch, k + 1, _NUM_STATS, dtype=torch.float32, device=device)
    accept = torch.empty(batch, max(k, 1), dtype=torch.int8, device=device)
    # Empty drafts (K = 0) still need valid pointers; no slot of them is read.
    if k == 0:
        draft_tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        uniforms = torch.zeros(batch, 1, dtype=torch.float32, device=device)
    has_q = draft_probs is not None and k > 0
    q = draft_probs if has_q else target_logits  # unread when HAS_Q is False
    counts = num_draft if num_draft is not None else draft_tokens  # unread when HAS_NUM_DRAFT is False
    temperature_arg = _launch.temperature_operand(temperature, device)
    flags = dict(
        HAS_Q=has_q, HAS_NUM_DRAFT=num_draft is not None, SCALE_BY_RECIPROCAL=device.type == "cuda",
        HAS_TOP_K=has_top_k, HAS_TOP_P=has_top_p, NUM_STATS=_NUM_STATS, BLOCK=block,
    )
    _target_rows_kernel[(batch, k + 1)](
        target_logits, target_logits.stride(0), target_logits.stride(1),
        draft_tokens, draft_tokens.stride(0), draft_tokens.stride(1),
        q, q.stride(0), q.stride(1),
        uniforms, uniforms.stride(0), uniforms.stride(1),
        counts, stats, accept, accept.stride(0),
        vocab, k, temperature_arg, top_k, top_p,
        SEARCH_BLOCK=_launch.search_block(block, _target_rows_kernel), NUM_CANDIDATES=_launch.NUM_CANDIDATES,
        num_warps=8, **_launch.EXACT_ROUNDING, **flags,
    )
    _sample_kernel[(batch,)](
        target_logits, target_logits.stride(0), target_logits.stride(1),
        draft_tokens, draft_tokens.stride(0), draft_tokens.stride(1),
        q, q.stride(0), q.stride(1),
        exponentials, exponentials.stride(0),
        counts, stats, accept, accept.stride(0), tokens, num_accepted,
        vocab, k, temperature_arg,
        BLOCK_K=triton.next_power_of_2(k + 1), num_warps=8, **_launch.EXACT_ROUNDING, **flags,
    )
    return tokens, num_accepted
