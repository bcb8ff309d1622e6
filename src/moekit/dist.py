"""Process groups and the node layout.

A *node* is a run of ``ranks_per_node`` consecutive ranks of a group (rank ``r`` sits on node
``r // ranks_per_node`` with local index ``r % ranks_per_node``). By default ``ranks_per_node`` is
``LOCAL_WORLD_SIZE`` (set by ``torchrun``), so tests can pretend that 8 gloo ranks are 4 nodes of 2;
without it, :func:`node_layout` asks the hardware (:func:`hardware_ranks_per_node`: the ranks that
share a host, and on GPUs a peer-to-peer (NVLink) domain, are one node).
"""

from __future__ import annotations

import dataclasses
import os
import socket

import torch.distributed as dist

from ._util import check_positive_int

ProcessGroup = dist.ProcessGroup


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """How the ranks of a group are spread over nodes. Ranks are group ranks."""

    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        check_positive_int("world_size", self.world_size)
        if self.ranks_per_node < 1 or self.world_size % self.ranks_per_node != 0:
            raise ValueError(
                f"ranks_per_node ({self.ranks_per_node}) must be >= 1 and divide the world size "
                f"({self.world_size})"
            )

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def rank_of(self, node: int, local: int) -> int:
        return node * self.ranks_per_node + local

    def ranks_of_node(self, node: int) -> list[int]:
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def ranks_with_local(self, local: int) -> list[int]:
        return [self.rank_of(n, local) for n in range(self.num_nodes)]


def world_size(group: ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def default_ranks_per_node(group: ProcessGroup | None = None) -> int:
    ws = world_size(group)
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env is not None and ws % int(env) == 0:
        return int(env)
    return ws


def node_layout(group: ProcessGroup | None = None, ranks_per_node: int | None = None) -> NodeLayout:
    """The :class:`NodeLayout` of ``group``.

    ``ranks_per_node=None`` takes ``LOCAL_WORLD_SIZE`` (:func:`default_ranks_per_node`) when it is set,
    else :func:`hardware_ranks_per_node` (collective over ``group`` then: every rank must call it).
    """
    ws = world_size(group)
    if ranks_per_node is None and os.environ.get("LOCAL_WORLD_SIZE") is None and ws > 1:
        return NodeLayout(ws, hardware_ranks_per_node(group))
    rpn = default_ranks_per_node(group) if ranks_per_node is None else int(ranks_per_node)
    return NodeLayout(ws, rpn)


def host_identity() -> str:
    """What tells hosts apart: the hostname and the kernel's boot id (two containers or VMs may share a
    hostname, never a boot id; processes of one host share both)."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:  # not Linux: the hostname alone
        pass
    return f"{socket.gethostname()}/{boot}"


def _device_identity() -> tuple[int, list[int]] | None:
    """On a CUDA rank: ``(its device index, the local devices it reaches peer-to-peer)``; else None."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    me = torch.cuda.current_device()
    peers = [d for d in range(torch.cuda.device_count())
             if d == me or torch.cuda.can_device_access_peer(me, d)]
    return me, peers


def node_keys(identities: list) -> list[int]:
    """Node number of each rank from its ``(host, device identity)`` (what :func:`hardware_ranks_per_node`
    gathers): same host and, where both ranks have a device, devices that reach each other peer-to-peer.
    Nodes are numbered in order of their first rank."""
    keys, first = [], {}
    for host, dev in identities:
        clique = None
        if dev is not None:
            me, peers = dev
            # The smallest device of the host this rank reaches by P2P names its NVLink/P2P domain.
            clique = min(peers) if peers else me
        keys.append(first.setdefault((host, clique), len(first)))
    return keys


def ranks_per_node_from_keys(keys: list[int]) -> int:
    """G from each rank's node number: the nodes must be runs of G consecutive ranks (the node layout's
    rule). Raises ValueError naming the ranks otherwise."""
    ws = len(keys)
    sizes = [keys.count(n) for n in range(max(keys) + 1)]
    g = sizes[0]
    expected = [r // g for r in range(ws)] if ws % g == 0 else None
    if expected != keys:
        runs = {n: [r for r, k in enumerate(keys) if k == n] for n in range(len(sizes))}
        raise ValueError(
            "the ranks of each host must be consecutive group ranks, the same number on every host "
            f"(found node -> group ranks {runs}); launch with consecutive ranks per host (torchrun does) "
            "or pass ranks_per_node / set LOCAL_WORLD_SIZE")
    return g


def hardware_ranks_per_node(group: ProcessGroup | None = None) -> int:
    """Ranks per node as the hardware says: ranks on one host (hostname + boot id) and, on GPUs, in one
    peer-to-peer (NVLink) domain are one node. Collective over ``group`` (one ``all_gather_object``);
    1 rank without torch.distributed. Raises ValueError on every rank when the nodes are not runs of
    equally many consecutive ranks."""
    ws = world_size(group)
    if ws == 1:
        return 1
    mine = (host_identity(), _device_identity())
    everyone = [None] * ws
    dist.all_gather_object(everyone, mine, group=group)
    return ranks_per_node_from_keys(node_keys(everyone))


def global_ranks(group: ProcessGroup | None = None) -> list[int]:
    """Global ranks of the members of ``group``, in group-rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [0]
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


@dataclasses.dataclass
class NodeGroups:
    """Sub-groups of one group for two-stage communication, seen from the calling rank.

    ``intra``: the ranks of my node (group ranks ``node_layout.ranks_of_node(my node)``).
    ``inter``: the ranks with my local index on every node (``node_layout.ranks_with_local(my local)``).
    Either is ``None`` when it would hold only the calling rank.
    """

    node_layout: NodeLayout
    intra: ProcessGroup | None
    inter: ProcessGroup | None


def new_node_groups(group: ProcessGroup | None, node_layout: NodeLayout, pg_options=None) -> NodeGroups:
    """Create the intra-node and inter-node sub-groups. Collective: every rank of the *world* calls it.

    ``dist.new_group`` must be entered by all ranks in the same order, so every rank creates every
    sub-group and keeps the two it belongs to. ``pg_options`` goes to ``dist.new_group`` (e.g. NCCL
    options that cap the CTAs a communicator uses; see ``moekit.ep.transport.nccl``).
    """
    members = global_ranks(group)
    me = rank(group)

    def mine(rank_lists, index: int) -> ProcessGroup | None:
        """Create a sub-group per list of group ranks (of two or more) in order; return the ``index``-th."""
        made = [dist.new_group([members[r] for r in ranks], pg_options=pg_options) if len(ranks) > 1 else None
                for ranks in rank_lists]
        return made[index]

    intra = mine([node_layout.ranks_of_node(n) for n in range(node_layout.num_nodes)], node_layout.node_of(me))
    inter = mine([node_layout.ranks_with_local(l) for l in range(node_layout.ranks_per_node)], node_layout.local_of(me))
    return NodeGroups(node_layout, intra, inter)
