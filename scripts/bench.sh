#!/usr/bin/env bash
# Set up a fresh machine and run the main benchmark on the bundled default model pair.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
exec "${PYTHON:-python3}" -m specdec.cli bench "$@"
