"""The benchmark harness, and bench/moe_gpu.py's plumbing on the CPU (its device run is in gpu_suite.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import benchtools

ROOT = Path(__file__).resolve().parents[1]


def test_device_tag_and_ratio():
    tag = benchtools.device_tag("extra words")
    assert torch.__version__ in tag and benchtools.today() in tag and tag.endswith("extra words")
    assert benchtools.ratio(3.0, 2.0) == "1.50x" and benchtools.ratio(1.0, 0.0) == "n/a"
    assert benchtools.calc_diff(torch.ones(4), torch.ones(4)) == 0.0
    assert benchtools.calc_diff(torch.ones(4), -torch.ones(4)) == pytest.approx(2.0)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for the device run")
def test_moe_gpu_dry_run(tmp_path):
    env = dict(os.environ, MOEKIT_BENCH_DRYRUN="1", OUT=str(tmp_path), PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "moe_gpu.py")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "moe_gpu.json").read_text())
    assert res["buffer"]["ok"] and res["moe"]["ok"]
    assert res["moe"]["fp8_vs_bf16_diff"] > 0  # the FP8 path really quantized
