"""NaiveBuffer (one row per (token, expert) pair): the baseline of the benchmarks."""

from __future__ import annotations

import torch

from moekit.ep.naive import NaiveBuffer
from moekit.testing import spawn

from .reference import Case, make_inputs


def _naive_rank(rank, world):
    case = Case([9 + r for r in range(world)], 16, 3, 2 * world, "masked", seed=5)
    xs, idxs, ws = make_inputs(case, world)
    buf = NaiveBuffer(ranks_per_node=1)
    out = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    sent = buf.stats.last.total_bytes
    epr = case.num_experts // world
    # Reference: pairs (source, token, k) with an expert on this rank, in that order.
    rows = [(s, t, k) for s in range(world) for t in range(case.tokens[s]) for k in range(case.topk)
            if int(idxs[s][t, k]) >= 0 and int(idxs[s][t, k]) // epr == rank]
    assert out.recv_x.shape[0] == len(rows)
    for i, (s, t, k) in enumerate(rows):
        assert torch.equal(out.recv_x[i], xs[s][t])
        assert int(out.recv_topk_idx[i, 0]) == int(idxs[s][t, k]) - rank * epr
        assert float(out.recv_topk_weights[i, 0]) == float(ws[s][t, k])
    y, _ = buf.combine(out.recv_x * out.recv_topk_weights, out.handle)
    want = torch.zeros_like(xs[rank])
    for t in range(case.tokens[rank]):
        for k in range(case.topk):
            if int(idxs[rank][t, k]) >= 0:
                want[t] += xs[rank][t] * ws[rank][t, k]
    torch.testing.assert_close(y, want)
    # One row of H * 4 + 8 bytes per valid (token, expert) pair.
    assert sent == int((idxs[rank] >= 0).sum()) * (case.hidden * 4 + 8)


def test_naive_dispatcher():
    spawn(_naive_rank, 4)


def _naive_grad_rank(rank, world):
    """The layer trained through NaiveBuffer (the Buffer's autograd pair) against the same layer on the Buffer."""
    from moekit import MoEConfig
    from moekit.moe import MoE

    cfg = MoEConfig.preset("tiny", seq_aux_loss_alpha=0.0)
    x = torch.randn(5 + 3 * rank, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    gy = torch.randn_like(x)
    res = []
    for buffer in (NaiveBuffer(), None):
        torch.manual_seed(0)
        moe = MoE(cfg, buffer=buffer)
        xi = x.clone().requires_grad_()
        y = moe(xi)
        y.backward(gy)
        res.append([y.detach(), xi.grad, moe.gate.weight.grad, moe.experts.gate_proj.grad])
    # combine(topk_weights=): each row's weight back in its (token, k) slot
    buf = NaiveBuffer()
    idx = torch.randint(-1, cfg.n_routed_experts, (4, 3))
    w = torch.rand(4, 3)
    d = buf.dispatch(torch.randn(4, cfg.hidden_size), idx, w, cfg.n_routed_experts)
    back = buf.combine(d.recv_x, d.handle, topk_weights=d.recv_topk_weights).combined_topk_weights
    return res, torch.equal(back, torch.where(idx >= 0, w, 0.0))


def test_naive_dispatcher_trains_like_the_buffer():
    for (naive, ref), weights_back in spawn(_naive_grad_rank, 2):
        for a, b in zip(naive, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert weights_back
