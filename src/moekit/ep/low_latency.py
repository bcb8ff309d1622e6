"""Low-latency dispatch/combine: fixed capacity, no host synchronisation, per-expert (masked) layout.

Shape legend: T tokens on this rank (T <= C), C = ``num_max_dispatch_tokens_per_rank``, E experts,
R ranks, L = E / R local experts, H hidden.

Every rank sends every rank a fixed-size block ``[L, C, row]`` (slot j of expert e = the j-th token of
the sender that chose e, in token order), so all sizes are known without a counts exchange and the
whole exchange is two ``all_to_all_single`` calls of fixed size (rows and per-expert counts) that
never wait for the host: CUDA-graph friendly. A token is sent once per chosen *expert* (like DeepEP's
low-latency kernels), since the layout is per expert. The receiver packs each expert's rows, ordered
by source rank then token, at the front of ``recv_x[e]`` (``[L, R * C, H]``); ``recv_count[e]`` says
how many are valid (the rest is zero).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .checks import FLOAT_DTYPES
from .event import EventOverlap
from .fp8 import FP8_DTYPE, num_scale_cols, quantize_1x128
from .stats import Traffic
from .wire import RowFormat


@dataclasses.dataclass(eq=False)
class LowLatencyHandle:
    num_tokens: int
    capacity: int  # C
    num_experts: int
    hidden: int
    slot: torch.Tensor  # [T, E] int64: slot of token t in expert e's block (valid where chosen)
    counts: torch.Tensor  # [R, L] int64 on the receiver: rows from source s for local expert e


class LowLatencyDispatchOutput(NamedTuple):
    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [L, R*C, H] or (e4m3, fp32 scales [L, R*C, H/128])
    recv_count: torch.Tensor  # [L] int64 (device): valid rows per local expert
    handle: LowLatencyHandle
    event: EventOverlap
    hook: object  # callable completing the receive when return_recv_hook=True, else None


class LowLatencyCombineOutput(NamedTuple):
    combined_x: torch.Tensor  # [T, H]
    event: EventOverlap
    hook: object


def _traffic(buffer, per_peer_bytes: int) -> Traffic:
    t, lay, me = Traffic(), buffer.layout, buffer.rank
    for r in range(buffer.num_ranks):
        if r == me:
            t.self_bytes += per_peer_bytes
        elif lay.node_of(r) == lay.node_of(me):
            t.intra_node_bytes += per_peer_bytes
        else:
            t.inter_node_bytes += per_peer_bytes
    return t


def _packed_index(counts: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each local expert e and packed position j < R*C: the (source * C + slot) row of the fixed
    block it comes from, and whether j is valid. ``counts`` [R, L]. Device-only (no host sync)."""
    r, l = counts.shape
    cum = torch.cumsum(counts.t(), dim=1)  # [L, R]
    j = torch.arange(r * capacity, device=counts.device).expand(l, -1).contiguous()  # [L, R*C]
    src = torch.searchsorted(cum, j, right=True)  # [L, R*C]
    valid = src < r
    src = src.clamp(max=r - 1)
    start = cum.gather(1, src) - counts.t().gather(1, src)
    return src * capacity + (j - start).clamp(0, capacity - 1), valid  # invalid j: any in-range row


def _finish(event_works, async_finish: bool, return_recv_hook: bool, finish):
    if async_finish or return_recv_hook:
        ev = EventOverlap(event_works, finish=finish)
        return ev, (ev.wait if return_recv_hook else None)
    for w in event_works:
        w.wait()
    finish()
    return EventOverlap(), None


def low_latency_dispatch(buffer, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, *, use_fp8: bool = True, async_finish: bool = False,
                         return_recv_hook: bool = False) -> LowLatencyDispatchOutput:
    r, c = buffer.num_ranks, int(num_max_dispatch_tokens_per_rank)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a 2-D bf16/fp16/fp32 tensor, got {getattr(x, 'dtype', type(x))}")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or topk_idx.dim() != 2 \
            or topk_idx.shape[0] != x.shape[0]:
        raise ValueError("topk_idx must be int64 [num_tokens, num_topk] with the num_tokens of x")
    t, h = x.shape
    if t > c:
        raise ValueError(f"num_tokens ({t}) exceeds num_max_dispatch_tokens_per_rank ({c})")
    if num_experts % r:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of the number of ranks ({r})")
    if use_fp8 and h % 128:
        raise ValueError(f"use_fp8 needs a hidden size that is a multiple of 128, got {h}")
    e, l = num_experts, num_experts // r
    device = x.device
    chosen = torch.zeros(t, e + 1, dtype=torch.bool, device=device)
    chosen.scatter_(1, torch.where(topk_idx >= 0, topk_idx, e), True)
    chosen = chosen[:, :e]  # [T, E]
    slot = torch.cumsum(chosen.long(), 0) - 1  # [T, E]
    counts = chosen.sum(0)  # [E]
    spec = [("x", FP8_DTYPE if use_fp8 else x.dtype, h)] + ([("scales", torch.float32, num_scale_cols(h))]
                                                           if use_fp8 else [])
    fmt = RowFormat(spec)
    fields = dict(zip(("x", "scales"), quantize_1x128(x))) if use_fp8 else {"x": x}
    # One copy per (token, k) into its slot; masked entries go to a spare last row. No nonzero(): its
    # output size would need a host sync.
    valid = topk_idx >= 0
    ex = torch.where(valid, topk_idx, 0)
    dest_rows = torch.where(valid, ex * c + slot.gather(1, ex), e * c).flatten()  # [T*K]
    tok = torch.arange(t, device=device).repeat_interleave(topk_idx.shape[1])
    send = torch.zeros(e * c + 1, fmt.row_bytes, dtype=torch.uint8, device=device)
    views = fmt.views(send)
    for name, v in fields.items():
        dst = views[name]
        if v.dtype == FP8_DTYPE:  # index_copy_ has no float8 kernel: move the bytes
            dst, v = dst.view(torch.uint8), v.view(torch.uint8)
        dst.index_copy_(0, dest_rows, v.index_select(0, tok))
    send = send[: e * c]
    comm = buffer._engine.comm
    per_peer = [l * c] * r
    recv, work = comm.all_to_all_rows(send, per_peer, per_peer, async_op=async_finish or return_recv_hook)
    recv_counts, work_c = comm.all_to_all_rows(counts.view(r, l), [1] * r, [1] * r,
                                               async_op=async_finish or return_recv_hook)
    buffer.stats.record(_traffic(buffer, l * c * fmt.row_bytes))
    recv_x = torch.empty(l, r * c, h, dtype=spec[0][1], device=device)
    recv_scales = torch.empty(l, r * c, num_scale_cols(h), dtype=torch.float32, device=device) if use_fp8 else None
    recv_count = torch.empty(l, dtype=torch.int64, device=device)
    handle = LowLatencyHandle(t, c, e, h, slot, recv_counts)

    @torch.no_grad()
    def finish():
        src_row, valid = _packed_index(recv_counts, c)  # [L, R*C]
        got = fmt.views(recv.view(r, l, c, fmt.row_bytes).transpose(0, 1).reshape(l * r * c, fmt.row_bytes))
        flat = (torch.arange(l, device=device).unsqueeze(1) * (r * c) + src_row).flatten()
        for name, out in (("x", recv_x), ("scales", recv_scales)):
            if out is not None:
                rows = got[name].index_select(0, flat).view(l, r * c, -1)
                out.copy_(torch.where(valid.unsqueeze(2), rows, torch.zeros((), dtype=rows.dtype, device=device))
                          if rows.dtype != FP8_DTYPE else
                          torch.where(valid.unsqueeze(2), rows.view(torch.uint8), 0).view(FP8_DTYPE))
        recv_count.copy_(recv_counts.sum(0))

    event, hook = _finish([w for w in (work, work_c) if w], async_finish, return_recv_hook, finish)
    out_x = (recv_x, recv_scales) if use_fp8 else recv_x
    return LowLatencyDispatchOutput(out_x, recv_count, handle, event, hook)


def low_latency_combine(buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        handle: LowLatencyHandle, *, async_finish: bool = False,
                        return_recv_hook: bool = False) -> LowLatencyCombineOutput:
    r, c, e, t = buffer.num_ranks, handle.capacity, handle.num_experts, handle.num_tokens
    l = e // r
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != (l, r * c) \
            or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be bf16/fp16/fp32 [{l}, {r * c}, hidden], got "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x))}")
    if topk_idx.shape != topk_weights.shape or topk_idx.shape[0] != t:
        raise ValueError(f"topk_idx and topk_weights must both be [{t}, num_topk]")
    h, device = x.shape[2], x.device
    # Back to the fixed block layout [R, L, C, H]: row (s, e, j) = packed row offset[e, s] + j.
    counts = handle.counts  # [R, L]
    start = torch.cumsum(counts, 0) - counts  # [R, L]
    j = torch.arange(c, device=device)
    pos = start.unsqueeze(2) + j  # [R, L, C]
    valid = j < counts.unsqueeze(2)
    pos = torch.where(valid, pos, 0)
    rows = x.gather(1, pos.permute(1, 0, 2).reshape(l, r * c, 1).expand(l, r * c, h))  # [L, R*C, H]
    rows = rows.view(l, r, c, h).transpose(0, 1)  # [R, L, C, H]
    send = torch.where(valid.unsqueeze(3), rows, torch.zeros((), dtype=x.dtype, device=device))
    send = send.reshape(r * l * c, h).contiguous()
    comm = buffer._engine.comm
    per_peer = [l * c] * r
    back, work = comm.all_to_all_rows(send, per_peer, per_peer, async_op=async_finish or return_recv_hook)
    buffer.stats.record(_traffic(buffer, l * c * h * x.element_size()))
    out = torch.empty(t, h, dtype=x.dtype, device=device)

    @torch.no_grad()
    def finish():
        valid_k = topk_idx >= 0
        ex = torch.where(valid_k, topk_idx, 0)  # [T, K]
        sl = handle.slot.gather(1, ex)  # [T, K]
        got = back.view(e * c, h).index_select(0, (ex * c + sl).flatten().clamp(min=0)).view(*ex.shape, h)
        w = torch.where(valid_k, topk_weights.float(), 0.0)
        out.copy_((got.float() * w.unsqueeze(2)).sum(1))

    event, hook = _finish([work] if work else [], async_finish, return_recv_hook, finish)
    return LowLatencyCombineOutput(out, event, hook)
