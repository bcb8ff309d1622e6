"""Process groups and the node layout.

A *node* is a run of ``ranks_per_node`` consecutive ranks of a group (rank ``r`` sits on node
``r // ranks_per_node`` with local index ``r % ranks_per_node``). By default ``ranks_per_node`` is
``LOCAL_WORLD_SIZE`` (set by ``torchrun``) or the whole group, so tests can pretend that 8 gloo
ranks are 4 nodes of 2.
"""

from __future__ import annotations

import dataclasses
import os

import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """How the ranks of a group are spread over nodes. Ranks are group ranks."""

    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
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
    """The :class:`NodeLayout` of ``group``; ``ranks_per_node=None`` takes :func:`default_ranks_per_node`."""
    ws = world_size(group)
    rpn = default_ranks_per_node(group) if ranks_per_node is None else int(ranks_per_node)
    return NodeLayout(ws, rpn)


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

    ``intra``: the ranks of my node (group ranks ``layout.ranks_of_node(my node)``).
    ``inter``: the ranks with my local index on every node (``layout.ranks_with_local(my local)``).
    Either is ``None`` when it would hold only the calling rank.
    """

    layout: NodeLayout
    intra: ProcessGroup | None
    inter: ProcessGroup | None


def new_node_groups(group: ProcessGroup | None, layout: NodeLayout, pg_options=None) -> NodeGroups:
    """Create the intra-node and inter-node sub-groups. Collective: every rank of the *world* calls it.

    ``dist.new_group`` must be entered by all ranks in the same order, so every rank creates every
    sub-group and keeps the two it belongs to. ``pg_options`` goes to ``dist.new_group`` (e.g. NCCL
    options that cap the CTAs a communicator uses; see ``moekit.ep.transport.nccl``).
    """
    members = global_ranks(group)
    me = rank(group)
    intra = inter = None
    for node in range(layout.num_nodes):
        ranks = [members[r] for r in layout.ranks_of_node(node)]
        g = dist.new_group(ranks, pg_options=pg_options) if len(ranks) > 1 else None
        if node == layout.node_of(me):
            intra = g
    for local in range(layout.ranks_per_node):
        ranks = [members[r] for r in layout.ranks_with_local(local)]
        g = dist.new_group(ranks, pg_options=pg_options) if len(ranks) > 1 else None
        if local == layout.local_of(me):
            inter = g
    return NodeGroups(layout, intra, inter)
