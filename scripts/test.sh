#!/usr/bin/env bash
# Set up a fresh machine (once; see setup.sh) and run the test suite (CPU; the tests start
# their own redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${PYTHON:-python3}" -m pytest -q "$@"
