#!/usr/bin/env bash
# Install what specdec needs on a fresh machine: redis-server (apt, if missing), the CPU
# build of torch, then the package itself with the extra named in $1 (test or bench).
#
# Runs once per Python environment: a stamp file in that environment records the hash
# of pyproject.toml and the extra. While both match and specdec is installed, nothing is
# reinstalled (set SPECDEC_FORCE_SETUP=1 to reinstall anyway). The check takes well under
# a second: specdec is found, not imported.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${1:-test}"
PYTHON="${PYTHON:-python3}"

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1; then
    $SUDO apt-get update
    $SUDO apt-get install -y redis-server
fi

TORCH_PIN="torch==2.13.0"
KEY="$( (cat pyproject.toml; echo "$EXTRA $TORCH_PIN") | sha256sum | cut -d' ' -f1)"
STAMP="$("$PYTHON" -c 'import sys; print(sys.prefix)')/.specdec-setup-$EXTRA"
if [ "${SPECDEC_FORCE_SETUP:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] \
    && "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('specdec') is None)" 2>/dev/null; then
    exit 0  # already set up for this pyproject.toml and extra
fi

# torch first and pinned: a range resolved by pip alone would pull the CUDA packages.
"$PYTHON" -m pip install "$TORCH_PIN"
"$PYTHON" -m pip install -e ".[$EXTRA]"
echo "$KEY" > "$STAMP"
