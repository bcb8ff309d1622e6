"""The cost model's FLOP and byte counts against hand computations."""

import pytest

from moekit import MoEConfig
from moekit.plan import ClusterSpec
from moekit.plan.cost import comm_bytes, layer_params, layer_token_flops, step_flops_per_token, transfer_time
from moekit.plan.spread import Spread


def test_deepseek_v3_activated_parameters():
    # DeepSeek-V3: 37B activated parameters per token (671B total). Our matmul weights a token meets,
    # incl. the output head but not the embedding lookup or the MTP module, must land near 37B.
    cfg = MoEConfig.preset("deepseek-v3")
    act = 0.0
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        dense = i < cfg.first_k_dense_replace
        f = layer_token_flops(cfg, 1, dense)
        act += (f.attn_linear + f.gate + f.mlp + f.routed) / 2
        ne, ex = layer_params(cfg, dense)
        total += ne + ex
    act += cfg.hidden_size * cfg.vocab_size
    total += 2 * cfg.hidden_size * cfg.vocab_size
    assert act == pytest.approx(37e9, rel=0.03)
    assert total == pytest.approx(671e9, rel=0.01)  # 671B main model (the 14B MTP module comes on top)


def test_attention_flops_by_hand():
    cfg = MoEConfig.preset("deepseek-v3")
    f = layer_token_flops(cfg, 4096, dense=False)
    proj = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert f.attn_linear == 2 * proj
    assert f.attn_core == 2 * 128 * (192 + 128) * 4097 / 2
    assert f.routed == 6 * 7168 * 2048 * 8 and f.mlp == 6 * 7168 * 2048 and f.gate == 2 * 7168 * 256
    d = layer_token_flops(cfg, 4096, dense=True)
    assert d.mlp == 6 * 7168 * 18432 and d.routed == 0
    assert step_flops_per_token(cfg, 4096) > 6 * 37e9  # + attention core


def test_comm_bytes_by_hand():
    cfg = MoEConfig.preset("deepseek-v3")
    s = Spread(nodes=3.0, ranks=6.0, remote_nodes=2.5, nvlink_copies=5.0, imbalance=1.5)
    b = comm_bytes(cfg, 100, s, fp8_dispatch=True)
    disp = 7168 + 56 * 4 + 8 * 12
    assert b.dispatch_inter == pytest.approx(100 * 1.5 * 2.5 * disp)
    assert b.dispatch_intra == pytest.approx(100 * 1.5 * 5.0 * disp)
    assert b.combine_inter == pytest.approx(100 * 1.5 * 2.5 * 2 * 7168)
    b16 = comm_bytes(cfg, 100, s, fp8_dispatch=False)
    assert b16.dispatch_intra == pytest.approx(100 * 1.5 * 5.0 * (2 * 7168 + 96))
    assert comm_bytes(cfg, 0, s, True).dispatch_intra == 0


def test_transfer_time():
    c = ClusterSpec(nvlink_gbps=100.0, internode_gbps=10.0, nvlink_efficiency=1.0, internode_efficiency=1.0,
                    comm_gbps_per_sm=5.0)
    t = transfer_time(100e9, 5e9, c, comm_sms=10)
    assert t.link == pytest.approx(1.0) and t.sm_limited == pytest.approx(105 / 50) and t.time == t.sm_limited
    t = transfer_time(100e9, 5e9, c, comm_sms=100)
    assert t.time == t.link == pytest.approx(1.0)
    assert transfer_time(0.0, 0.0, c, 1).time == 0.0


def test_two_stream_by_hand():
    from moekit.plan.cost import Piece, two_stream

    a = [Piece(0, 2.0), Piece(1, 3.0), Piece(0, 1.0), Piece(1, 2.0)]  # forward: attn, dispatch, experts, combine
    b = [Piece(1, 1.0), Piece(0, 4.0), Piece(1, 2.0), Piece(0, 1.0)]  # backward: comm first
    t = two_stream([a, b])
    # Worked out by hand: compute [0,2] [2,6] [6,7] [8,9]; comm [0,1] [2,5] [6,8] [8,10].
    assert t.duration == 10.0 and t.compute == 8.0 and t.comm == 8.0 and t.comm_hidden == 6.0
    assert t.comm_spans == ((0.0, 1.0), (2.0, 5.0), (6.0, 8.0), (8.0, 10.0))
    alone = two_stream([a])
    assert alone.duration == 8.0 and alone.comm_hidden == 0.0


def test_stage_costs_sum_layers():
    from moekit.plan.cost import LayerTimes, StageCosts

    lt = LayerTimes(1.0, 2.0, 1.5, 2.5, 0.5, 1.0, 0.25, 0.75, 0.25, 0.75)
    c = StageCosts([[lt, lt]])
    assert c.op("F", 0, False, None).duration == pytest.approx(2 * (1 + 0.25 + 2 + 0.75))
    assert c.op("B", 0, True, None).duration == pytest.approx(2 * (0.25 + 2.5 + 0.75 + 1.5))
    assert c.op("B", 0, False, None).duration == pytest.approx(2 * (0.25 + 3.5 + 0.75 + 2.0))
    assert c.op("W", 0, False, None).duration == pytest.approx(3.0)
    fb = c.op("FB", 0, False, 0)
    assert fb.compute == pytest.approx(2 * (3 + 5.5)) and fb.comm == pytest.approx(4.0)
    assert fb.duration < c.op("F", 0, False, None).duration + c.op("B", 0, False, None).duration
