#!/usr/bin/env bash
# Install what specdec needs on a fresh machine: redis-server (apt, if missing), the CPU
# build of torch, then the package itself with the extra named in $1 (test or bench).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${1:-test}"

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1; then
    $SUDO apt-get update
    $SUDO apt-get install -y redis-server
fi

PYTHON="${PYTHON:-python3}"
# torch first and pinned: a range resolved by pip alone would pull the CUDA packages.
"$PYTHON" -m pip install "torch==2.13.0"
"$PYTHON" -m pip install -e ".[$EXTRA]"
