"""DeepEP V2's closed-form SM count by hand, moekit's counts beside it, the sampling imbalance, the GPU
presets against their datasheets, and the interleaved 1F1B schedule."""

import math

import pytest

from moekit import MoEConfig
from moekit.plan import ClusterSpec, UniformCosts, bubble_formula, simulate
from moekit.plan.sms import deepep_theoretical_sms, measured_gbps_per_sm, sm_table
from moekit.plan.spread import expected_spread, parse_routing, sampling_imbalance


def test_deepep_sms_by_hand():
    # One NVLink domain of 8, E=16, k=2: t = 8 (1 - C(14,2)/C(16,2)) = 29/15 ranks per token; reads 1/t,
    # writes G/R = 1, NVLink traffic 7/8; 160 GB/s -> max(160/(7/8) * (15/29) / 200, 160/(7/8) / 50) = 3.657
    # SMs, x1.25 = 4.57 -> 5 -> even: 6.
    kw = dict(rdma_gbps=50.0, nvlink_gbps=160.0, device_sms=132)
    assert deepep_theoretical_sms(16, 2, 8, 8, **kw) == 6
    assert deepep_theoretical_sms(16, 2, 8, 8, prefer_overlap=False, **kw) == 64
    # DeepSeek-V3 on EP64 over 8 H800 nodes: RDMA binds; t_R = 7.55, t_N = 5.25; writes 1.22 per token-unit,
    # RDMA 0.61 -> 50/0.61 * 1.22/50 = 2.0 SMs -> x1.25 -> 3 -> at least 4.
    t_r = 64 * (1 - math.comb(252, 8) / math.comb(256, 8))
    t_n = 8 * (1 - math.comb(224, 8) / math.comb(256, 8))
    write = 1 / t_r + t_n / (8 * t_r) + 1
    rdma = t_n * (1 - 1 / 8) / t_r
    assert math.ceil(1.25 * 50 / rdma * write / 50) <= 4
    assert deepep_theoretical_sms(256, 8, 64, 8, **kw) == 4
    with pytest.raises(ValueError, match="divide"):
        deepep_theoretical_sms(256, 8, 48, 8, **kw)


def test_sm_table_side_by_side():
    v3 = MoEConfig.preset("deepseek-v3")
    rows = sm_table(v3, [ClusterSpec.preset("h800x2048"), ClusterSpec.preset("gb200x256")])
    h800, gb200 = rows
    assert h800.ep == 64 and h800.deepep == 4 and h800.moekit_hide_node_limited <= 20
    # Uniform routing sends each token to ~5.3 of 8 nodes instead of <= 4: more SMs to hide it.
    assert h800.moekit_hide_uniform > h800.moekit_hide_node_limited
    assert gb200.moekit_hide_node_limited is None  # EP64 inside one NVLink domain: no node limit applies


def test_sampling_imbalance():
    # mu = 4096 * 8 / 64 = 512 rows per rank; 1 + sqrt(2 ln 64 / 512) = 1.127.
    assert sampling_imbalance(4096, 8, 64) == pytest.approx(1 + math.sqrt(2 * math.log(64) / 512))
    assert sampling_imbalance(4096, 8, 1) == 1.0
    s = expected_spread(parse_routing("uniform"), 256, 8, 64, 8, tokens=4096)
    assert s.imbalance == pytest.approx(1.127, abs=1e-3)
    assert expected_spread(parse_routing("uniform"), 256, 8, 64, 8).imbalance == 1.0


@pytest.mark.parametrize("name, fields", [
    ("h100", dict(bf16_tflops=989.0, fp8_tflops=1979.0, hbm_gb=80.0, hbm_tbps=3.35, sms=132, nvlink_gbps=450.0)),
    ("b200", dict(bf16_tflops=2250.0, fp8_tflops=4500.0, hbm_gb=180.0, hbm_tbps=8.0, sms=148)),
    ("gb200", dict(bf16_tflops=2500.0, fp8_tflops=5000.0, hbm_gb=186.0, gpus_per_node=72)),
    ("gb300", dict(fp8_tflops=5000.0, hbm_gb=288.0, internode_gbps=100.0, sms=160)),
    ("mi300x", dict(bf16_tflops=1307.4, fp8_tflops=2614.9, hbm_gb=192.0, hbm_tbps=5.3, sms=304)),
])
def test_gpu_presets(name, fields):
    c = ClusterSpec.preset(name)
    for k, v in fields.items():
        assert getattr(c, k) == v, k


def test_sized_presets():
    assert ClusterSpec.preset("h800x2048").num_nodes == 256
    g = ClusterSpec.preset("gb200x256")  # 4 NVL72 racks, 64 GPUs of each
    assert (g.num_nodes, g.gpus_per_node) == (4, 64)
    assert ClusterSpec.preset("gb300x144").gpus_per_node == 72
    assert ClusterSpec.preset("b200x4").num_gpus == 4


def test_measured_gbps_per_sm_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert measured_gbps_per_sm(tmp_path / "none.json") is None


@pytest.mark.parametrize("p, n", [(1, 3), (2, 4), (4, 8), (4, 16), (8, 24)])
def test_interleaved_bubble(p, n):
    # Megatron-LM's interleaved 1F1B (2 chunks): the bubble of 1F1B with half-size stages.
    f, b, w = 1.0, 1.5, 0.5
    r = simulate("interleaved", p, n, UniformCosts(f, b, w, f + b + w))
    assert max(r.bubble) == pytest.approx(bubble_formula("interleaved", p, f, b, w, 0.0))
    one = simulate("1f1b", p, n, UniformCosts(2 * f, 2 * b, 2 * w, 0.0))
    assert max(r.bubble) == pytest.approx(max(one.bubble) / 2)
    assert r.step_time == pytest.approx(n * 2 * (f + b + w) + max(r.bubble))
