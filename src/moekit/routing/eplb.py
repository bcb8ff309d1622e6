"""EPLB: replicate heavy experts and place the replicas on GPUs so that every GPU gets a similar load.

``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` follows the semantics of
DeepSeek's EPLB. L = layers, E = logical experts, P = ``num_replicas`` physical experts (slots),
P / num_gpus slots per GPU, GPUs numbered node-major (GPU g sits on node g // (num_gpus / num_nodes)).

Hierarchical policy, used when the expert groups divide evenly among the nodes (node-limited routing
then keeps a token's traffic on few nodes): (1) pack whole groups onto nodes, balancing their loads;
(2) inside each node, give extra replicas to the experts with the highest load per replica; (3) pack
the node's replicas onto its GPUs, the same number on each, balancing their loads. Otherwise the
global policy: the same steps with the whole cluster as one node and one group.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._util import check_positive_int


class EPLBResult(NamedTuple):
    phy2log: torch.Tensor  # [L, P] int64: the logical expert in each physical slot
    log2phy: torch.Tensor  # [L, E, P - E + 1] int64: the slots of each logical expert, padded with -1
    logcnt: torch.Tensor  # [L, E] int64: replicas of each logical expert (>= 1)


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``n`` items into ``num_packs`` packs of exactly ``n / num_packs`` items, balancing weight.

    ``weight`` ``[L, n]`` float. Heaviest item first, each into the lightest pack that still has room
    (longest-processing-time greedy). Returns ``pack [L, n]`` and ``rank_in_pack [L, n]`` (int64).
    """
    layers, n = weight.shape
    assert n % num_packs == 0
    per_pack = n // num_packs
    pack = torch.empty(layers, n, dtype=torch.int64)
    rank_in_pack = torch.empty(layers, n, dtype=torch.int64)
    if per_pack == 1:
        pack[:] = torch.arange(n)
        rank_in_pack.zero_()
        return pack, rank_in_pack
    order = weight.float().sort(dim=-1, descending=True).indices
    for li in range(layers):
        loads = [0.0] * num_packs
        counts = [0] * num_packs
        for item in order[li].tolist():
            p = min((p for p in range(num_packs) if counts[p] < per_pack), key=loads.__getitem__)
            pack[li, item] = p
            rank_in_pack[li, item] = counts[p]
            loads[p] += float(weight[li, item])
            counts[p] += 1
    return pack, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give ``num_phy - n`` extra replicas, one at a time, to the expert with the most load per replica.

    ``weight`` ``[L, n]``. The greedy choice minimises the largest load per replica. Returns
    ``phy2log [L, num_phy]``, ``replica_rank [L, num_phy]`` (which replica of its expert a slot is) and
    ``logcnt [L, n]``.
    """
    layers, n = weight.shape
    assert num_phy >= n
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(layers, 1)
    rank = torch.zeros(layers, num_phy, dtype=torch.int64)
    logcnt = torch.ones(layers, n, dtype=torch.int64)
    rows = torch.arange(layers)
    w = weight.double()
    for slot in range(n, num_phy):
        best = (w / logcnt).argmax(dim=-1)  # [L]
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=perm.dtype).expand_as(perm))
    return inv


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int):
    layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # Step 1: groups -> nodes. mlog = "meta-logical" ids: experts renumbered node by node.
    group_weight = weight.unflatten(-1, (num_groups, group_size)).sum(-1)  # [L, G]
    group_pack, group_rank = balanced_packing(group_weight, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size)).flatten(-2)  # [L, E]
    mlog2log = _inverse(log2mlog)

    # Step 2: replicas inside each node (every node treated as an independent layer).
    tokens_per_mlog = weight.gather(-1, mlog2log).view(-1, num_log // num_nodes)  # [L*N, E/N]
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_phy // num_nodes)

    # Step 3: the node's replicas -> its GPUs.
    tokens_per_phy = (tokens_per_mlog / mlogcnt).gather(-1, phy2mlog)  # [L*N, P/N]
    pack, rank_in_pack = balanced_packing(tokens_per_phy, gpus_per_node)
    phy2pphy = pack * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)  # [L*N, P/N]
    pphy2mlog = (pphy2mlog.view(layers, num_nodes, -1)
                 + torch.arange(0, num_log, num_log // num_nodes).view(1, -1, 1)).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)  # [L, P]
    pphyrank = phyrank.gather(-1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> EPLBResult:
    """Plan expert replicas and their placement from measured per-expert loads.

    Args:
        weight: ``[L, E]`` (or ``[E]``) loads per logical expert (token counts; any non-negative dtype).
        num_replicas: P, physical expert slots in all; a multiple of ``num_gpus`` and >= E.
        num_groups: expert groups (E divisible by it).
        num_nodes: server nodes; hierarchical policy when it divides ``num_groups``.
        num_gpus: GPUs in all, a multiple of ``num_nodes``.

    Returns:
        ``EPLBResult(phy2log [L, P], log2phy [L, E, P - E + 1] padded with -1, logcnt [L, E])``,
        int64 on the CPU (``[E]`` input gives ``[P]``, ``[E, P - E + 1]``, ``[E]``).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        raise ValueError(f"weight must be a [layers, experts] or [experts] tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    squeeze = weight.dim() == 1
    weight = weight.detach().float().cpu().reshape(-1, weight.shape[-1])
    if (weight < 0).any() or not torch.isfinite(weight).all():
        raise ValueError("weight must hold finite, non-negative loads")
    num_log = weight.shape[1]
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                    ("num_gpus", num_gpus)):
        check_positive_int(name, v)
    if num_log % num_groups != 0:
        raise ValueError(f"the number of experts ({num_log}) must be divisible by num_groups ({num_groups})")
    if num_gpus % num_nodes != 0:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_replicas % num_gpus != 0 or num_replicas < num_log:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus}) and >= the "
                         f"number of experts ({num_log})")
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    # As DeepSeek's EPLB: room for every redundant slot on one expert, so the shape depends only on the
    # arguments (a caller can preallocate it, e.g. for a CUDA graph), not on the loads.
    max_rep = num_replicas - num_log + 1
    layers = weight.shape[0]
    log2phy = torch.full((layers, num_log, max_rep), -1, dtype=torch.int64)
    slots = torch.arange(num_replicas, dtype=torch.int64).expand(layers, -1)
    log2phy.view(layers, -1).scatter_(-1, phy2log * max_rep + phyrank, slots)
    if squeeze:
        return EPLBResult(phy2log[0], log2phy[0], logcnt[0])
    return EPLBResult(phy2log, log2phy, logcnt)
