"""Shared fixtures. Fixture modules live beside this file and are star-imported here."""

import os
import sys
from pathlib import Path

# The repository root must not be on sys.path (python -m pytest puts the working directory
# there): its kernels/ folder would shadow Hugging Face's `kernels` package, which transformers
# imports. specdec itself is found through its install. PYTHONSAFEPATH keeps it off for the
# Python subprocesses the tests start from the root (Python 3.11+).
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

import torch  # noqa: E402

# Triton kernels run on CPU under the interpreter; it must be set before triton is imported.
# Only where there is no CUDA device: on a GPU the interpreter would replace the compiled
# kernels for every test in the process (tests/test_kernels_isolation.py guards this).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

# Trusted-mode epoch watermarks (cache/namespace.py) go to a folder of this run, never the
# user's cache; child processes inherit it. Removed at exit.
if "SPECDEC_EPOCH_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _EPOCH_DIR = tempfile.mkdtemp(prefix="specdec-epochs-")
    os.environ["SPECDEC_EPOCH_DIR"] = _EPOCH_DIR
    atexit.register(shutil.rmtree, _EPOCH_DIR, True)

from fixtures_models import *  # noqa: E402,F401,F403
from fixtures_redis import *  # noqa: E402,F401,F403
from fixtures_cli import *  # noqa: E402,F401,F403
