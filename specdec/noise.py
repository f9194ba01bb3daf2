"""Counter-based noise for sampling: a pure function of (seed, counter, stream, index).

Every random number the decoder uses is a hash of four integers: the row's seed, a
counter (the row's sequence length when the step starts), a stream (what the number is
for: accept tests, the residual/bonus sample, the i-th draft sample) and an index within
the stream (the draft slot or vocabulary id). The hash is splitmix64's finaliser applied
in int64 torch ops on the device, so a whole batch's noise is one batched computation,
there is no generator to reseed per row, and the numbers do not depend on which other
rows share the batch, on the engine path, or on the device.

Unseeded requests get a fresh random seed per row, drawn on the host once per request,
so they take the same code path and still differ from call to call.
"""

from __future__ import annotations

import math
import secrets

import torch

# Stream ids: what a number is used for (never reuse one for two purposes).
UNIFORM_STREAM = 0  # accept tests, one per draft slot
BONUS_STREAM = 1  # residual / bonus exponential race over the vocabulary
DRAFT_STREAM = 2  # + i: the draft model's i-th sample of a step

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_MUL1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MUL2 = -7723592293110705685  # 0x94D049BB133111EB


def _wrap(value: int) -> int:
    """A Python int reduced to a signed int64, as uint64 arithmetic would leave it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic on negatives)."""
    return torch.bitwise_right_shift(x, bits).bitwise_and_((1 << (64 - bits)) - 1)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser, in place; int64 multiplication wraps modulo 2**64 like uint64."""
    x.bitwise_xor_(_shr(x, 30)).mul_(_MUL1)
    x.bitwise_xor_(_shr(x, 27)).mul_(_MUL2)
    return x.bitwise_xor_(_shr(x, 31))


def hash_bits(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    stream: int,
    width: int,
) -> torch.Tensor:  # [B, width] int64, 64 well-mixed bits each
    """The raw 64-bit hash of (seed, counter, stream, index) for index in [0, width).

    In-place ops: at a 262k vocabulary a row of noise is a few million int64 operations,
    and each fresh temporary would be another pass over memory.
    """
    state = _mix_(seeds + _GOLDEN)
    state = _mix_(state + counters * _GOLDEN + _wrap(stream * _MUL1))  # [B]
    index = torch.arange(1, width + 1, device=seeds.device, dtype=torch.int64).mul_(_GOLDEN)  # [width]
    return _mix_(index.unsqueeze(0) + state.unsqueeze(1))


def _open_unit64(bits: torch.Tensor) -> torch.Tensor:  # int64 hashes -> float64 in (0, 1)
    """(m + 1/2) * 2**-52 from the top 52 bits m: exact in float64 (53 significant bits),
    strictly inside (0, 1), on a grid of 2**-52 at both ends."""
    return _shr(bits, 12).to(torch.float64).add_(0.5).mul_(2.0 ** -52)


def uniform(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    stream: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [B, width] in (0, 1)
    """Uniforms strictly inside (0, 1) on a grid the dtype represents exactly.

    (m + 1/2) * 2**-b with m the top b hash bits and b the dtype's stored mantissa bits
    (52 for float64, 23 for float32): b + 1 significant bits, so the cast rounds nothing,
    and u is never 0 (an accept test u * q < p would then accept any token with p > 0)
    nor 1.
    """
    bits = -math.frexp(torch.finfo(dtype).eps)[1] + 1  # eps = 2**-b
    mantissa = _shr(hash_bits(seeds, counters, stream, width), 64 - bits)
    return mantissa.to(torch.float64).add_(0.5).mul_(2.0 ** -bits).to(dtype)


def exponential(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    stream: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [B, width] Exp(1), finite and > 0
    """Exp(1) noise by inversion, E = -log1p(-u), computed in float64 and then cast.

    The race argmax(r / E) lets a token win whatever its weight when its E is 0, so E
    must never be 0, and its grid near 0 must be fine: P(E < x) = x for true Exp(1)
    noise, and a grid of step h near 0 gives about V * h per row to tokens whose weight
    should not win. A float32 uniform has h = 2**-24: about V / 2**24 of the rows (1.6%
    at V = 262k) were decided by the grid, not by the weights. Here u = (m + 1/2) * 2**-52
    in float64, so E lies in [1.1e-16, 36.7] with h = 2**-52 (V * h < 1e-10), and the
    cast keeps it positive in float32 and bfloat16; float16, whose smallest normal is
    6e-5, is clamped there.
    """
    e = _open_unit64(hash_bits(seeds, counters, stream, width)).neg_().log1p_().neg_()
    if dtype == torch.float64:
        return e
    return e.to(dtype).clamp_(min=torch.finfo(dtype).tiny)


def exponential_by_position(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    positions: int,
    stream: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [B, positions, width] Exp(1), finite and > 0
    """Exp(1) noise for `positions` consecutive counters of each row: slot j of row b is
    exactly exponential(seeds[b], counters[b] + j, stream, ...), the noise a step starting
    j tokens later would draw, so a sample keyed this way belongs to its absolute position."""
    batch = seeds.shape[0]
    offsets = torch.arange(positions, device=seeds.device, dtype=torch.int64)  # [P]
    flat_seeds = seeds.repeat_interleave(positions)  # [B * P]
    flat_counters = (counters.unsqueeze(1) + offsets).reshape(-1)  # [B * P]
    return exponential(flat_seeds, flat_counters, stream, width, dtype).view(batch, positions, width)


def request_seeds(seeds: list[int] | None, batch: int, device: torch.device) -> torch.Tensor:  # [B] int64
    """The per-row seed tensor of a request; unseeded rows get fresh random seeds."""
    if seeds is None:
        seeds = [secrets.randbits(63) for _ in range(batch)]
    return torch.tensor([s & ((1 << 63) - 1) for s in seeds], dtype=torch.int64, device=device)
