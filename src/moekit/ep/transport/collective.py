"""The collective transport: rows move in torch.distributed all-to-alls (gloo, NCCL, RCCL).

Flat path: one all-to-all of packed rows. Two-stage path (several nodes): stage 1 between nodes (one
row per (token, destination node), to the rank with the sender's local index there), stage 2 inside
the node (the forwarder re-sends the rows, bytes untouched, to the ranks that need them); combine is
the mirror image, with a partial sum at the forwarder (DeepSeek-V3 report, section 3.2.2).

:class:`RowEngine` walks a handle's plan over any "row communicators" (objects with
:meth:`~moekit.ep.transport.torch_dist.Comm.all_to_all_rows`): the symmetric transport reuses it for the
two-stage path with its own intra-node communicator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...dist import NodeLayout
from .. import wire
from ..errors import first_failure, raise_status
from ..handle import DispatchHandle
from ..stats import Traffic, traffic_by_peer, traffic_two_stage
from ..wire import plus_status
from .base import Rows, Transfer, Transport
from .torch_dist import Comm


def _waiter(work) -> Callable[[], None] | None:
    return None if work is None else work.wait


class RowEngine(Transport):
    """Plan-walking over row communicators: ``comm`` (the group), ``inter``/``intra`` (two-stage path)."""

    def __init__(self, comm, node_layout: NodeLayout, inter=None, intra=None):
        self.comm, self.node_layout, self.rank = comm, node_layout, comm.rank
        self.inter, self.intra = inter, intra

    # ---- traffic -------------------------------------------------------------------------------
    def _flat_traffic(self, counts: list[int], row_bytes: int) -> Traffic:
        return traffic_by_peer([c * row_bytes for c in counts], self.node_layout, self.rank)

    def _hier_traffic(self, inter_counts: list[int], intra_counts: list[int], row_bytes: int) -> Traffic:
        return traffic_two_stage(inter_counts, intra_counts, row_bytes, self.node_layout, self.rank)

    def _checker(self, op: str, buf: torch.Tensor, counts: list[int]) -> Callable[[], None]:
        return lambda: raise_status(op, first_failure(wire.read_statuses(buf, counts)), self.world_size)

    # ---- small exchanges -----------------------------------------------------------------------
    def exchange_fixed(self, msg: torch.Tensor) -> torch.Tensor:
        return self.comm.exchange_fixed(msg)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce_sum(t)

    def exchange_blocks(self, send: torch.Tensor, block_rows: int, traffic: Traffic, *,
                        async_op: bool = False) -> Transfer:
        r = self.world_size
        recv, work = self.comm.all_to_all_rows(send, [block_rows] * r, [block_rows] * r, async_op=async_op)
        return Transfer(traffic, arrive=_waiter(work), unpack=lambda: {"rows": recv})

    # ---- dispatch direction ---------------------------------------------------------------------
    def dispatch(self, op: str, plan: DispatchHandle, rows: Rows, *, async_op: bool = False,
                 stage2_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 out: dict[str, torch.Tensor] | None = None) -> Transfer:
        h, (fmt, fields, status) = plan, rows
        if h.hier is None:
            send = wire.pack(fmt, fields, h.send_counts, status, row_index=h.send_token)
            recv, work = self.comm.all_to_all_rows(send, plus_status(h.send_counts), plus_status(h.recv_counts),
                                                   async_op)
            return Transfer(self._flat_traffic(h.send_counts, fmt.row_bytes), arrive=_waiter(work),
                            check=self._checker(op, recv, h.recv_counts),
                            unpack=lambda: wire.unpack(fmt, recv, h.recv_counts, out=out))
        p = h.hier
        # Stage 1: one row per (token, destination node), to the rank with my local index there.
        send1 = wire.pack(fmt, fields, p.s1_send_counts, status, row_index=p.s1_send_token)
        recv1, _ = self.inter.all_to_all_rows(send1, plus_status(p.s1_send_counts), plus_status(p.s1_recv_counts))
        if p.s2_send_row is None:
            assert stage2_rows is not None, "the first dispatch of a handle must carry topk_idx"
            _, data_pos = wire.positions(p.s1_recv_counts, recv1.device)
            p.s2_send_row = stage2_rows(fmt.views(recv1)["idx"].index_select(0, data_pos))
        # Stage 2: forward the received rows, bytes untouched, to the ranks of this node that need them.
        merged = wire.merged_status(recv1, p.s1_recv_counts, status)
        send2 = wire.forward_rows(recv1, p.s1_recv_counts, p.s2_send_counts, p.s2_send_row, merged)
        recv2, work = self.intra.all_to_all_rows(send2, plus_status(p.s2_send_counts), plus_status(p.s2_recv_counts),
                                                 async_op)
        return Transfer(self._hier_traffic(p.s1_send_counts, p.s2_send_counts, fmt.row_bytes),
                        arrive=_waiter(work), check=self._checker(op, recv2, p.s2_recv_counts),
                        unpack=lambda: wire.unpack(fmt, recv2, p.s2_recv_counts, row_index=p.final_index, out=out))

    # ---- combine direction ----------------------------------------------------------------------
    def combine(self, op: str, plan: DispatchHandle, rows: Rows, *, async_op: bool = False) -> Transfer:
        h, (fmt, fields, status) = plan, rows
        t = h.num_tokens
        if h.hier is None:
            send = wire.pack(fmt, fields, h.recv_counts, status)
            recv, work = self.comm.all_to_all_rows(send, plus_status(h.recv_counts), plus_status(h.send_counts),
                                                   async_op)
            return Transfer(self._flat_traffic(h.recv_counts, fmt.row_bytes), arrive=_waiter(work),
                            check=self._checker(op, recv, h.send_counts),
                            unpack=lambda: wire.sum_rows(fmt, recv, h.send_counts, h.send_token, t))
        p = h.hier
        # Stage A (mirror of stage 2): rows go back to their forwarder, in the order it sent them.
        send_a = wire.pack(fmt, fields, p.s2_recv_counts, status, row_index=p.final_inverse)
        recv_a, _ = self.intra.all_to_all_rows(send_a, plus_status(p.s2_recv_counts), plus_status(p.s2_send_counts))
        merged = wire.merged_status(recv_a, p.s2_send_counts, status)
        # The forwarder sums the rows of one token from its node: one row per (token, node) crosses back.
        m1 = sum(p.s1_recv_counts)
        partial = wire.sum_rows(fmt, recv_a, p.s2_send_counts, p.s2_send_row, m1)
        wire_dtypes = {f.name: f.dtype for f in fmt.fields}
        partial = {k: v.to(wire_dtypes[k]) for k, v in partial.items()}
        send_b = wire.pack(fmt, partial, p.s1_recv_counts, merged)
        recv_b, work = self.inter.all_to_all_rows(send_b, plus_status(p.s1_recv_counts), plus_status(p.s1_send_counts),
                                                  async_op)
        return Transfer(self._hier_traffic(p.s1_recv_counts, p.s2_recv_counts, fmt.row_bytes),
                        arrive=_waiter(work), check=self._checker(op, recv_b, p.s1_send_counts),
                        unpack=lambda: wire.sum_rows(fmt, recv_b, p.s1_send_counts, p.s1_send_token, t))


class CollectiveTransport(RowEngine):
    """``transport="collective"``: every exchange is a torch.distributed all-to-all over the Buffer's group
    (and, on the two-stage path, its node sub-groups ``node_groups.inter`` / ``node_groups.intra``)."""

    name = "collective"

    def __init__(self, comm: Comm, node_layout: NodeLayout, node_groups=None):
        inter = intra = None
        if node_groups is not None:
            me = comm.rank
            inter = Comm(node_groups.inter, node_layout.num_nodes, node_layout.node_of(me), comm.timeout, comm.on_fail)
            intra = Comm(node_groups.intra, node_layout.ranks_per_node, node_layout.local_of(me), comm.timeout,
                         comm.on_fail)
        super().__init__(comm, node_layout, inter, intra)
