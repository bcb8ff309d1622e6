"""moekit.Buffer, flat path: dispatch/combine against the single-process reference on 1, 2, 4, 8 gloo ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.ep import Buffer
from moekit.testing import spawn

from .checks import check_async_overlap, check_dispatch_combine, check_fp8, check_grads, check_handle_reuse
from .reference import Case


def _cases(world: int) -> list[Case]:
    e = 4 * world
    return [
        Case([13] * world, 32, 4, e, "random", seed=1),
        Case([5 + 3 * r for r in range(world)], 24, 3, e, "masked", seed=2),  # uneven loads, -1 entries
        Case([0] + [9] * (world - 1), 16, 2, e, "random", seed=3),  # rank 0 sends nothing
        Case([11] * world, 16, 3, e, "to_rank0", seed=4),  # ranks > 0 receive nothing
        Case([10] * world, 16, 2, e, "one_expert", seed=5),  # all tokens to one expert
        Case([17] * world, 40, 6, 2 * world, "skew", seed=6),  # heavy skew, K > experts per rank
        Case([6] * world, 8, 2, e, "empty", seed=7),  # every entry -1
        Case([12] * world, 64, 4, e, "masked", dtype=torch.bfloat16, seed=8),
        Case([9] * world, 48, 4, e, "random", dtype=torch.float16, seed=9),
        Case([8] * world, 16, 6, 40 * world, "masked", seed=10),  # > 32 experts per rank: all-reduce counts
    ]


def _flat_rank(rank, world):
    buf = Buffer(hierarchical=False)
    out = [check_dispatch_combine(buf, case, rank, world) for case in _cases(world)]
    out.append(check_dispatch_combine(buf, _cases(world)[1], rank, world, alignment=4))
    out.append(check_dispatch_combine(buf, _cases(world)[0], rank, world, async_finish=True))
    grad_case = Case([7 + r for r in range(world)], 16, 3, 2 * world, "masked", seed=11)
    check_grads(buf, grad_case, rank, world)
    check_fp8(buf, Case([10] * world, 256, 3, 2 * world, "masked", seed=12), rank, world)
    check_handle_reuse(buf, Case([8] * world, 16, 2, 2 * world, "masked", seed=13), rank, world)
    check_async_overlap(buf, Case([8] * world, 16, 2, 2 * world, "random", seed=14), rank, world)
    # num_sms on gloo: recorded only, the Buffer talks over the caller's group.
    pinned = Buffer(num_sms=8, hierarchical=False)
    assert pinned.num_sms == 8 and pinned._pg_options is None and pinned._engine.comm.group is None
    total = buf.stats.total
    return out, total.self_bytes + total.intra_node_bytes + total.inter_node_bytes


def test_world_size_one_without_distributed():
    # No init_process_group at all: the Buffer must still work, with no communication.
    assert not torch.distributed.is_initialized()
    _flat_rank(0, 1)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_flat_against_reference(world):
    results = spawn(_flat_rank, world, ranks_per_node=2 if world > 2 else None)
    # Every rank received something in the plain random case, and bytes were counted.
    assert all(r[0][0]["recv"] > 0 for r in results)
    assert all(r[1] > 0 for r in results)


def _hypothesis_rank(rank, world, cases):
    buffers = [Buffer(hierarchical=False)]
    if world == 4:
        buffers.append(Buffer(ranks_per_node=2))  # 2 nodes x 2: the two-stage path
    for case in cases:
        for buf in buffers:
            check_dispatch_combine(buf, case, rank, world)


@st.composite
def _case_lists(draw):
    world = draw(st.sampled_from([2, 4]))
    cases = []
    for i in range(3):
        epr = draw(st.integers(1, 4))
        k = draw(st.integers(1, min(6, epr * world)))
        tokens = [draw(st.integers(0, 12)) for _ in range(world)]
        hidden = draw(st.integers(1, 40))
        mode = draw(st.sampled_from(["random", "masked", "skew"]))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        cases.append(Case(tokens, hidden, k, epr * world, mode, dtype, seed=draw(st.integers(0, 2**16)) + i))
    return world, cases


@settings(max_examples=4, deadline=None)
@given(_case_lists())
def test_hypothesis_shapes(world_cases):
    world, cases = world_cases
    spawn(_hypothesis_rank, world, cases)


def _subgroup_rank(rank, world):
    import torch.distributed as dist

    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # collective: every rank creates both
    group = groups[rank % 2]
    # Flat path only: the two-stage path's sub-groups are created over the whole world.
    buf = Buffer(group, ranks_per_node=1)
    assert not buf.hierarchical  # one rank per node: nothing to forward inside a node
    me = dist.get_rank(group)
    check_dispatch_combine(buf, Case([6, 9], 16, 3, 8, "masked", seed=50 + rank % 2), me, 2)
    check_grads(buf, Case([5, 4], 8, 2, 4, "masked", seed=51), me, 2)
    return me


def test_buffer_on_a_subgroup():
    assert spawn(_subgroup_rank, 4) == [0, 0, 1, 1]
