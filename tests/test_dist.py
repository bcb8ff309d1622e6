import pytest
import torch
import torch.distributed as dist

from moekit import dist as mdist
from moekit.testing import RankError, spawn


def test_node_layout():
    lay = mdist.NodeLayout(8, 2)
    assert lay.num_nodes == 4
    assert [lay.node_of(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert lay.ranks_with_local(1) == [1, 3, 5, 7]
    assert lay.ranks_of_node(2) == [4, 5]
    with pytest.raises(ValueError, match="ranks_per_node"):
        mdist.NodeLayout(8, 3)


def _groups_rank(rank, world):
    lay = mdist.node_layout()
    groups = mdist.new_node_groups(None, lay)
    t = torch.tensor([rank], dtype=torch.int64)
    intra = t.clone()
    if groups.intra is not None:
        dist.all_reduce(intra, group=groups.intra)
    inter = t.clone()
    if groups.inter is not None:
        dist.all_reduce(inter, group=groups.inter)
    return lay.ranks_per_node, int(intra), int(inter)


@pytest.mark.parametrize("world, rpn", [(4, 2), (8, 2), (2, 1), (2, 2)])
def test_node_groups(world, rpn):
    out = spawn(_groups_rank, world, ranks_per_node=rpn)
    lay = mdist.NodeLayout(world, rpn)
    for r, (got_rpn, intra, inter) in enumerate(out):
        assert got_rpn == rpn
        assert intra == sum(lay.ranks_of_node(lay.node_of(r)))
        assert inter == sum(lay.ranks_with_local(lay.local_of(r)))


def _fails_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("rank one is unhappy")
    return rank


def test_spawn_reraises_rank_traceback():
    with pytest.raises(RankError, match="rank one is unhappy"):
        spawn(_fails_on_rank1, 2)


def _sleepy(rank, world):
    import time

    time.sleep(60)


def test_spawn_times_out():
    with pytest.raises(TimeoutError):
        spawn(_sleepy, 2, timeout=3)


def test_node_keys_from_hosts_and_p2p_domains():
    # Same host, devices 0-1 and 2-3 each a P2P (NVLink) domain: two nodes of two; CPU ranks: by host.
    gpu = [("h", (0, [0, 1])), ("h", (1, [0, 1])), ("h", (2, [2, 3])), ("h", (3, [2, 3]))]
    assert mdist.node_keys(gpu) == [0, 0, 1, 1] and mdist.ranks_per_node_from_keys([0, 0, 1, 1]) == 2
    assert mdist.node_keys([("a", None), ("a", None), ("b", None)]) == [0, 0, 1]
    for keys in ([0, 1, 0, 1], [0, 0, 1], [0, 1, 1]):
        with pytest.raises(ValueError, match="consecutive"):
            mdist.ranks_per_node_from_keys(keys)
    assert mdist.ranks_per_node_from_keys([0, 0, 0]) == 3
