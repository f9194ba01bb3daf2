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
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser; int64 multiplication wraps modulo 2**64 like uint64."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def hash_bits(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    stream: int,
    width: int,
) -> torch.Tensor:  # [B, width] int64, 64 well-mixed bits each
    """The raw 64-bit hash of (seed, counter, stream, index) for index in [0, width)."""
    state = _mix(seeds + _GOLDEN)
    state = _mix(state + counters * _GOLDEN + _wrap(stream * _MUL1))  # [B]
    index = torch.arange(width, device=seeds.device, dtype=torch.int64)  # [width]
    return _mix(state.unsqueeze(1) + (index + 1) * _GOLDEN)


def uniform(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    stream: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [B, width] in [0, 1)
    """Uniforms on a grid fine enough for `dtype` and never rounded up to 1."""
    bits = 53 if dtype == torch.float64 else 24
    mantissa = _shr(hash_bits(seeds, counters, stream, width), 64 - bits)
    return mantissa.to(dtype) * (2.0 ** -bits)


def exponential(
    seeds: torch.Tensor,  # [B] int64
    counters: torch.Tensor,  # [B] int64
    stream: int,
    width: int,
    dtype: torch.dtype,
) -> torch.Tensor:  # [B, width] Exp(1), > 0
    """Exp(1) noise by inversion: -log(1 - u) with u in [0, 1), so 1 - u is in (0, 1]."""
    u = uniform(seeds, counters, stream, width, dtype)
    return -torch.log1p(-u)


def request_seeds(seeds: list[int] | None, batch: int, device: torch.device) -> torch.Tensor:  # [B] int64
    """The per-row seed tensor of a request; unseeded rows get fresh random seeds."""
    if seeds is None:
        seeds = [secrets.randbits(63) for _ in range(batch)]
    return torch.tensor([s & ((1 << 63) - 1) for s in seeds], dtype=torch.int64, device=device)
