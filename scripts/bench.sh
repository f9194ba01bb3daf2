#!/usr/bin/env bash
# Set up a fresh machine (once; see setup.sh) and run the headline benchmark on the bundled
# default model pair. Arguments go to `specdec bench`, e.g. --full for the K sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
exec "${PYTHON:-python3}" -m specdec.cli bench "$@"
