"""Shared fixtures. Fixture modules live beside this file and are star-imported here."""

import os

import torch

# Triton kernels run on CPU under the interpreter; it must be set before triton is imported.
# Only where there is no CUDA device: on a GPU the interpreter would replace the compiled
# kernels for every test in the process (tests/test_kernels_isolation.py guards this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

from fixtures_models import *  # noqa: E402,F401,F403
from fixtures_redis import *  # noqa: E402,F401,F403
from fixtures_cli import *  # noqa: E402,F401,F403
