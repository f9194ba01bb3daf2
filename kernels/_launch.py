"""Argument checks shared by the Triton launchers.

Every launcher validates shapes, dtypes, devices and layouts on the host before it
launches anything, so a bad call fails with a message that says what was given, what
is allowed and how to fix it, instead of reading out of bounds on the device. None of
these checks looks at tensor values (that would synchronise with the device).
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

# Logit dtypes the kernels read; they always compute in float32.
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Noise and draft probabilities may come in any floating dtype; they are read as float32.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

# Tile of the vocabulary one program reads per step. 2048 bf16/fp32 elements keep
# enough loads in flight per SM on current GPUs without spilling registers.
DEFAULT_BLOCK = 2048
# The two-dimensional tile [SEARCH_BLOCK, NUM_CANDIDATES] of the top-k/top-p threshold
# search holds SEARCH_BLOCK * 16 values, so it uses a smaller vocabulary tile.
NUM_CANDIDATES = 16
# Launch option for kernels that do float arithmetic: no multiply-add contraction, so
# `logits * (1 / T) - max` rounds after the product exactly like torch's separate ops
# (the reference), and the element of the row maximum gets probability exactly 1 / sum.
EXACT_ROUNDING = dict(enable_fp_fusion=False)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated while TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...], hint: str = "") -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} has dtype {tensor.dtype}; the Triton kernel accepts {names}.{hint}")


def require_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} ({meaning})")


def require_unit_last_stride(name: str, tensor: torch.Tensor) -> None:
    """Vocabulary rows are read as contiguous tiles; other dims may have any stride."""
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous along its last (vocabulary) dimension, got strides "
            f"{tuple(tensor.stride())}; pass {name}.contiguous()"
        )


def check_verify_shapes(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                        context: str = "") -> tuple[int, int, int]:
    """Dtype and [B, K] / [B, K+1, V] shape checks shared by the verify launchers.

    Returns (B, K, V); `context` is appended to the shape-mismatch message.
    """
    require_dtype("target_logits", target_logits, LOGIT_DTYPES,
                  " float64 logits run through specdec.kernels.reference.")
    require_dtype("draft_tokens", draft_tokens, INDEX_DTYPES)
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must have shape [B, K], got {tuple(draft_tokens.shape)}")
    batch, k = draft_tokens.shape
    if target_logits.dim() != 3 or target_logits.shape[-1] < 1:
        raise ValueError(f"target_logits must have shape [B, K+1, V] with V >= 1, got {tuple(target_logits.shape)}")
    vocab = target_logits.shape[-1]
    require_shape("target_logits", target_logits, (batch, k + 1, vocab),
                  f"B={batch} rows and K+1={k + 1} positions, from draft_tokens {tuple(draft_tokens.shape)}{context}")
    return batch, k, vocab


def require_device(tensors: dict[str, torch.Tensor | None], device: torch.device, kernel) -> None:
    """All tensors on one device, and a device this build of the kernel can run on."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the logits are on {device}; move both to one device")
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got tensors on {device}; call the dispatching "
            "op in specdec.kernels (it uses the PyTorch reference off the GPU), or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on CPU for testing"
        )


def check_sampling_params(temperature, top_k, top_p) -> tuple[float, int, float]:
    """Validate temperature/top-k/top-p the way the reference interprets them."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0 for sampling, got {temperature}; use greedy for 0")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int (0 disables it), got {type(top_k).__name__}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a float (1.0 disables it), got {type(top_p).__name__}")
    if math.isnan(top_p):
        raise ValueError("top_p must be a number in (0, 1], got nan")
    return float(temperature), int(top_k), float(top_p)


def temperature_operand(temperature: float, device: torch.device) -> float:
    """The float32 scalar the kernels combine with the logits, matching torch's rounding.

    torch computes `logits / temperature` on CUDA as `logits * (1 / temperature)` (a
    float32 reciprocal) and on CPU as a true float32 division. The kernels do the same
    for the device they run on (see SCALE_BY_RECIPROCAL), so kernel and reference see
    bit-identical scaled logits.
    """
    return _temperature_operand(temperature, device.type == "cuda")


@functools.lru_cache(maxsize=64)
def _temperature_operand(temperature: float, reciprocal: bool) -> float:
    t = _float32(temperature)
    # 1 / t in double, then rounded to float32, is the correctly rounded float32
    # quotient (double has more than 2 * 24 + 2 bits), i.e. what 1.0f / t gives.
    return _float32(1.0 / t) if reciprocal else t


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def pick_block(vocab: int, block_size: int | None) -> int:
    """Vocabulary tile: a power of two, no larger than needed for a short row."""
    if block_size is None:
        return max(16, min(DEFAULT_BLOCK, triton.next_power_of_2(vocab)))
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    return block_size


def search_block(block: int, kernel) -> int:
    """Vocabulary tile of the threshold search passes (see NUM_CANDIDATES).

    On the GPU a [block // 4, 16] tile keeps the probes in registers. The interpreter
    has no registers to spill but pays per tile, so it searches with whole tiles.
    """
    return block if is_interpreted(kernel) else max(16, block // 4)
