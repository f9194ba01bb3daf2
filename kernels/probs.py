"""Fused logits -> probabilities (temperature, top-k, top-p, softmax) in Triton.

One program per row of logits. The row helpers here are also what the sampling
verifier uses for the target distribution, so the draft's q (from this kernel) and
the target's p (inside the verifier) come out of the same code with the same tiles:
equal logits give bit-identical probabilities.

Passes over a row of V logits (each pass reads the row once, in tiles):
  * no top-k/top-p: 1 pass (online max and sum of exp), then 1 writing pass;
  * top-k: 1 pass (max, min), at most 8 counting passes to find the k-th largest
    logit exactly, 1 pass for the sum of exp over the kept logits;
  * top-p: at most 8 more passes to find the probability threshold exactly;
so at most 18 reads of the row with both filters (the searches re-read a row the
same program just read, which mostly stays in L2), then the writing pass.
The streaming loops are unrolled twice: Triton does not prefetch these loads, so the
unroll is what keeps two tiles in flight per program when only a few programs run
(small batches); it adds no registers for accumulators.
The threshold searches walk the order-preserving integer keys of float32 values with
NUM_CANDIDATES - 1 = 15 probes per pass, so 2**32 keys shrink to one in at most 8
passes, and the result is the exact value the sorting reference would pick (ties and
all), not an approximation.

Non-finite logits follow the reference's policy (`reference.sanitize_logits`): NaN is
-inf, +inf is the largest float32 after scaling, a row with no allowed token gives
all-zero probabilities.

Conventions are those of `reference.logits_to_probs`: top-k keeps every logit >= the
k-th largest; top-p keeps every token whose probability is >= the smallest probability
p_m whose strictly-larger mass is < top_p (the reference's tie-inclusive threshold,
restated without sorting: the reference keeps rank m iff the mass ranked before it is
< top_p, and the first rank of a value v has exactly the mass of values > v before it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

__all__ = ["logits_to_probs_triton"]


@triton.jit
def _float_key(x):
    """Order-preserving int32 key of float32 values (an involution on the bits)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_float(key):
    """Inverse of _float_key."""
    key = key.to(tl.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


# Largest finite float32: +inf logits become this after scaling (reference.sanitize_logits).
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _sanitize(x):
    """NaN -> -inf, +inf -> FLOAT32_MAX (the policy of reference.sanitize_logits)."""
    return tl.where(x == x, tl.minimum(x, FLOAT32_MAX), float("-inf"))


@triton.jit
def _load_scaled(row_ptr, cols, mask, temperature, SCALE_BY_RECIPROCAL: tl.constexpr):
    """Logits of one tile as float32 divided by the temperature, sanitised (-inf outside the row)."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if SCALE_BY_RECIPROCAL:
        # CUDA build: `temperature` holds float32(1 / T), as torch uses on CUDA.
        x = x * temperature
    else:
        x = tl.math.div_rn(x, temperature)
    return _sanitize(x)


@triton.jit
def _probs_of(x, m, inv_sum, kth, threshold, inv_kept, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr):
    """Final probabilities of scaled logits `x` given the row's statistics."""
    p = tl.exp(x - m) * inv_sum
    if HAS_TOP_K:
        p = tl.where(x >= kth, p, 0.0)
    if HAS_TOP_P:
        p = tl.where(p >= threshold, p * inv_kept, 0.0)
    return p


@triton.jit
def _top_k_logit(
    row_ptr, V, temperature, top_k, x_min, x_max,
    SCALE_BY_RECIPROCAL: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_CANDIDATES: tl.constexpr,
):
    """The k-th largest scaled logit (counted with multiplicity), exactly.

    Invariant: count(x >= key lo) >= k and count(x >= key hi) < k; each pass counts the
    row against 15 keys strictly between them and keeps the bracketing pair.
    """
    lo = _float_key(x_min).to(tl.int64)
    hi = _float_key(x_max).to(tl.int64) + 1
    probe = (tl.arange(0, NUM_CANDIDATES) + 1).to(tl.int64)  # [C]
    while hi - lo > 1:
        step = (hi - lo + NUM_CANDIDATES - 1) // NUM_CANDIDATES
        cand = lo + probe * step  # [C]
        inside = cand < hi
        cand = tl.where(inside, cand, lo)
        cand_x = _key_float(cand)
        count = tl.zeros([NUM_CANDIDATES], dtype=tl.int32)
        for start in range(0, V, SEARCH_BLOCK):
            cols = start + tl.arange(0, SEARCH_BLOCK)
            mask = cols < V
            x = _load_scaled(row_ptr, cols, mask, temperature, SCALE_BY_RECIPROCAL)
            hit = (x[:, None] >= cand_x[None, :]) & mask[:, None]  # [SEARCH_BLOCK, C]
            count += tl.sum(hit.to(tl.int32), axis=0)
        lo = tl.maximum(lo, tl.max(tl.where(inside & (count >= top_k), cand, lo), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(inside & (count < top_k), cand, hi), axis=0))
    return _key_float(lo)


@triton.jit
def _top_p_threshold(
    row_ptr, V, temperature, top_p, m, inv_sum, kth,
    SCALE_BY_RECIPROCAL: tl.constexpr, HAS_TOP_K: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr, NUM_CANDIDATES: tl.constexpr,
):
    """(threshold, kept mass): keep p >= threshold, the smallest p whose strictly-larger
    mass is < top_p; kept mass is the sum of the kept probabilities (for renormalising).

    Probabilities are >= 0, so their float bits are already ordered keys. Invariant:
    mass(p > key lo) >= top_p (lo = -1 stands for "below every p") and
    mass(p > key hi) < top_p (true for hi = key(p_max) whenever top_p > 0; for
    top_p <= 0 the search ends at hi = key(p_max), keeping the maximum like the reference).
    """
    lo = tl.full([], -1, tl.int64)
    hi = _float_key(inv_sum).to(tl.int64)  # p of the row maximum: exp(0) / sum
    mass_lo = tl.full([], 0.0, tl.float32)
    total = tl.full([], 0.0, tl.float32)
    probe = (tl.arange(0, NUM_CANDIDATES) + 1).to(tl.int64)  # [C]
    while hi - lo > 1:
        step = (hi - lo + NUM_CANDIDATES - 1) // NUM_CANDIDATES
        cand = lo + probe * step  # [C]
        inside = cand < hi
        cand = tl.where(inside, cand, hi - 1)
        cand_p = _key_float(cand)
        mass = tl.zeros([NUM_CANDIDATES], dtype=tl.float32)
        total_acc = tl.zeros([SEARCH_BLOCK], dtype=tl.float32)
        for start in range(0, V, SEARCH_BLOCK):
            cols = start + tl.arange(0, SEARCH_BLOCK)
            mask = cols < V
            x = _load_scaled(row_ptr, cols, mask, temperature, SCALE_BY_RECIPROCAL)
            p = _probs_of(x, m, inv_sum, kth, 0.0, 1.0, HAS_TOP_K, False)
            p = tl.where(mask, p, 0.0)
            above = tl.where(p[:, None] > cand_p[None, :], p[:, None], 0.0)  # [SEARCH_BLOCK, C]
            mass += tl.sum(above, axis=0)
            total_acc += p
        total = tl.sum(total_acc, axis=0)
        keep_lo = inside & (mass >= top_p)
        new_lo = tl.maximum(lo, tl.max(tl.where(keep_lo, cand, lo), axis=0))
        mass_lo = tl.where(new_lo > lo, tl.max(tl.where(keep_lo & (cand == new_lo), mass, 0.0), axis=0), mass_lo)
        hi = tl.minimum(hi, tl.min(tl.where(inside & (mass < top_p), cand, hi), axis=0))
        lo = new_lo
    # mass(p > key lo) is the mass of p >= key hi, i.e. of the kept tokens.
    kept = tl.where(lo >= 0, mass_lo, total)
    return _key_float(hi), kept


@triton.jit
def _row_distribution(
    row_ptr, V, temperature, top_k, top_p,
    SCALE_BY_RECIPROCAL: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
    BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_CANDIDATES: tl.constexpr,
):
    """Statistics that turn any logit of the row into its probability via _probs_of:
    (max scaled logit, 1 / sum of exp, top-k logit, top-p threshold, 1 / kept mass)."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    x_min = tl.full([], float("inf"), tl.float32)
    for start in tl.range(0, V, BLOCK, loop_unroll_factor=2):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = _load_scaled(row_ptr, cols, mask, temperature, SCALE_BY_RECIPROCAL)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        if HAS_TOP_K:
            x_min = tl.minimum(x_min, tl.min(tl.where(mask, x, float("inf")), axis=0))
        else:
            # Online softmax sum; a row that is -inf so far must not produce inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new

    kth = tl.full([], float("-inf"), tl.float32)
    if HAS_TOP_K:
        kth = _top_k_logit(row_ptr, V, temperature, top_k, x_min, m, SCALE_BY_RECIPROCAL, SEARCH_BLOCK, NUM_CANDIDATES)
    # A row with no allowed token (all -inf after sanitising) gets m = 0, so every
    # probability of it comes out exp(-inf) = 0, not nan.
    m = tl.where(m == float("-inf"), 0.0, m)
    if HAS_TOP_K:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in tl.range(0, V, BLOCK, loop_unroll_factor=2):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = _load_scaled(row_ptr, cols, mask, temperature, SCALE_BY_RECIPROCAL)
            acc += tl.where(mask & (x >= kth), tl.exp(x - m), 0.0)
        s = tl.sum(acc, axis=0)
    # s >= 1 for a row with an allowed token (the maximum adds exp(0)); 0 for one without,
    # whose probabilities exp(-inf) * 1 are then 0.
    inv_sum = tl.math.div_rn(1.0, tl.maximum(s, 1.0))

    threshold = tl.full([], 0.0, tl.float32)
    inv_kept = tl.full([], 1.0, tl.float32)
    if HAS_TOP_P:
        threshold, kept = _top_p_threshold(
            row_ptr, V, temperature, top_p, m, inv_sum, kth,
            SCALE_BY_RECIPROCAL, HAS_TOP_K, SEARCH_BLOCK, NUM_CANDIDATES,
        )
        # kept >= the top probability > 0, except in a row without an allowed token (all 0).
        inv_kept = tl.math.div_rn(1.0, tl.maximum(kept, 1e-30))
    return m, inv_sum, kth, threshold, inv_kept


@triton.jit
def _logits_to_probs_kernel(
    logits_ptr, stride_row,  # [R, V] logits, unit stride along V
    out_ptr,  # [R, V] float32, contiguous
    V, temperature, top_k, top_p,
    SCALE_BY_RECIPROCAL: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
    BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_CANDIDATES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m, inv_sum, kth, threshold, inv_kept = _row_distribution(
        row_ptr, V, temperature, top_k, top_p,
        SCALE_BY_RECIPROCAL, HAS_TOP_K, HAS_TOP_P, BLOCK, SEARCH_BLOCK, NUM_CANDIDATES,
    )
    for start in tl.range(0, V, BLOCK, loop_unroll_factor=2):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = _load_scaled(row_ptr, cols, mask, temperature, SCALE_BY_RECIPROCAL)
        p = _probs_of(x, m, inv_sum, kth, threshold, inv_kept, HAS_TOP_K, HAS_TOP_P)
        tl.store(out_ptr + row * V + cols, p, mask=mask)


def filter_flags(vocab: int, top_k: int, top_p: float) -> tuple[bool, bool]:
    """(top-k active, top-p active), exactly when the reference applies them."""
    return 0 < top_k < vocab, top_p < 1.0


def logits_to_probs_triton(
    logits: torch.Tensor,  # [..., V] float32/bfloat16/float16
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    *,
    block_size: int | None = None,
) -> torch.Tensor:  # [..., V] float32, rows sum to 1
    """Triton version of `reference.logits_to_probs` (one launch, one program per row).

    `block_size` (a power of two) overrides the vocabulary tile; tests use small tiles
    to cover rows that span several tiles.
    """
    logits = _launch.require_tensor("logits", logits)
    temperature, top_k, top_p = _launch.check_sampling_params(temperature, top_k, top_p)
    _launch.require_dtype("logits", logits, _launch.LOGIT_DTYPES,
                          " float64 logits run through specdec.kernels.reference.")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    _launch.require_unit_last_stride("logits", logits)
    _launch.require_device({}, logits.device, _logits_to_probs_kernel)
    vocab = logits.shape[-1]
    if logits.dim() == 2:
        rows = logits  # any row stride, e.g. logits[:, -1, :] of a [B, T, V] tensor
    elif logits.is_contiguous():
        rows = logits.view(-1, vocab)
    else:
        raise ValueError(
            f"logits with shape {tuple(logits.shape)} and strides {tuple(logits.stride())} cannot be "
            "read as rows of V; pass logits.contiguous()"
        )
    block = _launch.pick_block(vocab, block_size)
    has_top_k, has_top_p = filter_flags(vocab, top_k, top_p)
    out = torch.empty(rows.shape, dtype=torch.float32, device=logits.device)
    if rows.shape[0] == 0:
        return out.view(logits.shape)
    _logits_to_probs_kernel[(rows.shape[0],)](
        rows, rows.stride(0), out, vocab,
        _launch.temperature_operand(temperature, logits.device), top_k, top_p,
        SCALE_BY_RECIPROCAL=logits.device.type == "cuda",
        HAS_TOP_K=has_top_k, HAS_TOP_P=has_top_p,
        BLOCK=block, SEARCH_BLOCK=_launch.search_block(block, _logits_to_probs_kernel), NUM_CANDIDATES=_launch.NUM_CANDIDATES,
        num_warps=8, **_launch.EXACT_ROUNDING,
    )
    return out.view(logits.shape)
