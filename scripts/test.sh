#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (CPU; the tests start their own redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1; then
    $SUDO apt-get update
    $SUDO apt-get install -y redis-server
fi

PYTHON="${PYTHON:-python3}"
# The CPU build of torch first: a range resolved by pip alone would pull CUDA packages.
"$PYTHON" -m pip install "torch==2.13.0"
"$PYTHON" -m pip install -e ".[test]"
exec "$PYTHON" -m pytest -q "$@"
