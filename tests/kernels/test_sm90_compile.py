"""Every FP8 kernel compiles for Hopper (sm_90) on this CPU machine: wgmma on e4m3, no spills, vector/TMA loads.

Runs bench/fp8_sm90_compile.py in a subprocess (compiled Triton, not the interpreter of this process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "sm90.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "fp8_sm90_compile.py"), "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip("this Triton ships no ptxas")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = {row["kernel"]: row for row in json.loads(out.read_text())["rows"]}
    for name, row in rows.items():
        assert row["stack"] == 0 and row["local"] == 0, f"{name} spills: {row}"
        if name.startswith(("fp8_gemm_nt", "grouped_")):
            assert row["wgmma"] > 0 and row["wgmma_e4m3"], f"{name} is off the FP8 tensor cores: {row}"
            assert (row["tma_loads"] > 0) == name.endswith("tma]"), f"{name}: TMA loads {row['tma_loads']}"
        else:
            assert row["cvt_e4m3x2"] > 0 and row["scalar_loads"] == 0 and row["v4_loads"] > 0, row
    assert any(n.startswith("token_quant[ptx") for n in rows) and any(n.startswith("fp8_gemm_nt") for n in rows)
