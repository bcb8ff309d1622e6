"""Virtual ranks: N ranks' heaps in one process, the symmetric transport's kernels launched for each.

This is how one device (one H200, or the CPU) runs and measures the communication kernels of a whole
node: ``VirtualGroup(8, "cuda", num_sms=20)`` holds eight heaps on one GPU, and a dispatch launches every
rank's push kernel (exactly ``num_sms`` programs each) before any rank waits — the same two phases a
``return_recv_hook`` splits a real rank's exchange into. Inputs and outputs are per-rank lists in
:class:`~moekit.ep.Buffer`'s formats, so a test compares them with a real multi-process run.

Shape legend: R virtual ranks; per rank r: T_r tokens, M_r received rows; H hidden, K topk, E experts.
"""

from __future__ import annotations

import torch

from .._util import check_positive_int, round_up
from ..dist import NodeLayout
from . import checks
from . import handle as hmod
from .buffer import CombineOutput, DispatchOutput
from .errors import OK, DispatchMeta, InputError, dtype_code, meta_mismatch, raise_status
from .event import EventOverlap
from .fp8 import FP8_DTYPE
from .handle import DispatchHandle, dispatch_row_format
from .heap import virtual_heaps
from .layout import token_ranks, tokens_per_expert
from .stats import TrafficStats
from .transport import Comm, Rows
from .transport.symmetric import DEFAULT_TIMEOUT_S, SymmetricTransport
from .wire import Chunks, RowFormat


class VirtualGroup:
    """``world_size`` virtual ranks on ``device``, communicating through the symmetric transport (flat path).

    Args:
        world_size: R. device: where every rank's tensors and heap live (``"cpu"`` runs the kernels in
            Triton's interpreter). num_sms: K, the exact grid of every communication kernel.
        heap_bytes: bytes of each rank's heap (two receive areas of R slots). timeout: bound of every wait.
        guard_bytes: guard bytes around every heap (``heaps[r].guards_intact()``: nothing written out of bounds).

    ``stats[r]`` counts rank r's traffic like ``Buffer.stats``.
    """

    def __init__(self, world_size: int, device: torch.device | str = "cpu", *, num_sms: int = 20,
                 heap_bytes: int = 8 << 20, timeout: float = DEFAULT_TIMEOUT_S, guard_bytes: int = 0):
        check_positive_int("world_size", world_size)
        check_positive_int("num_sms", num_sms)
        self.world_size, self.device, self.num_sms = world_size, torch.device(device), num_sms
        self.node_layout = NodeLayout(world_size, world_size)
        self.heaps = virtual_heaps(world_size, heap_bytes, self.device, guard_bytes)
        self.transports = [SymmetricTransport(Comm(None, world_size, r), self.node_layout, h, num_sms=num_sms,
                                              timeout=timeout) for r, h in enumerate(self.heaps)]
        self.stats = [TrafficStats() for _ in range(world_size)]
        self._key = ("virtual", id(self))

    @property
    def layout(self) -> NodeLayout:
        """The old name of :attr:`node_layout` (read-only), kept for code that reads it; "layout" otherwise
        means a dispatch layout (``Buffer.get_dispatch_layout``)."""
        return self.node_layout

    def _check_lists(self, name: str, values) -> list:
        if not isinstance(values, (list, tuple)) or len(values) != self.world_size:
            raise ValueError(f"{name} must be a list of {self.world_size} per-rank values, got "
                             f"{type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'}")
        return list(values)

    def dispatch(self, xs, topk_idxs, topk_weights, num_experts: int, *, fp8: bool = False,
                 expert_alignment: int = 1) -> list[DispatchOutput]:
        """Every rank's :meth:`Buffer.dispatch`, at once. ``xs[r]`` ``[T_r, H]`` (or an FP8 pair),
        ``topk_idxs[r]`` ``[T_r, K]`` int64, ``topk_weights[r]`` ``[T_r, K]`` float32 or None (all None or none).

        Returns one :class:`DispatchOutput` per rank, identical to what rank r of a Buffer over R processes
        gets. Phases: plan on the host (a host sync: counts), push for every rank, then every rank waits
        and unpacks. Bad input: the ValueError/TypeError a Buffer raises, naming the rank.
        """
        r = self.world_size
        xs, idxs = self._check_lists("xs", xs), self._check_lists("topk_idxs", topk_idxs)
        ws = self._check_lists("topk_weights", topk_weights if topk_weights is not None else [None] * r)
        infos, metas = [], []
        for s in range(r):
            try:
                info, k, e = checks.check_dispatch(xs[s], idxs[s], ws[s], num_experts, r, fp8, expert_alignment)
            except InputError as err:
                raise_status("dispatch", err.status(s), r)
            wire_fp8 = info.is_pair or fp8
            x_dtype = torch.bfloat16 if info.is_pair else info.data.dtype
            infos.append((info, k, e, wire_fp8, x_dtype))
            metas.append(DispatchMeta(hidden=info.hidden, x_dtype=dtype_code(x_dtype), num_experts=e, num_topk=k,
                                      fp8=int(wire_fp8), has_weights=int(ws[s] is not None)))
        raise_status("dispatch", meta_mismatch(metas), r)
        e = infos[0][2]
        epr = e // r
        in_rank = [token_ranks(idxs[s], e, r) for s in range(r)]  # [T_s, R] each
        per_expert = [tokens_per_expert(idxs[s], e) for s in range(r)]  # [E] each
        sent = torch.stack([ir.sum(0) for ir in in_rank]).tolist()  # [R, R]: rows s -> d
        handles, transfers, posts = [], [], []
        for s in range(r):
            info, k, _, wire_fp8, x_dtype = infos[s]
            weights = ws[s] is not None
            fmt = dispatch_row_format(FP8_DTYPE if wire_fp8 else x_dtype, info.hidden, wire_fp8, k, weights)
            send_counts, send_token = hmod.flat_send_plan(in_rank[s])
            recv_counts = Chunks(sent[src][s] for src in range(r))
            received = sum(pe[s * epr:(s + 1) * epr] for pe in per_expert).tolist()
            h = DispatchHandle(
                key=self._key, rank=s, node_layout=self.node_layout, num_experts=e, num_tokens=info.num_tokens,
                hidden=info.hidden, x_dtype=x_dtype, is_token_in_rank=in_rank[s], num_recv_tokens=sum(recv_counts),
                num_recv_tokens_per_expert_list=[round_up(c, expert_alignment) for c in received],
                send_counts=send_counts, recv_counts=recv_counts, send_token=send_token, dispatch_format=fmt,
                topk_idx=idxs[s].to(torch.int32), topk_weights=ws[s].detach().clone() if weights else None)
            fields = hmod.dispatch_fields(info, wire_fp8, x_dtype, h.topk_idx, ws[s] if weights else None)
            transfers.append(self.transports[s].dispatch("dispatch", h, Rows(fmt, fields, OK)))  # push only
            self.stats[s].record(transfers[-1].traffic)
            handles.append(h)
            posts.append(weights)
        outs = []
        for s in range(r):
            got = transfers[s].wait()  # every rank has pushed: the flags are set
            h, lo = handles[s], s * epr
            local = got["idx"].long() - lo
            mine = (got["idx"] >= 0) & (local >= 0) & (local < epr)
            recv_idx = torch.where(mine, local, -1)
            recv_w = torch.where(mine, got["w"], 0.0) if posts[s] else None
            recv_x = (got["x"], got["scales"]) if h.fp8 else got["x"]
            outs.append(DispatchOutput(recv_x, recv_idx, recv_w, list(h.num_recv_tokens_per_expert_list), h,
                                       EventOverlap()))
        return outs

    def combine(self, ys, handles) -> list[CombineOutput]:
        """Every rank's :meth:`Buffer.combine`, at once: ``ys[r]`` ``[M_r, H]`` float rows in dispatch order,
        ``handles[r]`` from :meth:`dispatch`. Returns ``CombineOutput(combined_x [T_r, H] in ys[r]'s dtype)``
        per rank: each token's rows summed in float32 in rank order (bitwise reproducible)."""
        r = self.world_size
        ys, handles = self._check_lists("ys", ys), self._check_lists("handles", handles)
        transfers = []
        for s, (y, h) in enumerate(zip(ys, handles)):
            if not isinstance(h, DispatchHandle) or h.key != self._key or h.rank != s:
                raise ValueError(f"handles[{s}] must be rank {s}'s handle from this VirtualGroup's dispatch")
            try:
                checks.check_combine_x(y, h.num_recv_tokens, h.hidden)
            except InputError as err:
                raise_status("combine", err.status(s), r)
            fmt = RowFormat([("x", h.x_dtype, h.hidden)])
            transfers.append(self.transports[s].combine("combine", h, Rows(fmt, {"x": y.detach().to(h.x_dtype)}, OK)))
            self.stats[s].record(transfers[-1].traffic)
        return [CombineOutput(t.wait()["x"].to(y.dtype), EventOverlap()) for t, y in zip(transfers, ys)]
