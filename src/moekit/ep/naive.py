"""NaiveBuffer: the baseline dispatcher — one row per (token, expert) pair, as Megatron's all-to-all
token dispatcher sends them. A :class:`moekit.ep.Dispatcher` (flat path only), trainable through the
same autograd pair as :class:`moekit.ep.Buffer` (``moekit.ep.autograd``).

A token with three experts on one rank sends three copies of its row there. Each received row carries
one expert: ``recv_topk_idx`` / ``recv_topk_weights`` are ``[M, 1]`` (local expert id, its weight).
No FP8 (rows travel in x's dtype), no cached dispatch, no collective error handling (it is a
baseline): bad input raises locally.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import dist as mdist
from .._util import round_up
from .autograd import CombineFn, DispatchFn, wait_now
from .dispatcher import BackwardHook, CombineOutput, DispatchOutput, WeightedCombineOutput
from .event import EventOverlap
from .stats import Traffic, TrafficStats, traffic_by_peer
from .transport import Comm


class NaiveHandle(NamedTuple):
    num_tokens: int
    hidden: int
    topk: int  # K
    send_pair: torch.Tensor  # [S] (token, k) flat index of each sent row (rank-major, then token, then k)
    send_token: torch.Tensor  # [S] token of each sent row
    send_counts: list[int]
    recv_counts: list[int]


class NaiveBuffer:
    """Per-(token, expert) all-to-all dispatch/combine; row bytes = H * itemsize + 8 (int32 id, fp32 weight)."""

    def __init__(self, group=None, *, ranks_per_node: int | None = None, **_ignored):
        self.group = group
        self.num_ranks = mdist.world_size(group)
        self.rank = mdist.rank(group)
        self.node_layout = mdist.node_layout(group, ranks_per_node)
        self._comm = Comm(group, self.num_ranks, self.rank)
        self.stats = TrafficStats()

    def _traffic(self, counts: list[int], row_bytes: int) -> Traffic:
        return traffic_by_peer([c * row_bytes for c in counts], self.node_layout, self.rank)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                 *, expert_alignment: int = 1, backward_hook: BackwardHook | None = None,
                 **_ignored) -> DispatchOutput:
        """``x`` [T, H] float, ``topk_idx`` [T, K] int64, ``topk_weights`` [T, K] fp32 → one row per valid pair.

        Rows are ordered by source rank, then token, then k. Host sync: the counts exchange. Differentiable
        in x and topk_weights (backward: a combine of both, collective); synchronous.
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
        send_counts = torch.bincount(dest, minlength=r).tolist()
        counts = torch.tensor([send_counts], dtype=torch.int64).repeat(r, 1).t().contiguous()  # row d -> to d
        recv_counts = [int(v) for v in self._comm.exchange_fixed(counts)[:, 0].tolist()]
        h = NaiveHandle(t, x.shape[1], k, pair, pair // k, send_counts, recv_counts)
        ids = (flat[pair] - dest[order] * epr).to(torch.int32).unsqueeze(1)
        recv_ids, _ = self._comm.all_to_all_rows(ids, send_counts, recv_counts)
        # Megatron receives per-expert counts as well: the same all-to-all as ours, counted as free.
        per_expert = torch.bincount(recv_ids.flatten().long(), minlength=epr).tolist()
        per_expert = [round_up(c, expert_alignment) for c in per_expert]

        def run():
            recv_x = self._send(x.detach().index_select(0, h.send_token), h, 8)  # (+ the id and the weight)
            recv_w = self._send(topk_weights.detach().flatten()[pair].unsqueeze(1), h, None)
            return recv_x, recv_ids.long(), recv_w

        if torch.is_grad_enabled() and (x.requires_grad or topk_weights.requires_grad):
            recv_x, recv_idx, recv_w = DispatchFn.apply(self, backward_hook, h, run, x, topk_weights)
        else:
            recv_x, recv_idx, recv_w = run()
        return DispatchOutput(recv_x, recv_idx, recv_w, per_expert, h, EventOverlap())

    def combine(self, x: torch.Tensor, handle: NaiveHandle, *, topk_weights: torch.Tensor | None = None,
                backward_hook: BackwardHook | None = None, **_ignored):
        """``x`` [M, H] in dispatch order → ``[T, H]``: the rows of each token summed (fp32), in x's dtype.
        ``topk_weights`` [M, 1] fp32: each row's weight back in its (token, k) slot, ``[T, K]`` fp32.
        Differentiable in x (backward: a dispatch of the gradient, collective); synchronous."""
        run = (lambda: self._sum_home(x.detach(), handle))
        y = CombineFn.apply(self, backward_hook, handle, run, x) if torch.is_grad_enabled() \
            and x.requires_grad else run()
        if topk_weights is None:
            return CombineOutput(y, EventOverlap())
        return WeightedCombineOutput(y, self._weights_home(topk_weights.detach().float(), handle), EventOverlap())

    # ---- the exchanges, shared by the forward calls and the backward's ----------------------------
    def _send(self, rows: torch.Tensor, h: NaiveHandle, extra_bytes: int | None) -> torch.Tensor:
        """Rows ``[S, B]`` to their ranks → ``[M, B]``; counted with ``extra_bytes`` per row (None: not counted
        apart, the dispatch's weight travels in its row)."""
        recv, _ = self._comm.all_to_all_rows(rows.contiguous(), h.send_counts, h.recv_counts)
        if extra_bytes is not None:
            self.stats.record(self._traffic(h.send_counts, rows.shape[1] * rows.element_size() + extra_bytes))
        return recv

    def _back(self, rows: torch.Tensor, h: NaiveHandle) -> torch.Tensor:
        """Rows ``[M, B]`` back to their senders → ``[S, B]`` in sending order (counted)."""
        back, _ = self._comm.all_to_all_rows(rows.contiguous(), h.recv_counts, h.send_counts)
        self.stats.record(self._traffic(h.recv_counts, rows.shape[1] * rows.element_size()))
        return back

    def _sum_home(self, x: torch.Tensor, h: NaiveHandle) -> torch.Tensor:
        out = torch.zeros(h.num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, h.send_token, self._back(x, h).float())
        return out.to(x.dtype)

    def _weights_home(self, w: torch.Tensor, h: NaiveHandle) -> torch.Tensor:
        out = torch.zeros(h.num_tokens * h.topk, dtype=torch.float32, device=w.device)
        out.index_put_((h.send_pair,), self._back(w, h).flatten())
        return out.view(h.num_tokens, h.topk)

    # ---- moekit.ep.autograd.GradExchange: the backward passes ----------------------------------
    # The backward of a dispatch is a combine (with the weights' reverse all-to-all), that of a combine a
    # forward all-to-all of the gradient rows. Synchronous: the hook gets a launch that completes at once.
    # Every rank sends x and weight rows (zeros where it has no gradient): the collectives must match.
    def combine_grads(self, h: NaiveHandle, gx, gw, x_dtype, hook: BackwardHook = wait_now):
        """``gx`` [M, H], ``gw`` [M, 1] fp32 (either may be None) → ``(grad_x [T, H] in x_dtype or None,
        grad_w [T, K] fp32 or None)``. Collective."""
        m = sum(h.recv_counts)
        out = {}

        def launch(_async_finish: bool) -> EventOverlap:
            x = gx if gx is not None else torch.zeros(m, h.hidden, dtype=x_dtype, device=h.send_token.device)
            w = gw.float() if gw is not None else torch.zeros(m, 1, dtype=torch.float32, device=x.device)
            out["x"], out["w"] = self._sum_home(x, h).to(x_dtype), self._weights_home(w, h)
            return EventOverlap()

        hook(launch)
        return (out["x"] if gx is not None else None), (out["w"] if gw is not None else None)

    def dispatch_grads(self, h: NaiveHandle, g: torch.Tensor, hook: BackwardHook = wait_now) -> torch.Tensor:
        """``g`` [T, H] → ``[M, H]``: each row's token's gradient. Collective."""
        out = []

        def launch(_async_finish: bool) -> EventOverlap:
            out.append(self._send(g.index_select(0, h.send_token), h, 0))
            return EventOverlap()

        hook(launch)
        return out[0]
