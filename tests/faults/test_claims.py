"""Claims that had no test behind them (a deliberate bug in each survived the suite), and mixed precision.

- combine accumulates in fp32 (values where a bf16 accumulation is visibly wrong), with non-identity
  experts against a float64 reference;
- exact ``Buffer.stats`` bytes of dispatch *and* combine, self / intra-node / inter-node, flat and two-stage;
- the gate's logits are fp32 from bf16 input and under ``torch.autocast`` (same routing as fp32);
- ``MoE(..., compute_dtype=torch.bfloat16)``: fp32 master weights, bf16 expert GEMMs, routing unchanged,
  forward and backward against float64;
- the overlapping pipeline stage runs the backward of ``module1`` (its records, its gradients);
- FP8 dispatch with a NaN: only its 1x128 tile is poisoned; ``num_experts`` as a numpy int.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ep.reference import Case, dispatch_rows, make_inputs, ref_combine, ref_dispatch
from moekit import MoEConfig
from moekit.dist import NodeLayout
from moekit.ep import Buffer, Traffic
from moekit.ep.fp8 import dequantize_1x128
from moekit.moe import MoE
from moekit.pipeline.moe_overlap import MoEBlock, MoEStage
from moekit.routing.gate import Gate
from moekit.testing import spawn

WORLD = 4


# ---- combine: fp32 accumulation, non-identity experts ----------------------------------------------
def _combine_rank(rank, world):
    buf = Buffer(hierarchical=False)
    e = world  # one expert per rank; every token goes to every rank
    idx = torch.arange(e).repeat(3, 1)  # [3, 4]
    x = torch.ones(3, 8, dtype=torch.bfloat16)
    d = buf.dispatch(x, idx, None, e)
    # Rank 0's expert returns 256, the others 1: 256 + 1 + 1 + 1 = 259 -> bf16 260 when summed in fp32;
    # a bf16 running sum (256 + 1 rounds back to 256) would give 256.
    z = torch.full_like(d.recv_x, 256.0 if rank == 0 else 1.0)
    y, _ = buf.combine(z, d.handle)
    assert y.dtype == torch.bfloat16
    bf16_ok = bool((y == 260).all())
    # Non-identity experts on random inputs: fp32 within fp32 rounding, bf16 within one bf16 rounding.
    out = {"bf16_sum_260": bf16_ok}
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -7)):
        case = Case([5, 0, 7, 3], 24, 3, 2 * world, "masked", dtype=dtype, seed=21)
        xs, idxs, ws = make_inputs(case, world)
        d = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
        y, _ = buf.combine((d.recv_x.float().sin() * (1 + rank)).to(dtype), d.handle)
        zs, rows = [], []
        for dest in range(world):
            rx, _, _, _, rr = ref_dispatch([t.double() for t in xs], idxs, ws, case.num_experts, world, dest)
            zs.append((rx.sin() * (1 + dest)).to(dtype).double())  # what each expert returned, exactly
            rows.append(rr)
        want = ref_combine(zs, rows, case.tokens, case.hidden)[rank]
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    return out


def test_combine_accumulates_in_fp32_with_real_experts():
    assert all(r["bf16_sum_260"] for r in spawn(_combine_rank, WORLD))


# ---- exact bytes of Buffer.stats ----------------------------------------------------------------------
def _row_bytes(nbytes: int) -> int:
    return max(40, (nbytes + 7) // 8 * 8)


def _split(bytes_to: dict[int, int], me: int, lay: NodeLayout, node_level: bool) -> Traffic:
    """Bytes per peer (a rank; with ``node_level`` a node, ``me`` then this rank's node) into a Traffic."""
    t = Traffic()
    for peer, b in bytes_to.items():
        if peer == me:
            t.self_bytes += b
        elif node_level or lay.node_of(peer) != lay.node_of(me):
            t.inter_node_bytes += b
        else:
            t.intra_node_bytes += b
    return t


def _ref_traffic(idxs, e, world, lay: NodeLayout, me: int, two_stage: bool, rb_d: int, rb_c: int):
    """(dispatch, combine) Traffic of rank ``me`` from the documented plans, counted by hand."""
    epr, g = e // world, lay.ranks_per_node
    rows = [dispatch_rows(idxs, e, world, d) for d in range(world)]  # [(source, token)] per destination
    def dests(s, t):
        return {int(v) // epr for v in idxs[s][t] if int(v) >= 0}
    if not two_stage:
        disp = {d: sum(1 for s, _ in rows[d] if s == me) * rb_d for d in range(world)}
        comb = {s: sum(1 for src, _ in rows[me] if src == s) * rb_c for s in range(world)}
        return _split(disp, me, lay, False), _split(comb, me, lay, False)
    my_node, my_local = lay.node_of(me), lay.local_of(me)
    t_me = idxs[me].shape[0]
    # Stage 1: one row per (token, destination node) to the forwarder; stage 2: the forwarder re-sends
    # the rows of its local-index peers to the ranks of its node holding one of their experts.
    s1 = {n: sum(1 for t in range(t_me) if any(lay.node_of(d) == n for d in dests(me, t))) * rb_d
          for n in range(lay.num_nodes)}
    srcs = [lay.rank_of(n, my_local) for n in range(lay.num_nodes)]
    s2 = {lay.rank_of(my_node, l): sum(1 for s in srcs for t in range(idxs[s].shape[0])
                                       if lay.rank_of(my_node, l) in dests(s, t)) * rb_d for l in range(g)}
    disp = _split(s1, my_node, lay, True)
    disp.add(_split(s2, me, lay, False))
    # Combine: rows back to their forwarder (stage A, intra-node), then one partial sum per (token, node)
    # back to the source (stage B, inter-node).
    a = {lay.rank_of(my_node, l): sum(1 for s, _ in rows[me] if lay.local_of(s) == l) * rb_c for l in range(g)}
    b = {n: sum(1 for t in range(idxs[lay.rank_of(n, my_local)].shape[0])
                if any(lay.node_of(d) == my_node for d in dests(lay.rank_of(n, my_local), t))) * rb_c
         for n in range(lay.num_nodes)}
    comb = _split(a, me, lay, False)
    comb.add(_split(b, my_node, lay, True))
    return disp, comb


def _bytes_rank(rank, world, two_stage):
    buf = Buffer(ranks_per_node=2, hierarchical=two_stage)
    case = Case([9, 4, 0, 6], 20, 3, 2 * world, "masked", seed=33)
    xs, idxs, ws = make_inputs(case, world)
    d = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    got_d = buf.stats.last
    buf.combine(d.recv_x.bfloat16(), d.handle)  # converted to the handle's fp32 on the wire
    got_c = buf.stats.last
    rb_d = _row_bytes(20 * 4 + 4 * 3 + 4 * 3)  # fp32 x, int32 ids, fp32 weights
    rb_c = _row_bytes(20 * 4 + 4 * 3)  # fp32 x, and the K fp32 weights a handle with weights always carries
    want_d, want_c = _ref_traffic(idxs, case.num_experts, world, buf.node_layout, rank, two_stage, rb_d, rb_c)
    assert got_d == want_d, (rank, got_d, want_d)
    assert got_c == want_c, (rank, got_c, want_c)
    return got_c.intra_node_bytes, got_c.inter_node_bytes


@pytest.mark.parametrize("two_stage", [False, True])
def test_exact_dispatch_and_combine_bytes(two_stage):
    res = spawn(_bytes_rank, WORLD, two_stage, ranks_per_node=2)
    assert sum(i for i, _ in res) > 0 and sum(o for _, o in res) > 0  # both hop kinds were exercised


# ---- the gate stays fp32 ------------------------------------------------------------------------
def _gate_cfg():
    return MoEConfig(hidden_size=64, n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=4)


def test_gate_logits_are_fp32_from_bf16_input():
    gate = Gate(_gate_cfg())
    x = torch.randn(256, 64).bfloat16()
    out = gate(x)
    want = torch.sigmoid(x.double() @ gate.weight.detach().double().T)  # bf16 x is exact in float64
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores.double(), want, rtol=1e-6, atol=1e-6)  # bf16 logits: ~1e-3 off
    gate16 = copy.deepcopy(gate).bfloat16()  # bf16 weights: still an fp32 product of them
    want16 = torch.sigmoid(x.double() @ gate16.weight.detach().double().T)
    torch.testing.assert_close(gate16(x).scores.double(), want16, rtol=1e-6, atol=1e-6)


def test_gate_under_autocast_routes_as_fp32():
    gate = Gate(_gate_cfg())
    with torch.no_grad():
        gate.e_score_correction_bias.normal_(0, 0.01)
    x = torch.randn(1024, 64)
    ref = gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gate(x)
    assert got.scores.dtype == got.topk_weights.dtype == torch.float32
    assert torch.equal(got.topk_idx, ref.topk_idx)
    assert torch.equal(got.scores, ref.scores) and torch.equal(got.topk_weights, ref.topk_weights)


def _tiny(**kw):
    return MoEConfig.preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, **kw)


def _capture_gate(moe):
    seen = []
    moe.gate.register_forward_hook(lambda m, i, o: seen.append(o))
    if moe.shared_experts is not None:
        moe.shared_experts.register_forward_hook(lambda m, i, o: seen.append(o))
    return seen


def test_moe_under_autocast_gate_fp32_shared_experts_follow_autocast():
    torch.manual_seed(1)
    moe = MoE(_tiny())
    x = torch.randn(512, 64)
    seen = _capture_gate(moe)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe(x)
    (g_ref, sh_ref), (g_got, sh_got) = seen[:2], seen[2:]
    assert torch.equal(g_got.topk_idx, g_ref.topk_idx)  # routing unchanged
    # Shared experts are a dense MLP like the model's others: under autocast their GEMMs are bf16.
    assert sh_ref.dtype == torch.float32 and sh_got.dtype == torch.bfloat16
    assert got.dtype == torch.float32
    err = (got - ref).norm() / ref.norm()
    assert 1e-4 < err < 3e-2, err


# ---- compute_dtype: fp32 master weights, bf16 GEMMs ----------------------------------------------
def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_compute_dtype_bf16_forward_and_backward_against_float64():
    torch.manual_seed(2)
    moe = MoE(_tiny(), compute_dtype=torch.bfloat16)
    assert moe.experts.gate_proj.dtype == torch.float32 and moe.config.compute_dtype == torch.bfloat16
    x = torch.randn(40, 64)
    coef = torch.randn(40, 64)
    seen = _capture_gate(moe)
    y = moe(x)
    (y * coef).sum().backward()
    gate_out = seen[0]
    ref_gate = Gate(moe.config)
    ref_gate.load_state_dict(moe.gate.state_dict())
    assert torch.equal(gate_out.topk_idx, ref_gate(x).topk_idx)  # routing is the fp32 gate's
    # float64 reference, with the routing fixed (the gate's gradient flows through topk_weights).
    params = {n: p.detach().double().requires_grad_(True) for n, p in moe.named_parameters()}
    idx = gate_out.topk_idx
    logits = x.double() @ params["gate.weight"].T
    s = logits.sigmoid().gather(1, idx)
    w = s / s.sum(-1, keepdim=True) * moe.config.routed_scaling_factor
    y64 = _ref_moe64_params(x, params, idx, w)
    (y64 * coef.double()).sum().backward()
    assert y.dtype == torch.float32
    err = _rel(y, y64)
    assert 1e-4 < err < 2e-2, err  # bf16 GEMMs: not fp32-exact, within bf16 rounding
    for n, p in moe.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        e = _rel(p.grad, params[n].grad)
        assert e < 5e-2, (n, e)


def _ref_moe64_params(x, p, idx, w):
    def mlp(v, pre, e=None):
        g, u, d = (p[f"{pre}.{k}"] if e is None else p[f"{pre}.{k}"][e] for k in
                   (("gate_proj.weight", "up_proj.weight", "down_proj.weight") if e is None
                    else ("gate_proj", "up_proj", "down_proj")))
        return (F.silu(v @ g.T) * (v @ u.T)) @ d.T
    out = []
    for t in range(x.shape[0]):
        v = x[t:t + 1].double()
        acc = mlp(v, "shared_experts")
        for k, e in enumerate(idx[t].tolist()):
            acc = acc + w[t, k] * mlp(v, "experts", e)
        out.append(acc)
    return torch.cat(out)


def test_compute_dtype_validation():
    assert MoEConfig.preset("tiny", compute_dtype="bf16").compute_dtype == torch.bfloat16
    assert MoEConfig.preset("tiny", compute_dtype="torch.float16").compute_dtype == torch.float16
    with pytest.raises(ValueError, match="compute_dtype"):
        MoEConfig.preset("tiny", compute_dtype=torch.int8)


# ---- the overlap stage runs module1's backward --------------------------------------------------
def test_overlap_stage_backward_is_module1s():
    torch.manual_seed(3)
    cfg = _tiny()
    s0 = MoEStage([MoEBlock(MoE(cfg))], record=True, rank=0, chunk=0)
    s1 = MoEStage([MoEBlock(MoE(cfg))], record=True, rank=0, chunk=1)
    x1 = torch.randn(6, 64)
    loss1 = s1(x1).square().sum()
    s1.clear_records()
    outs, _ = MoEStage.overlapped_forward_backward(s0, [torch.randn(6, 64)], None, [], s1, loss1, [], [])
    phases0 = {r.phase for r in s0.overlap_records}
    phases1 = {r.phase for r in s1.overlap_records}
    assert "F" in phases0 and "B" not in phases0, phases0
    assert "B" in phases1 and "F" not in phases1, phases1
    assert all(p.grad is not None for p in s1.parameters() if p.requires_grad)
    assert all(p.grad is None for p in s0.parameters())
    assert outs[0].shape == (6, 64)


# ---- smaller ones -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_fp8_nonfinite_poisons_only_its_tile(bad_value):
    buf = Buffer()  # one rank, no communication: the FP8 round trip of dispatch
    x = torch.randn(3, 256)
    idx = torch.zeros(3, 1, dtype=torch.int64)
    clean = buf.dispatch(x, idx, None, 2, fp8=True).recv_x
    bad = x.clone()
    bad[1, 130] = bad_value
    got = buf.dispatch(bad, idx, None, 2, fp8=True).recv_x
    a, b = dequantize_1x128(*clean), dequantize_1x128(*got)
    tile = b[1, 128:256]
    # The tile's scale comes from its amax: NaN -> the other 127 values arrive as 0, inf -> all 128 as NaN.
    assert bool(tile[2].isnan())
    assert bool(((tile == 0) | tile.isnan()).all()) if bad_value != bad_value else bool(tile.isnan().all())
    keep = torch.ones_like(b, dtype=torch.bool)
    keep[1, 128:256] = False
    assert torch.equal(a[keep], b[keep])  # every other tile and token intact


def test_num_experts_as_numpy_int():
    buf = Buffer()
    x, idx = torch.randn(4, 8), torch.tensor([[0, 1], [2, -1], [3, 0], [1, 1]])
    want = buf.dispatch(x, idx, None, 4)
    got = buf.dispatch(x, idx, None, np.int64(4))
    assert torch.equal(got.recv_x, want.recv_x) and got.handle.num_experts == 4
    assert isinstance(got.handle.num_experts, int)
    with pytest.raises(ValueError, match=r"num_experts \(-4\) must be a positive multiple"):
        buf.dispatch(x, idx, None, np.int32(-4))
    with pytest.raises(TypeError, match="num_experts must be an int"):
        buf.dispatch(x, idx, None, 4.0)
