import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.routing.eplb import balanced_packing, rebalance_experts, replicate_experts


def _check_consistent(weight, res, num_replicas, num_gpus):
    phy2log, log2phy, logcnt = res
    layers, num_log = weight.shape
    assert phy2log.shape == (layers, num_replicas)
    # DeepSeek's EPLB: log2phy has room for all redundant slots on one expert, whatever the loads.
    assert log2phy.shape == (layers, num_log, num_replicas - num_log + 1)
    assert logcnt.shape == (layers, num_log) and (logcnt >= 1).all()
    for li in range(layers):
        counts = torch.bincount(phy2log[li], minlength=num_log)
        assert torch.equal(counts, logcnt[li])
        for e in range(num_log):
            c = int(logcnt[li, e])
            slots = log2phy[li, e]
            assert (slots[c:] == -1).all()
            assert sorted(slots[:c].tolist()) == torch.nonzero(phy2log[li] == e).flatten().tolist()


def _gpu_loads(weight, res, num_gpus):
    phy2log, _, logcnt = res
    per_slot = (weight / logcnt).gather(-1, phy2log)  # [L, P]
    return per_slot.view(weight.shape[0], num_gpus, -1).sum(-1)


@given(layers=st.integers(1, 3), groups=st.sampled_from([1, 2, 4, 8]), per_group=st.integers(1, 4),
       nodes=st.sampled_from([1, 2, 4]), gpus_per_node=st.sampled_from([1, 2, 4]), extra_per_gpu=st.integers(0, 2),
       seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_consistent_and_hierarchical(layers, groups, per_group, nodes, gpus_per_node, extra_per_gpu, seed):
    num_log = groups * per_group
    num_gpus = nodes * gpus_per_node
    # P must be a multiple of the GPU count and >= E.
    num_replicas = -(-num_log // num_gpus) * num_gpus + extra_per_gpu * num_gpus
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 100, (layers, num_log), generator=g).float()
    res = rebalance_experts(weight, num_replicas, groups, nodes, num_gpus)
    _check_consistent(weight, res, num_replicas, num_gpus)
    if groups % nodes == 0:
        # Hierarchical: every replica of a group's experts sits on the node the group was packed to.
        slots_per_node = num_replicas // nodes
        node_of_slot = torch.arange(num_replicas) // slots_per_node
        for li in range(layers):
            group_of_slot = res.phy2log[li] // per_group
            for grp in range(groups):
                assert node_of_slot[group_of_slot == grp].unique().numel() == 1


def test_replication_is_optimal_for_max_load_per_replica():
    torch.manual_seed(1)
    for _ in range(20):
        w = torch.randint(1, 50, (1, 4)).double()
        extra = 3
        _, _, cnt = replicate_experts(w, 4 + extra)
        got = (w / cnt).max()
        best = min((w / (1 + torch.tensor(c))).max() for c in itertools.product(range(extra + 1), repeat=4)
                   if sum(c) == extra)
        assert got == pytest.approx(float(best))


def test_balanced_packing_counts_and_greedy():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    pack, rank = balanced_packing(w, 2)
    loads = [float(w[0][pack[0] == p].sum()) for p in range(2)]
    assert loads == [5.0, 5.0]
    assert torch.bincount(pack[0]).tolist() == [2, 2]
    assert sorted(rank[0].tolist()) == [0, 0, 1, 1]


def test_hot_expert_gets_replicas_and_balance_improves():
    weight = torch.full((1, 16), 10.0)
    weight[0, 3] = 400.0
    res = rebalance_experts(weight, 32, num_groups=4, num_nodes=2, num_gpus=8)
    assert res.logcnt[0, 3] == res.logcnt.max() and res.logcnt[0, 3] > 1
    loads = _gpu_loads(weight, res, 8)
    # Without replication the GPU holding expert 3 carries at least 400 of 550 in all.
    assert loads.max() < 400
    assert loads.max() / loads.mean() < 400 / (550 / 8)


def test_global_policy_when_groups_do_not_split_over_nodes():
    weight = torch.rand(2, 12) * 100
    res = rebalance_experts(weight, 24, num_groups=3, num_nodes=2, num_gpus=4)
    _check_consistent(weight, res, 24, 4)


def test_one_dimensional_input():
    res = rebalance_experts(torch.tensor([5.0, 1.0, 1.0, 1.0]), 8, 1, 1, 2)
    assert res.phy2log.shape == (8,) and res.logcnt.shape == (4,)
    assert res.logcnt[0] == res.logcnt.max()


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_replicas=10), "num_replicas"),
    (dict(num_replicas=8), "num_replicas"),
    (dict(num_groups=5), "num_groups"),
    (dict(num_gpus=6, num_nodes=4), "num_gpus"),
    (dict(num_nodes=0), "num_nodes"),
])
def test_bad_input(kwargs, match):
    args = dict(num_replicas=32, num_groups=4, num_nodes=2, num_gpus=8) | kwargs
    with pytest.raises(ValueError, match=match):
        rebalance_experts(torch.rand(16), **args)
    with pytest.raises(ValueError, match="weight"):
        rebalance_experts(torch.rand(2, 2, 16), 32, 4, 2, 8)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-torch.rand(16), 32, 4, 2, 8)
