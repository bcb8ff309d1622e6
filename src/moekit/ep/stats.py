"""Traffic counters of a Buffer: bytes of the rows each rank actually handed to the transport."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..dist import NodeLayout


@dataclasses.dataclass
class Traffic:
    """Bytes sent by this rank, by hop kind. A row moved over several hops counts once per hop."""

    self_bytes: int = 0  # rows whose hop ends on the sending rank itself
    intra_node_bytes: int = 0  # hops to another rank of the same node
    inter_node_bytes: int = 0  # hops to a rank of another node

    @property
    def total_bytes(self) -> int:
        return self.self_bytes + self.intra_node_bytes + self.inter_node_bytes

    def add(self, other: Traffic) -> None:
        self.self_bytes += other.self_bytes
        self.intra_node_bytes += other.intra_node_bytes
        self.inter_node_bytes += other.inter_node_bytes


@dataclasses.dataclass
class TrafficStats:
    """``last``: the latest dispatch or combine (all its hops); ``total``: everything since creation/reset."""

    last: Traffic = dataclasses.field(default_factory=Traffic)
    total: Traffic = dataclasses.field(default_factory=Traffic)
    num_calls: int = 0

    def record(self, traffic: Traffic) -> None:
        self.last = traffic
        self.total.add(traffic)
        self.num_calls += 1

    def reset(self) -> None:
        self.last, self.total, self.num_calls = Traffic(), Traffic(), 0


def traffic_by_peer(bytes_per_peer: Sequence[int], node_layout: NodeLayout, me: int) -> Traffic:
    """Bytes sent to each group rank (``bytes_per_peer[r]``, r < R) split by hop: to ``me`` itself, to a rank
    of ``me``'s node, to a rank of another node."""
    t, my_node = Traffic(), node_layout.node_of(me)
    for r, b in enumerate(bytes_per_peer):
        if r == me:
            t.self_bytes += b
        elif node_layout.node_of(r) == my_node:
            t.intra_node_bytes += b
        else:
            t.inter_node_bytes += b
    return t


def traffic_two_stage(inter_counts: Sequence[int], intra_counts: Sequence[int], row_bytes: int, node_layout: NodeLayout,
                      me: int) -> Traffic:
    """The bytes of one two-stage exchange of ``row_bytes`` rows: the inter-node stage sends ``inter_counts[n]``
    rows to the rank of node n with ``me``'s local index, the intra-node stage ``intra_counts[l]`` rows to rank
    l of ``me``'s node. Both stages' rows are split by hop as :func:`traffic_by_peer` does."""
    node, local = node_layout.node_of(me), node_layout.local_of(me)
    per_peer = [0] * node_layout.world_size
    for n, c in enumerate(inter_counts):
        per_peer[node_layout.rank_of(n, local)] += c * row_bytes
    for l, c in enumerate(intra_counts):
        per_peer[node_layout.rank_of(node, l)] += c * row_bytes
    return traffic_by_peer(per_peer, node_layout, me)
