"""Greedy verification in Triton: tiled argmax fused with the accept/emit step.

Two launches, no host synchronisation:
  1. `_row_argmax_kernel`, one program per (row b, position i <= num_draft[b]): the
     argmax of target_logits[b, i] in one pass over V (lane-wise running maxima, lowest
     id on ties, like torch.argmax; NaN counts as -inf and a row with no allowed token
     gives -1, see reference.py). Positions past num_draft[b] are never emitted, so
     their rows are not read at all.
  2. `_greedy_accept_kernel`, one program per row: longest prefix where the draft equals
     the argmax, then the argmax at the first mismatch (or the bonus token), -1 after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .probs import _sanitize

__all__ = ["verify_greedy_triton"]


@triton.jit
def _num_draft(num_draft_ptr, b, K, HAS_NUM_DRAFT: tl.constexpr):
    """Drafts of row b, clamped to [0, K] (None means K)."""
    if HAS_NUM_DRAFT:
        n = tl.load(num_draft_ptr + b).to(tl.int32)
        return tl.minimum(tl.maximum(n, 0), K)
    else:
        return tl.full([], 0, tl.int32) + K


@triton.jit
def _row_argmax_kernel(
    logits_ptr, stride_lb, stride_lk,  # [B, K+1, V]
    num_draft_ptr,  # [B]
    best_ptr,  # [B, K+1] int32 out
    V, K,
    HAS_NUM_DRAFT: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    if i <= _num_draft(num_draft_ptr, b, K, HAS_NUM_DRAFT):
        row_ptr = logits_ptr + b * stride_lb + i.to(tl.int64) * stride_lk
        best_val = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK], dtype=tl.int32)
        for start in tl.range(0, V, BLOCK, loop_unroll_factor=2):
            cols = start + tl.arange(0, BLOCK)
            x = _sanitize(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32))
            # Strictly greater: within a lane the earlier (lower) id keeps a tie.
            better = x > best_val
            best_val = tl.where(better, x, best_val)
            best_idx = tl.where(better, cols, best_idx)
        top = tl.max(best_val, axis=0)
        # Lowest id among the lanes holding the maximum; -1 when no token is allowed.
        winner = tl.min(tl.where(best_val == top, best_idx, V), axis=0)
        winner = tl.where(top == float("-inf"), -1, winner)
        tl.store(best_ptr + b * (K + 1) + i, winner)


@triton.jit
def _greedy_accept_kernel(
    draft_ptr, stride_db, stride_dk,  # [B, K] int32/int64
    num_draft_ptr,  # [B]
    best_ptr,  # [B, K+1] int32 from _row_argmax_kernel
    tokens_ptr,  # [B, K+1] int64 out
    accepted_ptr,  # [B] int64 out
    K,
    HAS_NUM_DRAFT: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    nd = _num_draft(num_draft_ptr, b, K, HAS_NUM_DRAFT)
    pos = tl.arange(0, BLOCK_K)  # slots 0..K
    best = tl.load(best_ptr + b * (K + 1) + pos, mask=pos <= nd, other=-1).to(tl.int64)
    draft = tl.load(draft_ptr + b * stride_db + pos * stride_dk, mask=pos < nd, other=-1).to(tl.int64)
    # A position with no allowed token (best = -1) matches no draft, not even a -1.
    mismatch = (pos < nd) & ((draft != best) | (best < 0))
    n = tl.min(tl.where(mismatch, pos, nd), axis=0)  # accepted drafts
    last = tl.sum(tl.where(pos == n, best, 0), axis=0)
    tokens = tl.where(pos < n, draft, tl.where(pos == n, last, -1))
    tl.store(tokens_ptr + b * (K + 1) + pos, tokens, mask=pos <= K)
    tl.store(accepted_ptr + b, n.to(tl.int64))


def verify_greedy_triton(
    draft_tokens: torch.Tensor,  # [B, K] int32/int64
    target_logits: torch.Tensor,  # [B, K+1, V] float32/bfloat16/float16
    num_draft: torch.Tensor | None = None,  # [B] int, drafts per row (clamped to [0, K]); None = K
    *,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B] int64
    """Triton version of `reference.verify_greedy` (two launches, each logit read once).

    A draft token outside [0, V) never matches the argmax, so it is rejected.
    `block_size` (a power of two) overrides the vocabulary tile.
    """
    draft_tokens = _launch.require_tensor("draft_tokens", draft_tokens)
    target_logits = _launch.require_tensor("target_logits", target_logits)
    batch, k, vocab = _launch.check_verify_shapes(draft_tokens, target_logits)
    _launch.require_unit_last_stride("target_logits", target_logits)
    if num_draft is not None:
        num_draft = _launch.require_tensor("num_draft", num_draft)
        _launch.require_dtype("num_draft", num_draft, _launch.INDEX_DTYPES)
        _launch.require_shape("num_draft", num_draft, (batch,), "one draft count per row")
    _launch.require_device({"draft_tokens": draft_tokens, "num_draft": num_draft},
                           target_logits.device, _row_argmax_kernel)

    device = target_logits.device
    tokens = torch.empty(batch, k + 1, dtype=torch.int64, device=device)
    num_accepted = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return tokens, num_accepted
    block = _launch.pick_block(vocab, block_size)
    best = torch.empty(batch, k + 1, dtype=torch.int32, device=device)
    # Empty drafts (K = 0) still need a valid pointer; no slot of it is read.
    drafts = draft_tokens if k > 0 else torch.zeros(batch, 1, dtype=torch.int64, device=device)
    counts = num_draft if num_draft is not None else drafts  # unread when HAS_NUM_DRAFT is False
    _row_argmax_kernel[(batch, k + 1)](
        target_logits, target_logits.stride(0), target_logits.stride(1), counts, best, vocab, k,
        HAS_NUM_DRAFT=num_draft is not None, BLOCK=block, num_warps=8,
    )
    _greedy_accept_kernel[(batch,)](
        drafts, drafts.stride(0), drafts.stride(1), counts, best, tokens, num_accepted, k,
        HAS_NUM_DRAFT=num_draft is not None, BLOCK_K=triton.next_power_of_2(k + 1), num_warps=1,
    )
    return tokens, num_accepted
