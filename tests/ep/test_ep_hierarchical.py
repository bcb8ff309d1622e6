"""Node-aware two-stage dispatch/combine: identical to the flat path, exact inter-node bytes, gradients,
FP8, handle reuse, async and collective errors, on node layouts 2x2, 2x4, 4x2, 8x1 (and 1 node)."""

from __future__ import annotations

import pytest
import torch

from moekit.ep import Buffer
from moekit.testing import spawn

from .checks import check_async_overlap, check_dispatch_combine, check_fp8, check_grads, check_handle_reuse
from .reference import Case, make_inputs


def _cases(world: int) -> list[Case]:
    e = 4 * world
    return [
        Case([16] * world, 32, 8, e, "random", seed=21),  # many experts per token: several per node
        Case([3 + 2 * r for r in range(world)], 24, 4, e, "masked", seed=22),
        Case([0] + [7] * (world - 1), 16, 3, e, "skew", seed=23),
        Case([9] * world, 16, 2, e, "to_rank0", seed=24),
        Case([5] * world, 8, 2, e, "empty", seed=25),
        Case([12] * world, 64, 6, e, "masked", dtype=torch.bfloat16, seed=26),
    ]


def _same_as_flat(flat: Buffer, hier: Buffer, case: Case, rank: int, world: int) -> None:
    xs, idxs, ws = make_inputs(case, world)
    a = flat.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    b = hier.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    assert b.handle.hierarchical
    assert torch.equal(a.recv_x, b.recv_x) and torch.equal(a.recv_topk_idx, b.recv_topk_idx)
    assert torch.equal(a.recv_topk_weights, b.recv_topk_weights)
    assert a.num_recv_tokens_per_expert_list == b.num_recv_tokens_per_expert_list
    z = a.recv_x.float().sin().to(case.dtype)  # a non-trivial "expert"
    ya, _ = flat.combine(z, a.handle)
    yb, _ = hier.combine(z, b.handle)
    # fp32: equal up to summation order. bf16: the forwarder's partial sum is rounded to bf16 once more.
    tol = 1e-5 if case.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ya.float(), yb.float(), rtol=tol, atol=tol)


def _bad_inputs(buf: Buffer, rank: int, world: int) -> list[str]:
    case = Case([6] * world, 16, 3, 2 * world, "masked", seed=31)
    xs, idxs, ws = make_inputs(case, world)
    x, idx, w = xs[rank], idxs[rank], ws[rank]
    bad = rank == world - 1
    ok = buf.dispatch(x, idx, w, case.num_experts)
    calls = [
        lambda: buf.dispatch(x, torch.full_like(idx, 99) if bad else idx, w, case.num_experts),
        lambda: buf.combine(ok.recv_x[:-1] if bad else ok.recv_x, ok.handle),
        lambda: buf.dispatch(x[:2] if bad else x, None, None, None, handle=ok.handle),
        lambda: buf.combine(ok.recv_x[:, :5] if bad else ok.recv_x, ok.handle, async_finish=True).event.wait(),
    ]
    msgs = []
    for call in calls:
        try:
            call()
            msgs.append(None)
        except ValueError as err:
            msgs.append(str(err))
        # usable afterwards
        check_dispatch_combine(buf, Case([3] * world, 8, 2, 2 * world, "random", seed=len(msgs)), rank, world)
    return msgs


def _hier_rank(rank, world, rpn, force):
    flat = Buffer(ranks_per_node=rpn, hierarchical=False)
    hier = Buffer(ranks_per_node=rpn, hierarchical=True if force else None)
    assert hier.hierarchical
    inter = []
    for case in _cases(world):
        _same_as_flat(flat, hier, case, rank, world)
        inter.append((check_dispatch_combine(hier, case, rank, world)["inter"],
                      check_dispatch_combine(flat, case, rank, world)["inter"]))
    check_dispatch_combine(hier, _cases(world)[1], rank, world, alignment=8, async_finish=True)
    check_grads(hier, Case([5 + r for r in range(world)], 16, 4, 2 * world, "masked", seed=41), rank, world)
    check_fp8(hier, Case([8] * world, 256, 4, 2 * world, "masked", seed=42), rank, world)
    check_handle_reuse(hier, Case([8] * world, 16, 3, 2 * world, "masked", seed=43), rank, world)
    check_async_overlap(hier, Case([8] * world, 16, 3, 2 * world, "random", seed=44), rank, world)
    return inter, _bad_inputs(hier, rank, world)


@pytest.mark.parametrize("world, rpn, force", [(4, 2, False), (8, 4, False), (8, 2, False), (8, 1, True),
                                               (4, 4, True)])
def test_two_stage(world, rpn, force):
    results = spawn(_hier_rank, world, rpn, force)
    inter = [r[0] for r in results]
    if world // rpn > 1:
        # Across all ranks, node-aware dispatch sends fewer inter-node bytes than the flat one when
        # tokens pick several ranks of one node (case 0: 8 experts of 4 * world).
        assert sum(i[0][0] for i in inter) <= sum(i[0][1] for i in inter)
        if rpn > 1:
            assert sum(i[0][0] for i in inter) < sum(i[0][1] for i in inter)
    else:
        assert all(h == 0 and f == 0 for i in inter for h, f in i)
    msgs = [r[1] for r in results]
    for j in range(len(msgs[0])):
        assert msgs[0][j] is not None, f"bad input {j}: no error"
        assert all(m[j] == msgs[0][j] for m in msgs), [m[j] for m in msgs]
        assert f"rank {world - 1} of {world}" in msgs[0][j]


def test_traffic_two_stage_splits_each_stage_by_hop():
    """Rank (1, 0) of 2 nodes x 3: stage 1 to (n, 0), stage 2 to (1, l); its own rows are self bytes."""
    from moekit.dist import NodeLayout
    from moekit.ep.stats import traffic_two_stage

    t = traffic_two_stage([5, 7], [11, 13, 17], 2, NodeLayout(6, 3), 3)
    assert (t.self_bytes, t.inter_node_bytes, t.intra_node_bytes) == (2 * (7 + 11), 2 * 5, 2 * (13 + 17))
