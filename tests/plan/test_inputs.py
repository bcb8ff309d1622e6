"""Every malformed planner input is one line on stderr naming the field, exit status 2, no traceback;
and ``python -m moekit`` is the ``moekit`` command."""

import json
import subprocess
import sys

import pytest
import torch

from moekit import MoEConfig
from moekit.plan import load_cluster
from moekit.plan.cli import main
from moekit.plan.spread import load_histogram

SINGLE = ["--pp", "2", "--ep", "8", "--schedule", "1f1b", "--cluster", "h100x64"]


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moekit plan") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture()
def files(tmp_path):
    f = {}
    for name, text in {"bad.yaml": "nvlink_gbps: [1,\n", "bad.json": '{"nvlink_gbps": ', "list.yaml": "- 1\n",
                       "nan.yaml": "preset: h100x64\np2p_latency_us: .nan\n",
                       "inf.yaml": "preset: h100x64\ninternode_gbps: .inf\n",
                       "neg.json": json.dumps({"preset": "h100x64", "hbm_gb": -80}),
                       "str.yaml": "preset: h100x64\nsms: lots\n",
                       "tiny.yaml": "preset: h100x64\np2p_latency_us: 1e-9\n", "binary.json": ""}.items():
        p = tmp_path / name
        if name == "binary.json":
            p.write_bytes(b"\xff\xfe\x00garbage")
        else:
            p.write_text(text)
        f[name] = str(p)
    torch.save({"loads": torch.ones(256)}, tmp_path / "dict.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file")
    (tmp_path / "model.json").write_text(json.dumps({**MoEConfig.preset("tiny").to_dict(), "hidden_size": "big"}))
    f.update(dir=str(tmp_path), dict_pt=str(tmp_path / "dict.pt"), junk_pt=str(tmp_path / "junk.pt"),
             model=str(tmp_path / "model.json"))
    return f


@pytest.mark.parametrize("flag, key, needles", [
    ("--cluster", "bad.yaml", ["not valid YAML at line 2"]),
    ("--cluster", "bad.json", ["not valid JSON at line 1"]),
    ("--cluster", "binary.json", ["not a text"]),
    ("--cluster", "list.yaml", ["must hold a mapping"]),
    ("--cluster", "dir", ["is a directory"]),
    ("--model", "dir", ["model", "is a directory"]),
    ("--plan", "dir", ["plan", "is a directory"]),
    ("--plan", "bad.yaml", ["plan", "not valid YAML"]),
    ("--cluster", "nan.yaml", ["p2p_latency_us", "nan"]),
    ("--cluster", "inf.yaml", ["internode_gbps", "inf"]),
    ("--cluster", "neg.json", ["hbm_gb", "-80"]),
    ("--cluster", "str.yaml", ["sms", "lots"]),
    ("--model", "model", ["hidden_size", "big"]),
    ("--routing", "dict_pt", ["routing histogram", "not a tensor"]),
    ("--routing", "junk_pt", ["routing histogram", "not a readable .pt"]),
    ("--routing", "bad.json", ["routing histogram", "JSON"]),
])
def test_malformed_files(capsys, files, flag, key, needles):
    value = files[key] if flag != "--routing" else f"histogram:{files[key]}"
    args = [a for a in SINGLE if flag != "--cluster" or a != "h100x64"]
    if flag == "--cluster":
        args.remove("--cluster")
    _fails(capsys, args + [flag, value], *needles)


@pytest.mark.parametrize("argv, needles", [
    (["--pp", "0"], ["ParallelPlan.pp", "0"]),
    (["--seq-len", "-1"], ["ParallelPlan.seq_len"]),
    (["--micro-batch", "0"], ["ParallelPlan.micro_batch"]),
    (["--num-microbatches", "1e8"], ["num_microbatches", "100000000", "to simulate"]),
    (["--num-microbatches", "1.5"], ["--num-microbatches must be an integer"]),
    (["--num-microbatches", "nan"], ["--num-microbatches must be an integer"]),
    (["--global-batch", "1e9"], ["simulated ops", "refusing"]),
    (["--set", "nvlink_gbps=nan"], ["nvlink_gbps", "nan"]),
    (["--set", "internode_gbps=.inf"], ["internode_gbps", "inf"]),
    (["--set", "p2p_latency_us=-1"], ["p2p_latency_us"]),
    (["--set", "hbm_gb=0"], ["hbm_gb"]),
    (["--set", "bogus=1"], ["bogus"]),
    (["--set", "sms"], ["FIELD=VALUE"]),
    (["--set", "sms=4096"], ["ClusterSpec.sms", "1,024"]),
    (["--comm-sms", "500"], ["comm_sms"]),
    (["--dp", "256", "--pp", "16"], ["GPUs asked"]),
    (["--ep", "7"], ["ep (7) must divide the number of routed experts (256)"]),
    (["--routing", "node-limited:x"], ["node-limited:M"]),
    (["--schedule", "zigzag"], ["--schedule", "invalid choice"]),
])
def test_malformed_values(capsys, argv, needles):
    _fails(capsys, SINGLE + argv, *needles)


@pytest.mark.parametrize("argv, needles", [
    (["--cluster", "h900x1"], ["neither a preset"]),
    (["--cluster", "h800x12"], ["not a whole number of 8-GPU nodes"]),
    (["--cluster", "h800x0"], ["GPU count"]),
    (["--ep", "7"], ["--ep (7) must divide the model's 256 routed experts"]),
    (["--pp", "3"], ["--pp (3) must divide"]),
    (["--top", "0"], ["--top"]),
    (["--num-microbatches", "8"], ["--num-microbatches fixes one layout"]),
    (["--cluster", "h100x64"], ["none of the", "fits in 80 GB"]),  # 671B parameters on 64 GPUs
])
def test_search_inputs(capsys, argv, needles):
    _fails(capsys, argv, *needles)


def test_yaml_1e9_is_a_number(files):
    # PyYAML alone reads "1e-9" as a string; the planner reads YAML numbers as YAML 1.2 does.
    c = load_cluster(files["tiny.yaml"])
    assert c.p2p_latency_us == 1e-9 and isinstance(c.p2p_latency_us, float)


def test_histogram_files(tmp_path):
    p = tmp_path / "ok.pt"
    torch.save(torch.arange(1.0, 17.0), p)
    assert load_histogram(p).shape == (16,)
    (tmp_path / "neg.json").write_text(json.dumps([1.0, -1.0]))
    with pytest.raises(ValueError, match="finite, >= 0"):
        load_histogram(tmp_path / "neg.json")
    with pytest.raises(ValueError, match="does not exist|no such file"):
        load_histogram(tmp_path / "missing.json")


def test_sm_split_hook(tmp_path, capsys):
    good = tmp_path / "sm.json"
    good.write_text(json.dumps({"gbps_per_sm": 21.0, "device": "a test GPU"}))
    tiny = ["--model", "tiny", "--cluster", "h200x8", "--pp", "1", "--ep", "8", "--schedule", "1f1b",
            "--seq-len", "128", "--json"]
    assert main(tiny + ["--sm-split", str(good)]) == 0
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    assert d["cluster"]["comm_gbps_per_sm"] == 21.0 and "measured" in d["notes"][0] and "a test GPU" in cap.err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gbps_per_sm": "fast"}))
    _fails(capsys, tiny + ["--sm-split", str(bad)], "gbps_per_sm")
    _fails(capsys, tiny + ["--sm-split", str(good), "--set", "comm_gbps_per_sm=3"], "give one")


def test_python_dash_m_moekit():
    # `python -m moekit plan ...` is `moekit plan ...`: same exit status, one line, no traceback.
    import os
    from pathlib import Path

    import moekit

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(moekit.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "moekit", "plan", "--pp", "0", "--ep", "1", "--schedule", "1f1b"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ParallelPlan.pp" in r.stderr
    assert "Traceback" not in r.stderr
