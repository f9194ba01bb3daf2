#!/usr/bin/env bash
# Set up a fresh machine and run the main benchmark on the bundled default model pair.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1; then
    $SUDO apt-get update
    $SUDO apt-get install -y redis-server
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install "torch==2.13.0"
"$PYTHON" -m pip install -e ".[bench]"
exec specdec bench "$@"
