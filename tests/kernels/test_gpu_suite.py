"""bench/gpu_suite.sh without a GPU: it must say so and exit 3; its Python part must run end to end (dry run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_suite_exits_3_without_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no CUDA/ROCm GPU" in r.stdout and "nothing measured" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for the device run")
def test_gpu_suite_dry_run_plumbing(tmp_path):
    # Every section at tiny sizes through the interpreter: catches a broken bench before a device session.
    env = dict(os.environ, MOEKIT_BENCH_DRYRUN="1", OUT=str(tmp_path), PYTHONPATH=str(ROOT / "src"))
    # ~11 s alone on 2 cores; the bound leaves room for a loaded machine (it once ran past 300 s beside 6 jobs).
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "fp8_gpu.py")], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAILED" not in r.stdout and "all checks passed" in r.stdout
    assert (tmp_path / "fp8_gpu.json").exists()
