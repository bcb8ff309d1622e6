"""transport="symmetric": moekit's push kernels over a shared-memory heap between gloo processes.

Every result is compared bitwise with the collective transport on the same inputs in the same rank,
and with the single-process reference (through the shared checks).
"""

from __future__ import annotations

import pytest
import torch

from moekit.ep import Buffer
from moekit.testing import spawn

from .checks import check_async_overlap, check_dispatch_combine, check_fp8, check_grads, check_handle_reuse
from .reference import Case, make_inputs

HEAP = 1 << 20


def _same_as_collective(sym: Buffer, col: Buffer, case: Case, rank: int, world: int, fp8: bool = False) -> None:
    xs, idxs, ws = make_inputs(case, world)
    a = sym.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts, fp8=fp8)
    b = col.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts, fp8=fp8)
    if fp8:
        assert torch.equal(a.recv_x[0].view(torch.uint8), b.recv_x[0].view(torch.uint8))
        assert torch.equal(a.recv_x[1], b.recv_x[1])
        y_in = [o.recv_x[0].float().to(torch.bfloat16) for o in (a, b)]
    else:
        assert a.recv_x.dtype == b.recv_x.dtype and torch.equal(a.recv_x, b.recv_x)
        y_in = [o.recv_x * 3 - 1 for o in (a, b)]
    assert torch.equal(a.recv_topk_idx, b.recv_topk_idx) and torch.equal(a.recv_topk_weights, b.recv_topk_weights)
    assert a.num_recv_tokens_per_expert_list == b.num_recv_tokens_per_expert_list
    assert sym.stats.last == col.stats.last
    ya = sym.combine(y_in[0], a.handle).combined_x
    yb = col.combine(y_in[1], b.handle).combined_x
    assert ya.dtype == yb.dtype and torch.equal(ya, yb)
    assert sym.stats.last == col.stats.last
    # Cached handle: a second dispatch of other data.
    a2 = sym.dispatch(xs[rank] * 2, None, None, None, handle=a.handle, fp8=fp8)
    b2 = col.dispatch(xs[rank] * 2, None, None, None, handle=b.handle, fp8=fp8)
    assert torch.equal(a2.recv_x if not fp8 else a2.recv_x[1], b2.recv_x if not fp8 else b2.recv_x[1])


def _flat_rank(rank, world, full):
    sym = Buffer(hierarchical=False, transport="symmetric", heap_bytes=HEAP, num_sms=3)
    col = Buffer(hierarchical=False, transport="collective")
    assert sym.transport == "symmetric" and col.transport == "collective"
    e = 4 * world
    cases = [Case([13] * world, 128, 4, e, "masked", dtype=torch.bfloat16, seed=1),
             Case([0] + [9] * (world - 1), 128, 2, e, "random", seed=3),  # rank 0 sends nothing
             Case([11] * world, 128, 3, e, "to_rank0", seed=4)]  # all-to-one
    if full:
        cases += [Case([17] * world, 128, 6, 2 * world, "skew", seed=6),
                  Case([6] * world, 128, 2, e, "empty", seed=7),
                  Case([10] * world, 128, 2, e, "one_expert", seed=5)]
    for case in cases:
        _same_as_collective(sym, col, case, rank, world)
    if not full:
        return
    _same_as_collective(sym, col, Case([10] * world, 256, 3, 2 * world, "masked", seed=12), rank, world, fp8=True)
    check_dispatch_combine(sym, cases[0], rank, world)
    check_grads(sym, Case([7 + r for r in range(world)], 16, 3, 2 * world, "masked", seed=11), rank, world)
    check_handle_reuse(sym, cases[0], rank, world)
    check_async_overlap(sym, Case([9] * world, 128, 3, 2 * world, "random", seed=13), rank, world)
    check_fp8(sym, Case([10] * world, 256, 3, 2 * world, "masked", seed=12), rank, world)


@pytest.mark.parametrize("world,full", [(2, True), (4, True), (8, False)])
def test_flat_same_as_collective(world, full):
    spawn(_flat_rank, world, full, timeout=240)


def _ll_same(sym: Buffer, col: Buffer, case: Case, rank: int, world: int, cap: int, use_fp8: bool, hook: bool):
    xs, idxs, ws = make_inputs(case, world)
    outs = []
    for buf in (sym, col):
        out = buf.low_latency_dispatch(xs[rank], idxs[rank], cap, case.num_experts, use_fp8=use_fp8,
                                       return_recv_hook=hook)
        if hook:
            out.hook()
        outs.append(out)
    a, b = outs
    if use_fp8:
        assert torch.equal(a.recv_x[0].view(torch.uint8), b.recv_x[0].view(torch.uint8))
        assert torch.equal(a.recv_x[1], b.recv_x[1])
        y = [o.recv_x[0].float() for o in outs]
    else:
        assert torch.equal(a.recv_x, b.recv_x)
        y = [o.recv_x * 2 + 1 for o in outs]
    assert torch.equal(a.recv_count, b.recv_count)
    got = []
    for buf, out, yy in zip((sym, col), outs, y):
        comb = buf.low_latency_combine(yy, idxs[rank], ws[rank], out.handle, return_recv_hook=hook)
        if hook:
            comb.hook()
        got.append(comb.combined_x)
    assert torch.equal(got[0], got[1])
    assert sym.stats.last == col.stats.last


def _ll_rank(rank, world):
    sym = Buffer(hierarchical=False, transport="symmetric", heap_bytes=HEAP, num_sms=2)
    col = Buffer(hierarchical=False, transport="collective")
    cap = 8
    for seed, (mode, fp8, hook) in enumerate([("masked", False, False), ("random", True, True),
                                              ("skew", False, True), ("empty", False, False)]):
        case = Case([min(cap, 3 + 2 * r) for r in range(world)], 128, 3, 2 * world, mode, seed=20 + seed)
        _ll_same(sym, col, case, rank, world, cap, fp8, hook)
    # Device-backend protocol (status words in the block header), on the heap too.
    sym._ll_host_checks = col._ll_host_checks = False
    _ll_same(sym, col, Case([cap] * world, 128, 2, 2 * world, "masked", seed=30), rank, world, cap, False, True)
    # Two dispatches in flight before their hooks: the second completes the first (in-order receive).
    case = Case([4] * world, 128, 2, 2 * world, "random", seed=31)
    xs, idxs, _ = make_inputs(case, world)
    first = sym.low_latency_dispatch(xs[rank], idxs[rank], cap, case.num_experts, use_fp8=False,
                                     return_recv_hook=True)
    second = sym.low_latency_dispatch(xs[rank] * 2, idxs[rank], cap, case.num_experts, use_fp8=False,
                                      return_recv_hook=True)
    second.hook()
    first.hook()
    assert torch.equal(second.recv_x, first.recv_x * 2) and bool(first.recv_count.sum() > 0)


def test_low_latency_same_as_collective():
    spawn(_ll_rank, 2, timeout=240)


def _hier_rank(rank, world):
    sym = Buffer(ranks_per_node=2, transport="symmetric", heap_bytes=HEAP, num_sms=2)
    col = Buffer(ranks_per_node=2, transport="collective")
    assert sym.hierarchical and col.hierarchical
    for case in [Case([9 + rank for rank in range(world)], 128, 3, 2 * world, "masked", seed=40),
                 Case([0] + [7] * (world - 1), 128, 2, 2 * world, "skew", dtype=torch.bfloat16, seed=41)]:
        _same_as_collective(sym, col, case, rank, world)
    check_grads(sym, Case([5] * world, 16, 2, 2 * world, "random", seed=42), rank, world)


def test_two_stage_intra_node_on_the_heap():
    spawn(_hier_rank, 4, timeout=240, ranks_per_node=2)


def _errors_rank(rank, world):
    from moekit.ep.errors import PeerTimeout
    from moekit.ep.heap import shm_heap
    from moekit.ep.transport import Comm
    from moekit.ep.transport.symmetric import Channel, SymmetricComm

    # Sizes that lay out the heaps differ: the same ValueError on every rank, before anything is mapped.
    with pytest.raises(ValueError, match="heap_bytes and num_sms must be the same on every rank"):
        Buffer(hierarchical=False, transport="symmetric", heap_bytes=HEAP + 4096 * rank, num_sms=2)
    # A chunk that does not fit the receive slot: every rank raises, and the Buffer works afterwards.
    small = 64 << 10  # slots of ~16 KiB each (two areas, two ranks)
    sym = Buffer(hierarchical=False, transport="symmetric", heap_bytes=small, num_sms=2)
    col = Buffer(hierarchical=False, transport="collective")
    big = Case([40 if rank == 1 else 2] * world, 256, 2, 2 * world, "random", seed=50)  # 40 rows x 1 KiB
    xs, idxs, ws = make_inputs(big, world)
    with pytest.raises(ValueError, match=r"rank 1 of 2: its rows for rank \d need \d+ rows but the symmetric heap"):
        sym.dispatch(xs[rank], idxs[rank], ws[rank], big.num_experts)
    _same_as_collective(sym, col, Case([5] * world, 128, 2, 2 * world, "masked", seed=51), rank, world)
    # A bad input on one rank: the collective transport's error, on every rank.
    case = Case([6] * world, 128, 2, 2 * world, "random", seed=52)
    xs, idxs, ws = make_inputs(case, world)
    bad = idxs[rank] + (100 if rank == 1 else 0)
    with pytest.raises(ValueError, match="rank 1 of 2"):
        sym.dispatch(xs[rank], bad, ws[rank], case.num_experts)
    out = sym.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    with pytest.raises(ValueError, match="rank 0 of 2"):
        sym.combine(out.recv_x[:, :64] if rank == 0 else out.recv_x, out.handle)
    sym.combine(out.recv_x, out.handle)
    # A peer that never signals: PeerTimeout naming it, on the ranks that waited (cross-process flags).
    comm = Comm(None, world, rank)
    ch = Channel(shm_heap(comm, HEAP), 2, timeout=0.5)
    sc = SymmetricComm(ch)
    msg = torch.zeros(world, 5, dtype=torch.int64)
    assert sc.exchange_fixed(msg + rank).tolist() == [[s] * 5 for s in range(world)]
    if rank == 0:
        with pytest.raises(PeerTimeout, match=r"rank\(s\) \[1\]"):
            sc.exchange_fixed(msg)
    import torch.distributed as dist
    dist.barrier()


def test_errors_on_every_rank():
    spawn(_errors_rank, 2, timeout=240)


def _moe_rank(rank, world):
    from moekit import MoEConfig
    from moekit.moe import MoE

    cfg = MoEConfig.preset("tiny", hidden_size=128)
    torch.manual_seed(0)
    sd = MoE(cfg).state_dict()
    x = torch.randn(6 + rank, cfg.hidden_size)
    outs = []
    for transport in ("symmetric", "collective"):
        buf = Buffer(transport=transport, heap_bytes=HEAP, num_sms=2)
        moe = MoE(cfg, buffer=buf)
        moe.load_state_dict(sd)
        xx = x.clone().requires_grad_()
        y = moe(xx)
        y.square().sum().backward()
        outs.append((y.detach(), xx.grad, moe.experts.down_proj.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_moe_layer_on_the_symmetric_transport():
    spawn(_moe_rank, 2, timeout=240)


def test_info_names_the_heap(capsys):
    from moekit import cli, platform

    kind, why = platform.symmetric_heap_status()
    assert kind == ("shm" if not torch.cuda.is_available() else "torch-symm-mem") or kind is None, why
    assert cli.main(["info"]) == 0
    assert "symmetric heap" in capsys.readouterr().out


def test_transport_argument_is_checked(monkeypatch):
    monkeypatch.delenv("MOEKIT_TRANSPORT", raising=False)
    with pytest.raises(ValueError, match="transport must be one of"):
        Buffer(transport="nvshmem")
    with pytest.raises(ValueError, match="heap_bytes must be an int >= 4096"):
        Buffer(transport="symmetric", heap_bytes=10)
    assert Buffer().transport == "collective"  # auto on the CPU
    monkeypatch.setenv("MOEKIT_TRANSPORT", "symmetric")
    assert Buffer(heap_bytes=HEAP).transport == "symmetric"
    monkeypatch.delenv("MOEKIT_TRANSPORT")
    solo = Buffer(transport="symmetric", heap_bytes=HEAP, num_sms=1)  # one rank, no torch.distributed
    x, idx = torch.randn(5, 128), torch.randint(0, 4, (5, 2))
    out = solo.dispatch(x, idx, torch.rand(5, 2), 4)
    assert torch.equal(out.recv_x, x)
    assert torch.equal(solo.combine(out.recv_x, out.handle).combined_x, x)
