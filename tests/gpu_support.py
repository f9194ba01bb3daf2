"""What every GPU test module shares: its marks, and the rule that on a CUDA machine a
GPU test runs or fails, never skips.

The marks depend on CUDA alone (evaluated when the module is imported); whether the
compiled Triton kernels are usable is checked inside the tests, where a missing kernel
is a failure with the reason, so a setting that disables them (TRITON_INTERPRET leaking
into the process) cannot quietly turn a GPU run into a run of skips.
tests/test_kernels_isolation.py checks both rules by collecting the suite with CUDA
faked present and absent.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def require_compiled_kernels() -> None:
    """Fail (not skip) when CUDA is present but the compiled Triton kernels are not."""
    import specdec.kernels as kernels

    if kernels.triton_available():
        return
    try:
        from specdec.kernels import greedy  # noqa: F401

        importable = "yes"
    except ImportError as error:
        importable = f"no ({error})"
    pytest.fail(
        "CUDA is available but specdec.kernels.triton_available() is False: "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, kernel modules importable: {importable}. "
        "Unset TRITON_INTERPRET (only tests/conftest.py may set it, and only without CUDA)."
    )
