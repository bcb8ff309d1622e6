#!/usr/bin/env bash
# The one script a session with the device runs (target: under 5 minutes, worst case ~4.7):
#   1. bench/fp8_gpu.py: FP8 kernels' correctness, then their speed beside same-run baselines
#      (torch._scaled_mm, bf16 matmul, a device copy);
#   2. bench/moe_gpu.py: the Buffer and the MoE layer on CUDA tensors (bf16 vs FP8 experts);
#   3. tests/ep/test_ep_gpu.py: the Buffer's GPU paths (communication stream, FP8, autograd, low latency).
#   4. bench/sm_split.py: 8 virtual ranks' dispatch/combine kernels on k SMs beside the FP8 GEMM.
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
export MOEKIT_BENCH_BUDGET_S="${MOEKIT_BENCH_BUDGET_S:-150}"

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

LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_suite.log"
    { nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>/dev/null \
        || rocm-smi 2>/dev/null; } > "$OUT/gpu_state.txt"
fi
# step NAME SECONDS CMD...: run with a hard timeout, log, and remember the exit code.
declare -A RC
step() {
    local name=$1 limit=$2; shift 2
    echo "=== $name ===" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    RC[$name]=${PIPESTATUS[0]}
    [ "${RC[$name]}" = 124 ] && echo "gpu_suite: $name hit its hard timeout ($limit s)" | tee -a "$LOG"
}
step fp8 180 "$PY" bench/fp8_gpu.py
step moe 60 "$PY" bench/moe_gpu.py
step ep_gpu_tests 40 "$PY" -m pytest -q -p no:cacheprovider tests/ep/test_ep_gpu.py
MOEKIT_BENCH_BUDGET_S=60 step sm_split 90 "$PY" bench/sm_split.py
rc=0
for name in fp8 moe ep_gpu_tests sm_split; do
    [ "${RC[$name]}" != 0 ] && rc=1
done
echo "gpu_suite: fp8 rc=${RC[fp8]}, moe rc=${RC[moe]}, ep_gpu_tests rc=${RC[ep_gpu_tests]}, sm_split rc=${RC[sm_split]} (0 = passed)" | tee -a "$LOG"
exit "$rc"
