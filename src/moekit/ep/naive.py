"""NaiveBuffer: the baseline dispatcher — one row per (token, expert) pair, as Megatron's all-to-all
token dispatcher sends them. Same call signatures as :class:`moekit.ep.Buffer`, flat path only.

A token with three experts on one rank sends three copies of its row there. Each received row carries
one expert: ``recv_topk_idx`` / ``recv_topk_weights`` are ``[M, 1]`` (local expert id, its weight).
No collective error handling (it is a baseline): bad input raises locally.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import dist as mdist
from .._util import round_up
from .dispatcher import CombineOutput, DispatchOutput
from .event import EventOverlap
from .stats import Traffic, TrafficStats, traffic_by_peer
from .transport import Comm


class NaiveHandle(NamedTuple):
    num_tokens: int
    send_token: torch.Tensor  # [S] token of each sent row (rank-major, then token, then k)
    send_counts: list[int]
    recv_counts: list[int]


class NaiveBuffer:
    """Per-(token, expert) all-to-all dispatch/combine; row bytes = H * itemsize + 8 (int32 id, fp32 weight)."""

    def __init__(self, group=None, *, ranks_per_node: int | None = None, **_ignored):
        self.group = group
        self.num_ranks = mdist.world_size(group)
        self.rank = mdist.rank(group)
        self.layout = mdist.node_layout(group, ranks_per_node)
        self._comm = Comm(group, self.num_ranks, self.rank)
        self.stats = TrafficStats()

    def _traffic(self, counts: list[int], row_bytes: int) -> Traffic:
        return traffic_by_peer([c * row_bytes for c in counts], self.layout, self.rank)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                 *, expert_alignment: int = 1, **_ignored) -> DispatchOutput:
        """``x`` [T, H] float, ``topk_idx`` [T, K] int64, ``topk_weights`` [T, K] fp32 → one row per valid pair.

        Rows are ordered by source rank, then token, then k. Not differentiable.
        """
        r = self.num_ranks
        if num_experts % r:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the number of ranks ({r})")
        epr = num_experts // r
        t, k = topk_idx.shape
        flat = topk_idx.flatten()
        pair = torch.nonzero(flat >= 0).flatten()  # pairs in (token, k) order
        dest = flat[pair] // epr
        order = torch.sort(dest, stable=True).indices  # rank-major, then (token, k)
        pair = pair[order]
        send_token = pair // k
        send_counts = torch.bincount(dest, minlength=r).tolist()
        counts = torch.tensor([send_counts], dtype=torch.int64).repeat(r, 1).t().contiguous()  # row d -> to d
        recv_counts = [int(v) for v in self._comm.exchange_fixed(counts)[:, 0].tolist()]
        ids = (flat[pair] - dest[order] * epr).to(torch.int32).unsqueeze(1)
        ws = topk_weights.flatten()[pair].unsqueeze(1)
        recv_x, _ = self._comm.all_to_all_rows(x.index_select(0, send_token), send_counts, recv_counts)
        recv_ids, _ = self._comm.all_to_all_rows(ids, send_counts, recv_counts)
        recv_w, _ = self._comm.all_to_all_rows(ws, send_counts, recv_counts)
        # Megatron receives per-expert counts as well: the same all-to-all as ours, counted as free.
        per_expert = torch.bincount(recv_ids.flatten().long(), minlength=epr).tolist()
        per_expert = [round_up(c, expert_alignment) for c in per_expert]
        self.stats.record(self._traffic(send_counts, x.shape[1] * x.element_size() + 8))
        h = NaiveHandle(t, send_token, send_counts, recv_counts)
        return DispatchOutput(recv_x, recv_ids.long(), recv_w, per_expert, h, EventOverlap())

    def combine(self, x: torch.Tensor, handle: NaiveHandle, **_ignored) -> CombineOutput:
        """``x`` [M, H] in dispatch order → ``[T, H]``: the rows of each token summed (fp32), in x's dtype."""
        back, _ = self._comm.all_to_all_rows(x.contiguous(), handle.recv_counts, handle.send_counts)
        out = torch.zeros(handle.num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, handle.send_token, back.float())
        self.stats.record(self._traffic(handle.recv_counts, x.shape[1] * x.element_size()))
        return CombineOutput(out.to(x.dtype), EventOverlap())
