#!/usr/bin/env bash
# Set up a fresh machine (once; see setup.sh) and run the headline benchmark on the bundled
# default model pair. Arguments go to `specdec bench`, e.g. --full for the K sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository root stays off sys.path: its kernels/ folder would shadow the `kernels`
# package transformers imports (python -P; PYTHONSAFEPATH also reaches subprocesses).
export PYTHONSAFEPATH=1
bash scripts/setup.sh bench
exec "${PYTHON:-python3}" -m specdec.cli bench "$@"
