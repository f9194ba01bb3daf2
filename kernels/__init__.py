"""Verification and sampling ops: fused Triton kernels on CUDA, plain PyTorch elsewhere.

Every public op dispatches on where its tensors live: CUDA tensors go to the Triton
kernel when Triton is importable, everything else to `specdec.kernels.reference`,
which is also the oracle the kernels are tested against. Both paths take the same
arguments and return the same things; given the same noise they emit the same tokens.

Kernel families (one per module, each with one launcher that checks its arguments):
  greedy.py    verify_greedy_triton     tiled argmax + accept/emit, 2 launches
  sampling.py  verify_sampling_triton   p, accept tests, residual/bonus race, 2 launches
  probs.py     logits_to_probs_triton   temperature, top-k, top-p, softmax, 1 launch
The kernel modules are imported on first use, so importing this package does not
import Triton.
"""

from __future__ import annotations

if __name__ == "kernels":
    # This folder installs as specdec.kernels. Imported as the top-level `kernels` it shadows
    # Hugging Face's `kernels` package, which transformers >= 5.25 imports by that name.
    raise ImportError(
        "imported specdec's kernels/ folder as the top-level module `kernels`, because the "
        "specdec repository root is on sys.path (python -m / python -c run from it); transformers "
        "imports Hugging Face's `kernels` package by that name. Run from another directory, or "
        "with `python -P` / PYTHONSAFEPATH=1 (Python 3.11+), as scripts/test.sh and bench.sh do."
    )

import functools
import os

import torch

from . import reference
from .reference import compute_dtype, sample_exponential_race

__all__ = [
    "compute_dtype",
    "logits_to_probs",
    "reference",
    "sample_exponential_race",
    "triton_available",
    "verify_greedy",
    "verify_sampling",
]

# Logit dtypes the kernels take; float64 keeps the reference's float64 arithmetic.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _kernel_modules():
    """(greedy, sampling, probs) kernel modules, or None when Triton cannot be imported."""
    try:
        from . import greedy, probs, sampling
    except ImportError:
        return None
    return greedy, sampling, probs


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the compiled Triton kernels can run on this machine's CUDA device.

    False under TRITON_INTERPRET=1: the interpreter is for testing the kernels (call the
    launchers directly), and the reference is far faster than it on CPU. Decided once
    per process (the dispatch asks on every call).
    """
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return _kernel_modules() is not None


def _use_triton(logits: torch.Tensor) -> bool:
    return logits.is_cuda and logits.dtype in _KERNEL_DTYPES and triton_available()


def _last_dim_contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or tensor.shape[-1] <= 1 or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def verify_greedy(
    draft_tokens: torch.Tensor,  # [B, K] int64
    target_logits: torch.Tensor,  # [B, K+1, V]
    num_draft: torch.Tensor | None = None,  # [B] drafts per row (<= K); None = all K
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B] int64
    """Greedy verification (see `reference.verify_greedy`); Triton on CUDA tensors."""
    if _use_triton(target_logits):
        greedy = _kernel_modules()[0]
        return greedy.verify_greedy_triton(draft_tokens, _last_dim_contiguous(target_logits), num_draft)
    return reference.verify_greedy(draft_tokens, target_logits, num_draft)


def verify_sampling(
    draft_tokens: torch.Tensor,  # [B, K] int64
    draft_probs: torch.Tensor | None,  # [B, K, V] processed draft probs q; None = one-hot drafter
    target_logits: torch.Tensor,  # [B, K+1, V] raw target logits
    uniforms: torch.Tensor,  # [B, K] U[0, 1) noise for the accept tests
    exponentials: torch.Tensor,  # [B, V] Exp(1) noise for the residual / bonus sample
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_draft: torch.Tensor | None = None,  # [B] drafts per row (<= K); None = all K
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B, K+1] int64 (-1 padded), num_accepted [B] int64
    """Lossless rejection-sampling verification (see `reference.verify_sampling`);
    Triton on CUDA tensors."""
    if _use_triton(target_logits):
        sampling = _kernel_modules()[1]
        return sampling.verify_sampling_triton(
            draft_tokens, _last_dim_contiguous(draft_probs), _last_dim_contiguous(target_logits),
            uniforms, _last_dim_contiguous(exponentials),
            temperature=temperature, top_k=top_k, top_p=top_p, num_draft=num_draft,
        )
    return reference.verify_sampling(
        draft_tokens, draft_probs, target_logits, uniforms, exponentials,
        temperature=temperature, top_k=top_k, top_p=top_p, num_draft=num_draft,
    )


def logits_to_probs(
    logits: torch.Tensor,  # [..., V]
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:  # [..., V] in compute_dtype(logits.dtype), rows sum to 1
    """Temperature, top-k, top-p and softmax (see `reference.logits_to_probs`);
    Triton on CUDA tensors."""
    if _use_triton(logits):
        probs = _kernel_modules()[2]
        if logits.dim() != 2 and not logits.is_contiguous():
            logits = logits.contiguous()
        return probs.logits_to_probs_triton(_last_dim_contiguous(logits), temperature, top_k, top_p)
    return reference.logits_to_probs(logits, temperature, top_k, top_p)
