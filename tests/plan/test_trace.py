"""``moekit plan --trace``: per-stream busy time (union of intervals) and per-class time on a trace the
test writes; every bad trace file is one line on stderr and exit 2."""

import json

import pytest

from moekit.plan.cli import main
from moekit.plan.trace import kernel_class, summarize


def _k(name, ts, dur, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


@pytest.fixture()
def trace(tmp_path):
    ev = [_k("sm90_fp8_gemm_1d2d", 0, 1000, 7), _k("flash_fwd_mla_kernel", 500, 1000, 7),  # overlap 500 us
          _k("vectorized_elementwise_kernel", 3000, 500, 7), _k("internode::dispatch", 0, 2000, 27),
          _k("internode::cached_notify", 2000, 1000, 27), {"ph": "X", "cat": "cpu_op", "name": "aten::mm",
                                                            "ts": 0, "dur": 9000}]
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    return p


def test_summary(trace):
    s = summarize(str(trace))
    # Exact: the intervals are integers of microseconds; stream 7 is [0,1500) U [3000,3500) = 2.0 ms.
    assert s.kernels == 5 and s.span_ms == pytest.approx(3.5)
    assert s.stream_busy_ms == {"7": pytest.approx(2.0), "27": pytest.approx(3.0)}
    assert s.class_ms["gemm"] == pytest.approx(1.0) and s.class_ms["attention"] == pytest.approx(1.0)
    assert s.class_ms["comm:dispatch"] == pytest.approx(2.0) and s.class_ms["comm:notify"] == pytest.approx(1.0)
    assert kernel_class("internode::combine<bf16>") == "comm:combine" and kernel_class("zzz") == "other"


def test_cli(trace, capsys):
    assert main(["--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "span 3.5 ms" in out and "compute stream busy" in out and "comm stream busy" in out
    assert main(["--trace", str(trace), "--json", "--micro-batch", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["span_ms"] == pytest.approx(3.5) and d["planner"]["micro_batch"] == 2
    assert d["planner"]["pair_ms"] >= max(d["planner"]["compute_ms"], d["planner"]["comm_ms"])


@pytest.mark.parametrize("text,needle", [(None, "no such file"), ("{nope", "not JSON"),
                                         ('{"x": 1}', "traceEvents"), ('{"traceEvents": []}', "no GPU kernels")])
def test_bad_trace(tmp_path, capsys, text, needle):
    p = tmp_path / "bad.json"
    if text is not None:
        p.write_text(text)
    assert main(["--trace", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
