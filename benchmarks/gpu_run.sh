#!/usr/bin/env bash
# Everything a GPU session runs, in stages that each fit in one 10-minute call.
#
#   benchmarks/gpu_run.sh OUT_DIR STAGE [STAGE ...]
#
# Stages:
#   env        device, driver and package versions                         (seconds)
#   tests      pytest -m gpu: every GPU test must run and pass, none skip  (~3-5 min)
#   interp     the interpreter tests in their own process, with the GPU
#              present (tests/test_kernels_isolation.py)                   (~3-4 min)
#   kernels    benchmarks/bench_kernels.py, bf16 and fp32                  (~2 min)
#   bench-b1   benchmarks/bench_gpu.py, Llama-3-8B / 3.2-1B shapes, batch 1, K 4,
#              oracle alpha 0.7 and 1.0, plus transformers assisted        (~4-6 min)
#   bench-b16  the same at batch 16 (transformers assisted is batch 1 only)
#   bench-b64  the same at batch 64
#   compiled   specdec bench --compile on the bundled pair: compiled (CUDA graphs) baseline
#              and auto beside their eager twins, hf and hf-compiled     (~3-5 min)
#   all        every stage above, in order (longer than one 10-minute call)
# One call each, same OUT_DIR:  env tests | kernels interp | bench-b1 | bench-b16 | bench-b64
#
# Each stage logs to OUT_DIR/logs/<stage>.log and appends "<stage> ok|FAILED (rc N)"
# to OUT_DIR/status.txt; a failing stage does not stop the next one, and the script
# exits non-zero if any stage failed. Python: .venv/bin/python if present, else python3
# (override with PYTHON=...); the package is installed editable (no dependencies) when
# `specdec.kernels` does not import from this checkout. STAGE_TIMEOUT (seconds, default
# 570) bounds each stage so its log is written even when the caller's limit is near.
set -u -o pipefail

if [ $# -lt 2 ]; then
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
STAGES=("$@")
[ "${STAGES[0]}" = "all" ] && STAGES=(env tests interp kernels bench-b1 bench-b16 bench-b64 compiled)

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TIMEOUT=${STAGE_TIMEOUT:-570}
mkdir -p "$OUT/logs"
unset TRITON_INTERPRET  # compiled kernels on the GPU (tests/conftest.py sets it only without CUDA)
export OUT PYTHON

# The package maps kernels/ to specdec.kernels, so it must be installed (editable) to import.
if ! "$PYTHON" -c "import os, specdec.kernels as k; assert os.path.realpath(k.__file__).startswith(os.path.realpath('$ROOT'))" \
        2>/dev/null; then
    echo "installing this checkout (pip install --no-deps --no-build-isolation -e .)"
    if ! "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >"$OUT/logs/install.log" 2>&1; then
        echo "pip install -e . failed; see $OUT/logs/install.log" >&2
        exit 2
    fi
fi

stage_env() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi || true
    "$PYTHON" - <<'EOF'
import platform, torch, transformers, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
}

stage_tests() {
    local log="$OUT/logs/tests.pytest.txt"
    "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests | tee "$log"
    local rc=$?
    # A skip of a GPU test (its file, or a CUDA reason) is a failure here; a module that
    # skips at collection for a missing optional package is reported, not fatal.
    if grep -E "^SKIPPED" "$log" | grep -Eiq "_gpu|cuda"; then
        echo "GPU tests were skipped on a CUDA machine: every GPU test must run" >&2
        return 1
    fi
    return $rc
}

stage_interp() {
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_isolation.py
}

stage_kernels() {
    "$PYTHON" benchmarks/bench_kernels.py --dtype bf16 fp32 --out "$OUT/kernels"
}

bench() {
    "$PYTHON" benchmarks/bench_gpu.py --preset llama3-8b-1b --batch "$1" --k 4 --alpha 0.7 1.0 --out "$OUT/bench_gpu"
}
stage_bench-b1() { bench 1; }
stage_bench-b16() { bench 16; }
stage_bench-b64() { bench 64; }
stage_compiled() {
    "$PYTHON" -m specdec.cli bench --device cuda --compile --no-progress --repeats 3 \
        --methods baseline,baseline-eager,auto,auto-eager,hf,hf-compiled --out "$OUT/compiled"
}

for stage in "${STAGES[@]}"; do
    if ! declare -F "stage_$stage" >/dev/null; then
        echo "unknown stage '$stage'; stages: env tests interp kernels bench-b1 bench-b16 bench-b64 compiled all" >&2
        exit 2
    fi
done

failed=0
for stage in "${STAGES[@]}"; do
    log="$OUT/logs/$stage.log"
    echo "== $stage ($(date -u +%H:%M:%S)) -> $log"
    start=$(date +%s)
    # A subshell under timeout, so a stage that hangs still leaves its log and status.
    timeout --signal=TERM --kill-after=20 "$TIMEOUT" bash -c "$(declare -f stage_env stage_tests stage_interp \
        stage_kernels bench stage_bench-b1 stage_bench-b16 stage_bench-b64 stage_compiled); set -o pipefail; stage_$stage" \
        2>&1 | tee "$log"
    rc=$?
    seconds=$(( $(date +%s) - start ))
    if [ $rc -eq 0 ]; then
        echo "$stage ok (${seconds}s)" | tee -a "$OUT/status.txt"
    else
        echo "$stage FAILED (rc $rc, ${seconds}s)" | tee -a "$OUT/status.txt"
        failed=1
    fi
done
exit $failed
