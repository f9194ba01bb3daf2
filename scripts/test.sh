#!/usr/bin/env bash
# Set up a fresh machine (once; see setup.sh) and run the test suite (CPU; the tests start
# their own redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository root stays off sys.path: its kernels/ folder would shadow the `kernels`
# package transformers imports (python -P; PYTHONSAFEPATH also reaches subprocesses).
export PYTHONSAFEPATH=1
bash scripts/setup.sh test
exec "${PYTHON:-python3}" -m pytest -q "$@"
