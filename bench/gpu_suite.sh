#!/usr/bin/env bash
# The one script a session with the device runs: FP8 kernels' correctness, then their speed beside
# same-run baselines (torch._scaled_mm, bf16 matmul, a device copy). Target: under 4 minutes.
#
#   bash bench/gpu_suite.sh            # from the repository root or anywhere
#
# No installs: it runs the machine's python3 (torch + Triton) with PYTHONPATH=src. PYTHON=... overrides;
# without a torch in python3 it falls back to .venv/bin/python. Full results and the log go under $OUT
# when it is set (fp8_gpu.json, gpu_suite.log); a short table is printed last.
#
# Exit codes: 0 all sections ran and every check passed; 1 a check failed or a section raised;
#             3 no GPU (or no torch): nothing measured.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# Sections stop starting after this many seconds (compilation and autotuning included), so the whole run
# stays under the device call's limit; the timeout below is the hard stop.
export MOEKIT_BENCH_BUDGET_S="${MOEKIT_BENCH_BUDGET_S:-200}"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if python3 -c "import torch" >/dev/null 2>&1; then PY=python3
    elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
    else
        echo "gpu_suite: no python with torch found (tried python3 and .venv/bin/python); nothing measured. Exit code 3."
        exit 3
    fi
fi

# Quick exit without a GPU, before Triton or the kernels are imported.
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_suite: no CUDA/ROCm GPU visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)); nothing measured. Exit code 3."
    exit 3
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    { nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>/dev/null \
        || rocm-smi 2>/dev/null; } > "$OUT/gpu_state.txt"
    timeout 230 "$PY" bench/fp8_gpu.py 2>&1 | tee "$OUT/gpu_suite.log"
    rc=${PIPESTATUS[0]}
else
    timeout 230 "$PY" bench/fp8_gpu.py
    rc=$?
fi
if [ "$rc" = 124 ]; then
    echo "gpu_suite: hard timeout (230 s) reached; the sections printed above are what ran."
    exit 1
fi
exit "$rc"
