"""The example script of docs/compat.md runs as written (a DeepEP user's script with the import changed)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "compat.md"


def test_compat_doc_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    script = next(b for b in blocks if "__main__" in b)
    path = tmp_path / "deepep_user_script.py"
    path.write_text(script)
    src = str(pathlib.Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LOCAL_WORLD_SIZE", None)  # the node layout comes from the hardware
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")
