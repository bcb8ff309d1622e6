"""Moving packed rows along a DispatchHandle's plan: forward (dispatch direction) and reverse (combine).

Each function returns ``(works, finish, check, traffic)``: pending gloo works (CPU async only), the
step that unpacks the received rows and hands them to ``post``, the step that raises the collective
input error if any rank reported one, and the bytes sent per hop kind.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..dist import NodeLayout
from . import wire
from .errors import Status, first_failure, raise_status
from .handle import DispatchHandle
from .stats import Traffic, traffic_by_peer
from .transport import Comm

Post = Callable[[dict[str, torch.Tensor]], None]


def _plus1(counts: list[int]) -> list[int]:
    return [c + 1 for c in counts]  # + the status row of each chunk


class Engine:
    """The communicators of one Buffer: the whole group, and (two-stage path) the node sub-groups."""

    def __init__(self, comm: Comm, layout: NodeLayout, node_groups=None):
        self.comm, self.layout = comm, layout
        me = comm.rank
        if node_groups is not None:
            self.inter = Comm(node_groups.inter, layout.num_nodes, layout.node_of(me), comm.timeout, comm.on_fail)
            self.intra = Comm(node_groups.intra, layout.ranks_per_node, layout.local_of(me), comm.timeout,
                              comm.on_fail)

    # ---- traffic -------------------------------------------------------------------------------
    def _flat_traffic(self, counts: list[int], row_bytes: int) -> Traffic:
        return traffic_by_peer([c * row_bytes for c in counts], self.layout, self.comm.rank)

    def _hier_traffic(self, inter_counts: list[int], intra_counts: list[int], row_bytes: int) -> Traffic:
        t = Traffic()
        for n, c in enumerate(inter_counts):
            if n == self.inter.rank:
                t.self_bytes += c * row_bytes
            else:
                t.inter_node_bytes += c * row_bytes
        for l, c in enumerate(intra_counts):
            if l == self.intra.rank:
                t.self_bytes += c * row_bytes
            else:
                t.intra_node_bytes += c * row_bytes
        return t

    @staticmethod
    def _checker(op: str, buf: torch.Tensor, counts: list[int], world: int) -> Callable[[], None]:
        return lambda: raise_status(op, first_failure(wire.read_statuses(buf, counts)), world)

    # ---- dispatch direction ---------------------------------------------------------------------
    def forward(self, op: str, h: DispatchHandle, fmt: wire.RowFormat, fields: dict[str, torch.Tensor],
                status: Status, post: Post, cpu_async: bool,
                stage2_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
                out: dict[str, torch.Tensor] | None = None):
        """Send token rows (``fields[name]`` [T, w]) to their destinations; ``post`` gets ``{name: [M, w]}``
        in (source rank, token) order (written into ``out[name]`` where given)."""
        world = self.layout.world_size
        if h.hier is None:
            send = wire.pack(fmt, fields, h.send_counts, status, row_index=h.send_token)
            recv, work = self.comm.all_to_all_rows(send, _plus1(h.send_counts), _plus1(h.recv_counts), cpu_async)
            finish = lambda: post(wire.unpack(fmt, recv, h.recv_counts, out=out))
            traffic = self._flat_traffic(h.send_counts, fmt.row_bytes)
            return [work] if work else [], finish, self._checker(op, recv, h.recv_counts, world), traffic
        p = h.hier
        # Stage 1: one row per (token, destination node), to the rank with my local index there.
        send1 = wire.pack(fmt, fields, p.s1_send_counts, status, row_index=p.s1_send_token)
        recv1, _ = self.inter.all_to_all_rows(send1, _plus1(p.s1_send_counts), _plus1(p.s1_recv_counts))
        if p.s2_send_row is None:
            assert stage2_rows is not None, "the first dispatch of a handle must carry topk_idx"
            _, data_pos = wire.positions(p.s1_recv_counts, recv1.device)
            p.s2_send_row = stage2_rows(fmt.views(recv1)["idx"].index_select(0, data_pos))
        # Stage 2: forward the received rows, bytes untouched, to the ranks of this node that need them.
        merged = wire.merged_status(recv1, p.s1_recv_counts, status)
        send2 = wire.forward_rows(recv1, p.s1_recv_counts, p.s2_send_counts, p.s2_send_row, merged)
        recv2, work = self.intra.all_to_all_rows(send2, _plus1(p.s2_send_counts), _plus1(p.s2_recv_counts),
                                                 cpu_async)
        finish = lambda: post(wire.unpack(fmt, recv2, p.s2_recv_counts, row_index=p.final_index, out=out))
        traffic = self._hier_traffic(p.s1_send_counts, p.s2_send_counts, fmt.row_bytes)
        return [work] if work else [], finish, self._checker(op, recv2, p.s2_recv_counts, world), traffic

    # ---- combine direction ----------------------------------------------------------------------
    def reverse(self, op: str, h: DispatchHandle, fmt: wire.RowFormat, fields: dict[str, torch.Tensor],
                status: Status, post: Post, cpu_async: bool):
        """Send received rows (``fields[name]`` [M, w]) back; ``post`` gets ``{name: [T, w]}`` float32 sums."""
        world = self.layout.world_size
        t = h.num_tokens

        if h.hier is None:
            send = wire.pack(fmt, fields, h.recv_counts, status)
            recv, work = self.comm.all_to_all_rows(send, _plus1(h.recv_counts), _plus1(h.send_counts), cpu_async)
            finish = lambda: post(wire.sum_rows(fmt, recv, h.send_counts, h.send_token, t))
            traffic = self._flat_traffic(h.recv_counts, fmt.row_bytes)
            return [work] if work else [], finish, self._checker(op, recv, h.send_counts, world), traffic
        p = h.hier
        # Stage A (mirror of stage 2): rows go back to their forwarder, in the order it sent them.
        send_a = wire.pack(fmt, fields, p.s2_recv_counts, status, row_index=p.final_inverse)
        recv_a, _ = self.intra.all_to_all_rows(send_a, _plus1(p.s2_recv_counts), _plus1(p.s2_send_counts))
        merged = wire.merged_status(recv_a, p.s2_send_counts, status)
        # The forwarder sums the rows of one token from its node: one row per (token, node) crosses back.
        m1 = sum(p.s1_recv_counts)
        partial = wire.sum_rows(fmt, recv_a, p.s2_send_counts, p.s2_send_row, m1)
        wire_dtypes = {f.name: f.dtype for f in fmt.fields}
        partial = {k: v.to(wire_dtypes[k]) for k, v in partial.items()}
        send_b = wire.pack(fmt, partial, p.s1_recv_counts, merged)
        recv_b, work = self.inter.all_to_all_rows(send_b, _plus1(p.s1_recv_counts), _plus1(p.s1_send_counts),
                                                  cpu_async)
        finish = lambda: post(wire.sum_rows(fmt, recv_b, p.s1_send_counts, p.s1_send_token, t))
        traffic = self._hier_traffic(p.s1_recv_counts, p.s2_recv_counts, fmt.row_bytes)
        return [work] if work else [], finish, self._checker(op, recv_b, p.s1_send_counts, world), traffic
