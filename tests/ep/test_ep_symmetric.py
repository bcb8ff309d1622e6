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
