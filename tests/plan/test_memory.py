"""Memory terms against hand-computed values for the tiny model, and the in-flight counts of each
schedule against the DualPipe README's table (1F1B: PP micro-batches, DualPipe: PP + 1)."""

import pytest

from moekit import MoEConfig
from moekit.plan import ClusterSpec, ParallelPlan, plan
from moekit.plan.memory import FP8_BYTES, StageMemory, activation_bytes, ep_buffer_bytes, peak_activations
from moekit.schedule import placement

TINY = MoEConfig.preset("tiny")  # H=64, nh=4, dn=16, dr=8, dv=16, kv_lora=32, no q_lora, E=16, k=4, I=32/128


def test_activation_bytes_by_hand():
    # bf16 GEMMs, no recomputation, a MoE layer, per token:
    #   kept bf16: 2 * (2H + kv_lora + dr) = 2 * (128 + 32 + 8) = 336; softmax stats 4 * nh = 16;
    #   attention output 2 * nh * dv = 128; Q, K, V: 2 * (2 * 4 * 24 + 4 * 16) = 512; gate scores 4 * E = 64
    #   cached GEMM inputs (2 bytes each): norms 2H + kv_lora = 160 -> 320; routed rows k*H = 256 -> 512;
    #   SwiGLU in (k+1) * 2I = 320 -> 640, SwiGLU out (k+1) * I = 160 -> 320
    a = activation_bytes(TINY, dense=False, gemm_dtype="bf16", recompute="none")
    assert a.bf16 == 336 + 16 + 128 + 512 + 64 and a.cache == 320 + 512 + 640 + 320 and a.working == 0
    # Selective (DeepSeek-V3 sec. 3.2.3 / 3.3.3): no norm outputs, no Q/K/V, no SwiGLU outputs.
    s = activation_bytes(TINY, dense=False, gemm_dtype="bf16", recompute="selective")
    assert s.bf16 == 336 + 16 + 128 + 64 and s.cache == 512 + 640
    # Full: the layer input only; one layer's full set is live while it is recomputed.
    f = activation_bytes(TINY, dense=False, gemm_dtype="bf16", recompute="full")
    assert (f.bf16, f.cache, f.working) == (128, 0, a.total)
    # Dense layer: MLP of I = 128, one "row"; no routed rows, no gate scores.
    d = activation_bytes(TINY, dense=True, gemm_dtype="bf16", recompute="none")
    assert d.bf16 == 336 + 16 + 128 + 512 and d.cache == 320 + 2 * 256 + 2 * 128
    # FP8: cached inputs at 1 + 4/128 bytes, the attention output in E5M6 (1.5 bytes).
    e = activation_bytes(TINY, dense=False, gemm_dtype="fp8", recompute="none")
    assert e.bf16 == 336 + 16 + 1.5 * 64 + 512 + 64
    assert e.cache == pytest.approx(FP8_BYTES * (160 + 256 + 320 + 160))
    # A routing imbalance scales the routed rows the busiest GPU receives.
    i = activation_bytes(TINY, dense=False, gemm_dtype="bf16", recompute="none", imbalance=1.5)
    assert i.cache - a.cache == pytest.approx(0.5 * 512)
    with pytest.raises(ValueError, match="recompute"):
        activation_bytes(TINY, dense=False, gemm_dtype="bf16", recompute="some")


def test_model_state_and_activations_of_a_one_gpu_plan():
    # Parameters by hand: attention q 64*4*24 + kv 64*40 + 32*4*32 + o 4*16*64 = 16896; dense layer
    # + MLP 3*64*128 + 2 norms of 64 = 41600; MoE layer non-expert: + gate 64*16 + shared 3*64*32 + norms
    # = 24192, experts 16 * 3*64*32 = 98304; 1 dense + 3 MoE layers + embedding + head (64*256 each).
    params = 41600 + 3 * 24192 + 2 * 64 * 256 + 3 * 98304
    cl = ClusterSpec(num_nodes=1, gpus_per_node=1, hbm_gb=80.0)
    r = plan(TINY, cl, ParallelPlan(pp=1, ep=1, seq_len=128, num_microbatches=2, gemm_dtype="bf16"))
    m = r.step.memory
    assert r.step.params_per_gpu == params
    assert (m.weights, m.grads, m.optimizer) == (2 * params, 4 * params, 8 * params)  # DP = 1: no sharding
    # 1F1B on one rank: one micro-batch in flight, all five items of the one stage:
    dense = (992, 1088)
    moe = (1056, 1792)
    head = (2 * 256, 2 * 64)  # bf16 logits, the head's cached input
    per_token = dense[0] + dense[1] + 3 * (moe[0] + moe[1]) + head[0] + head[1]
    assert m.activations == 128 * per_token and m.ep_buffers == 0
    assert m.total == 14 * params + 128 * per_token and m.fits and m.inflight_microbatches == 1


def test_optimizer_sharded_over_data_parallel_replicas():
    cl = ClusterSpec(num_nodes=1, gpus_per_node=8)
    one = plan(TINY, ClusterSpec(num_nodes=1, gpus_per_node=1), ParallelPlan(pp=1, ep=1, seq_len=128,
                                                                           num_microbatches=2))
    r = plan(TINY, cl, ParallelPlan(pp=1, ep=4, dp=8, seq_len=128, num_microbatches=2, routing="uniform"))
    experts = 3 * 98304
    dense = one.step.params_per_gpu - experts
    assert r.step.params_per_gpu == dense + experts / 4
    # ZeRO-1: non-expert state over DP = 8, expert state over DP/EP = 2.
    assert r.step.memory.optimizer == pytest.approx(8 * (dense / 8 + experts / 4 / 2))
    assert r.step.memory.ep_buffers > 0


def test_ep_buffers_by_hand():
    # Dispatch row bf16 2H + top-k ids/weights k*12, combine row 2H; 100 tokens to 3 ranks; two in flight.
    assert ep_buffer_bytes(TINY, 100, 3.0, fp8_dispatch=False, overlapped=True) == 2 * 100 * 3 * (128 + 48 + 128)
    assert ep_buffer_bytes(TINY, 100, 3.0, fp8_dispatch=True, overlapped=False) == pytest.approx(
        100 * 3 * (64 * FP8_BYTES + 48 + 128))


@pytest.mark.parametrize("schedule, pp, n, want", [
    ("1f1b", 4, 8, [4, 3, 2, 1]),  # rank r holds min(P - r, N) micro-batches
    ("1f1b", 4, 2, [2, 2, 2, 1]),
    ("dualpipe", 4, 16, [5] * 4),  # PP + 1 (DualPipe README)
    ("dualpipe", 8, 32, [9] * 8),
    ("dualpipev", 4, 8, [9] * 4),  # 2P + 1 chunks of half a DualPipe stage
    ("interleaved", 4, 8, [11, 9, 7, 5]),  # chunks of half a 1F1B stage; warm-up 2(P-1-r) + (V-1)P
])
def test_inflight_microbatches(schedule, pp, n, want):
    stages = [StageMemory(0.25, 0.75, 0.0)] * placement(schedule, pp).num_stages
    got = peak_activations(schedule, pp, n, stages)
    assert [p.total for p in got] == pytest.approx(want)
    assert [p.cache for p in got] == pytest.approx([0.75 * w for w in want])


def test_recomputation_trades_memory_for_time():
    base = dict(pp=2, ep=8, schedule="dualpipe", seq_len=4096, num_microbatches=8, routing="uniform", mtp_depth=0)
    cfg = MoEConfig.preset("deepseek-v3", num_hidden_layers=8, first_k_dense_replace=1)
    r = {rc: plan(cfg, "h100x64", ParallelPlan(recompute=rc, **base)) for rc in ("none", "selective", "full")}
    assert r["none"].step.memory.activations > r["selective"].step.memory.activations > \
        r["full"].step.memory.activations
    assert r["none"].step.step_time < r["selective"].step.step_time < r["full"].step.step_time
