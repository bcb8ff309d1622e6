import os

import torch

from moekit import cli, platform


def test_cpu_switches_triton_to_interpreter():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert platform.triton_interpreted()
        assert platform.backend() == "cpu"
        ok, why = platform.ptx_status()
        assert not ok and "cpu" in why


def test_info_fields():
    p = platform.info()
    assert p.backend in ("cuda", "rocm", "cpu")
    assert p.sm_count >= 1
    assert p.torch_version == torch.__version__
    assert "gloo" in p.dist_backends


def test_cli_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "PTX fast paths" in out and "triton" in out


def test_ptx_can_be_disabled(monkeypatch):
    monkeypatch.setenv("MOEKIT_PTX", "0")
    assert platform.ptx_status() == (False, "disabled by MOEKIT_PTX=0")
