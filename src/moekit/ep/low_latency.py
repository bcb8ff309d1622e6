"""Low-latency dispatch/combine: fixed capacity, no host synchronisation, per-expert (masked) layout.

Shape legend: T tokens on this rank (T <= C), C = ``num_max_dispatch_tokens_per_rank``, E experts,
R ranks, L = E / R local experts, H hidden, K experts per token.

Every rank sends every rank one fixed-size block: a few *header* rows (the sender's status word, the
arguments that size the exchange, and its ``[L]`` per-expert counts for that peer), then ``[L, C]``
data rows (slot j of expert e = the j-th token of the sender that chose e, in token order). All sizes
are known without a counts exchange, so a dispatch is ONE ``all_to_all_single`` that never waits for
the host. A token is sent once per chosen *expert* (like DeepEP's low-latency kernels), since the
layout is per expert. The receiver packs each expert's rows, ordered by source rank then token, at the
front of ``recv_x[e]`` (``[L, R * C, H]``); ``recv_count[e]`` says how many are valid (the rest is zero).

Errors (docs/ep.md, "Low-latency mode" and "Faults"): the header's status word makes a bad argument on
one rank an error on every rank; any other exception while a rank prepares its block becomes its status
word too (``moekit.ep.guard``), so it is the same error on every rank. On a host-check backend the
preflight also carries the call's identity (a rank calling another method is reported). Arguments that
*size* the block (H, C, E, fp8, x's dtype) must agree before the block is sent: on a host-check backend
(gloo: the host reads everything anyway) a small fixed-size exchange of status + sizes precedes the
block (it replaces the separate counts exchange of the previous design: still two collectives). On a
device backend there is no such exchange (it would be a host sync): the sizes are trusted, the status
words travel in the header and are read on the host when the call completes (``hook()`` /
``event.wait()``, or at return without them).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .._util import is_int
from .checks import FLOAT_DTYPES, check_expert_range, check_float_x, check_num_experts, check_routing
from .errors import (
    META_INTS,
    OK,
    STATUS_INTS,
    Code,
    DispatchMeta,
    InputError,
    Status,
    dtype_code,
    first_failure,
    meta_mismatch,
    raise_status,
)
from .event import EventOverlap
from .fp8 import FP8_DTYPE, num_scale_cols, quantize_1x128
from .guard import ID_INTS, identity_mismatch
from .stats import TrafficStats, traffic_by_peer
from .transport import Transfer, Transport
from .wire import STATUS_BYTES, RowFormat, ints_on


class _Sizes(NamedTuple):
    """What sizes a low-latency dispatch block; must agree on every rank."""

    hidden: int
    capacity: int  # C
    num_experts: int
    fp8: bool
    x_dtype: torch.dtype  # x's dtype: the wire dtype without FP8, and the dtype of the combine's rows

    def meta(self) -> DispatchMeta:
        return DispatchMeta(hidden=self.hidden, x_dtype=dtype_code(self.x_dtype), num_experts=self.num_experts,
                            fp8=int(self.fp8), capacity=self.capacity)

    def row_format(self) -> RowFormat:
        if self.fp8:
            return RowFormat([("x", FP8_DTYPE, self.hidden), ("scales", torch.float32, num_scale_cols(self.hidden)),
                              ("src", torch.int32, 1)])
        return RowFormat([("x", self.x_dtype, self.hidden), ("src", torch.int32, 1)])  # src: the sender's token


@dataclasses.dataclass(eq=False)
class LowLatencyHandle:
    """Opaque to users: what ``low_latency_combine`` needs from its dispatch (slots, received counts, sizes)."""

    num_tokens: int
    capacity: int  # C
    num_experts: int
    hidden: int
    slot: torch.Tensor  # [T, E] int64: slot of token t in expert e's block (valid where chosen)
    counts: torch.Tensor  # [R, L] int64 on the receiver: rows from source s for local expert e
    src_info: torch.Tensor | None = None  # [L, R*C] int32 on the receiver: source token index of each row
    x_dtype: torch.dtype = torch.bfloat16  # wire dtype of the combine (the dispatched x's dtype)
    key: tuple = ()  # the Buffer's group and node layout
    seq: int = 0  # the number of the Buffer call that made it (identity, see guard.py)


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


def _check_dispatch(x, topk_idx, capacity, num_experts, use_fp8: bool, num_ranks: int) -> _Sizes:
    """Shape/dtype checks (no value checks); raises InputError. Returns the sizes of the block."""
    check_float_x(x)
    t, h = x.shape
    check_routing(topk_idx, None, t, x.device)
    check_num_experts(num_experts, num_ranks)
    if not is_int(capacity, 1) or t > capacity:
        raise InputError(Code.LL_CAPACITY, t, capacity if is_int(capacity) else -1)
    if use_fp8 and h % 128:
        raise InputError(Code.FP8_HIDDEN, h)
    return _Sizes(h, capacity, num_experts, bool(use_fp8), x.dtype)


def _range_status(topk_idx: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """``[STATUS_INTS]`` int64 on topk_idx's device: IDX_RANGE when a value is outside ``[-1, E)``, else OK.
    Device ops only (no host sync)."""
    ok = ints_on(OK.ints(), topk_idx.device)
    if topk_idx.numel() == 0:
        return ok
    lo, hi = topk_idx.aminmax()
    bad_lo, bad = lo < -1, (lo < -1) | (hi >= num_experts)
    fail = ints_on(Status(int(Code.IDX_RANGE), rank, 0, num_experts).ints(), topk_idx.device)
    fail[2] = torch.where(bad_lo, lo, hi)  # the offending value
    return torch.where(bad, fail, ok)


def _preflight(mode: LowLatencyMode, op: str, status: Status, sizes: _Sizes | None) -> None:
    """Host-check backends: exchange ``[status | sizes | call identity]`` (fixed size, the width of the
    Buffer's other preflights, so a rank calling another method is reported rather than mismatched) and
    raise the same error on every rank: a failing rank (with a non-moekit exception's text), another
    method, or sizes that differ."""
    r, width = mode.transport.world_size, mode.width
    msg = torch.zeros(r, width, dtype=torch.int64)
    msg[:, :STATUS_INTS] = torch.tensor(status.ints(), dtype=torch.int64)
    if sizes is not None:
        msg[:, STATUS_INTS:STATUS_INTS + META_INTS] = torch.tensor(sizes.meta(), dtype=torch.int64)
    if mode.guard is not None:
        msg[:, width - ID_INTS:] = torch.tensor(mode.guard.identity(op, 0, 0, mode.key), dtype=torch.int64)
    got = mode.transport.exchange_fixed(msg).tolist()
    mode.raise_first(op, [row[:STATUS_INTS] for row in got])
    raise_status(op, identity_mismatch([row[width - ID_INTS:] for row in got]), r)
    raise_status(op, meta_mismatch(row[STATUS_INTS:STATUS_INTS + META_INTS] for row in got), r)


def _header_rows(num_ints: int, row_bytes: int) -> int:
    return -(-8 * num_ints // row_bytes)  # row_bytes is a multiple of 8


def _header_view(buf: torch.Tensor, r: int, block_rows: int, hdr: int, num_ints: int) -> torch.Tensor:
    """``[R, num_ints]`` int64 view of the header rows at the head of each peer's block of ``buf``."""
    rb = buf.shape[1]
    return buf.view(r, block_rows * rb)[:, :hdr * rb].view(torch.int64)[:, :num_ints]


def _finish(transfer: Transfer, async_finish: bool, return_recv_hook: bool, finish):
    def done():
        transfer.arrive()
        finish(transfer.unpack()["rows"])
    if async_finish or return_recv_hook:
        ev = EventOverlap(finish=done)
        return ev, (ev.wait if return_recv_hook else None)
    done()
    return EventOverlap(), None


class LowLatencyMode:
    """The low-latency exchanges of one Buffer (owned by it): fixed-capacity blocks over its transport.

    Args:
        transport: the Buffer's :class:`~moekit.ep.transport.Transport` (its ``exchange_blocks`` moves the
            block; ``exchange_fixed`` the host-check preflight).
        stats: the Buffer's traffic counters. key: the Buffer's group/node-layout key (handles carry it).
        host_checks: True on a host-check backend (gloo): sizes and statuses are exchanged before the block.
        guard: the Buffer's :class:`~moekit.ep.guard.Guard` (status words of any exception, call identity);
            width: the int64 width of the Buffer's preflight messages (``handle.msg_width``).
    """

    def __init__(self, transport: Transport, stats: TrafficStats, key: tuple, host_checks: bool,
                 msg_device: torch.device, guard=None, width: int = STATUS_INTS + META_INTS + ID_INTS):
        self.transport, self.stats, self.key = transport, stats, key
        self.host_checks, self.msg_device = host_checks, msg_device
        self.guard, self.width = guard, max(int(width), STATUS_INTS + META_INTS + ID_INTS)
        self.sizes: _Sizes | None = None  # sizes of the last valid dispatch (device backends)

    def status_of(self, err: BaseException) -> Status:
        """This rank's status word for any exception raised while preparing its block (moekit.ep.guard)."""
        if self.guard is not None:
            return self.guard.status_of(err)
        if isinstance(err, InputError):
            return err.status(self.transport.rank)
        raise err

    def raise_first(self, op: str, statuses) -> None:
        """Raise the lowest failing rank's status on every rank. On a host-check backend a non-moekit
        exception's text follows in one more small exchange (every rank is here); on a device backend
        the status word alone (its type and rank), to keep the call free of extra host syncs."""
        if self.guard is not None and self.host_checks:
            self.guard.raise_first(op, statuses, self.transport)
        raise_status(op, first_failure(statuses), self.transport.world_size)

    def dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int, *,
                 use_fp8: bool = True, async_finish: bool = False,
                 return_recv_hook: bool = False, round_scale: bool = True) -> LowLatencyDispatchOutput:
        """See :meth:`moekit.Buffer.low_latency_dispatch`."""
        return _dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8,
                         async_finish, return_recv_hook, round_scale)

    def combine(self, x, topk_idx, topk_weights, handle, *, async_finish: bool = False,
                return_recv_hook: bool = False) -> LowLatencyCombineOutput:
        """See :meth:`moekit.Buffer.low_latency_combine`."""
        return _combine(self, x, topk_idx, topk_weights, handle, async_finish, return_recv_hook)


def _exchange(mode: LowLatencyMode, send: torch.Tensor, block: int, block_bytes: int, async_op: bool) -> Transfer:
    """Every rank's ``block`` rows to every rank; ``block_bytes`` (its [L, C] data rows) per peer count in
    ``mode.stats``."""
    t = mode.transport
    transfer = t.exchange_blocks(send, block, traffic_by_peer([block_bytes] * t.world_size, t.node_layout, t.rank),
                                 async_op=async_op)
    mode.stats.record(transfer.traffic)
    return transfer


def _geometry(sizes: _Sizes, r: int):
    """(L, row format, header rows, rows per peer block, header ints) of a dispatch of ``sizes``."""
    l = sizes.num_experts // r
    fmt = sizes.row_format()
    n_hdr = STATUS_INTS + META_INTS + l
    hdr = _header_rows(n_hdr, fmt.row_bytes)
    return l, fmt, hdr, hdr + l * sizes.capacity, n_hdr


def _dispatch_block(mode: LowLatencyMode, x, topk_idx, sizes: _Sizes, round_scale: bool):
    """This rank's send buffer ``[R * block, row_bytes]`` (header + ``[L, C]`` rows per peer) and its
    slots ``[T, E]``. Any exception here becomes the rank's status (the caller sends a status block)."""
    r, rank = mode.transport.world_size, mode.transport.rank
    l, fmt, hdr, block, n_hdr = _geometry(sizes, r)
    c, e, rb, device = sizes.capacity, sizes.num_experts, fmt.row_bytes, x.device
    send = torch.zeros(r * block + 1, rb, dtype=torch.uint8, device=device)  # + a spare row for masked entries
    head = _header_view(send[:-1], r, block, hdr, n_hdr)  # [R, n_hdr]
    head[:, STATUS_INTS:STATUS_INTS + META_INTS] = ints_on(sizes.meta(), device)
    t = x.shape[0]
    if not mode.host_checks:
        head[:, :STATUS_INTS] = _range_status(topk_idx, e, rank)  # on the device: no host sync
    chosen = torch.zeros(t, e + 1, dtype=torch.bool, device=device)
    chosen.scatter_(1, torch.where((topk_idx >= 0) & (topk_idx < e), topk_idx, e), True)
    chosen = chosen[:, :e]  # [T, E]
    slot = torch.cumsum(chosen.long(), 0) - 1  # [T, E]
    head[:, STATUS_INTS + META_INTS:] = chosen.sum(0).view(r, l)
    fields = dict(zip(("x", "scales"), quantize_1x128(x.detach(), round_scale))) if sizes.fp8 else {"x": x.detach()}
    # One copy per (token, k) into its slot; masked (or out-of-range) entries go to the spare last row.
    # No nonzero(): its output size would need a host sync.
    valid = (topk_idx >= 0) & (topk_idx < e)
    ex = torch.where(valid, topk_idx, 0)
    row = (ex // l) * block + hdr + (ex % l) * c + slot.gather(1, ex)
    dest_rows = torch.where(valid, row, r * block).flatten()  # [T*K]
    tok = torch.arange(t, device=device).repeat_interleave(topk_idx.shape[1])
    views = fmt.views(send)
    for name, v in fields.items():
        dst = views[name]
        if v.dtype == FP8_DTYPE:  # index_copy_ has no float8 kernel: move the bytes
            dst, v = dst.view(torch.uint8), v.view(torch.uint8)
        dst.index_copy_(0, dest_rows, v.index_select(0, tok))
    views["src"].index_copy_(0, dest_rows, tok.to(torch.int32).unsqueeze(1))  # the token's index travels too
    return send[:-1], slot


def _dispatch(mode: LowLatencyMode, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8,
              async_finish, return_recv_hook, round_scale=True) -> LowLatencyDispatchOutput:
    op, r = "low_latency_dispatch", mode.transport.world_size
    status, sizes, built = OK, None, None
    try:  # any exception while preparing this rank's block becomes its status (moekit.ep.guard)
        sizes = _check_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, r)
        if mode.host_checks:
            check_expert_range(topk_idx, num_experts)  # one host sync (two scalars): free on the CPU
        built = _dispatch_block(mode, x, topk_idx, sizes, round_scale)
    except Exception as err:  # noqa: BLE001 - reported on every rank (preflight or the block's header)
        status = mode.status_of(err)
    if mode.host_checks:
        _preflight(mode, op, status, sizes)  # raises on every rank if any rank failed, called another
        # method or passed other sizes
    elif sizes is None:
        # Device backend, a rank whose x cannot size the block: it sends a block of the size of its
        # previous call's (what the peers most likely use) and the peers raise from its status.
        sizes = mode.sizes
        if sizes is None:
            raise_status(op, status, r)  # nothing to size the block with: local error (see docs/ep.md)
    if status.ok:
        mode.sizes = sizes
    hidden, c, e, fp8 = sizes.hidden, sizes.capacity, sizes.num_experts, sizes.fp8
    l, fmt, hdr, block, n_hdr = _geometry(sizes, r)
    rb = fmt.row_bytes
    if built is not None:
        send, slot = built
        device = send.device
    else:  # this rank failed (device backend): a block of the agreed size carrying only its status word
        device = mode.msg_device
        send = torch.zeros(r * block, rb, dtype=torch.uint8, device=device)
        head = _header_view(send, r, block, hdr, n_hdr)
        head[:, STATUS_INTS:STATUS_INTS + META_INTS] = ints_on(sizes.meta(), device)
        head[:, :STATUS_INTS] = ints_on(status.ints(), device)
        slot = torch.zeros(0, e, dtype=torch.int64, device=device)
    transfer = _exchange(mode, send, block, l * c * rb, async_finish or return_recv_hook)
    recv_x = torch.empty(l, r * c, hidden, dtype=FP8_DTYPE if fp8 else sizes.x_dtype, device=device)
    recv_scales = torch.empty(l, r * c, num_scale_cols(hidden), dtype=torch.float32, device=device) if fp8 else None
    recv_count = torch.empty(l, dtype=torch.int64, device=device)
    recv_counts = torch.zeros(r, l, dtype=torch.int64, device=device)
    recv_src = torch.zeros(l, r * c, dtype=torch.int32, device=device)
    handle = LowLatencyHandle(x.shape[0] if status.ok else 0, c, e, hidden, slot, recv_counts, recv_src,
                              sizes.x_dtype, mode.key)

    @torch.no_grad()
    def finish(recv):
        got_head = _header_view(recv, r, block, hdr, n_hdr)
        # The status words (a host read; on a GPU this is the call's one host sync, at its completion).
        raise_status(op, first_failure(got_head[:, :STATUS_INTS].tolist()), r)
        if not mode.host_checks:
            raise_status(op, meta_mismatch(got_head[:, STATUS_INTS:STATUS_INTS + META_INTS].tolist()), r)
        recv_counts.copy_(got_head[:, STATUS_INTS + META_INTS:])
        src_row, valid = _packed_index(recv_counts, c)  # [L, R*C]
        src, j = src_row // c, src_row % c
        full = (src * block + hdr + torch.arange(l, device=device).unsqueeze(1) * c + j).flatten()
        got = fmt.views(recv)
        for name, out in (("x", recv_x), ("scales", recv_scales)):
            if out is not None:
                rows = got[name].index_select(0, full).view(l, r * c, -1)
                out.copy_(torch.where(valid.unsqueeze(2), rows, torch.zeros((), dtype=rows.dtype, device=device))
                          if rows.dtype != FP8_DTYPE else
                          torch.where(valid.unsqueeze(2), rows.view(torch.uint8), 0).view(FP8_DTYPE))
        recv_src.copy_(torch.where(valid, got["src"].index_select(0, full).view(l, r * c), 0))
        recv_count.copy_(recv_counts.sum(0))

    event, hook = _finish(transfer, async_finish, return_recv_hook, finish)
    out_x = (recv_x, recv_scales) if fp8 else recv_x
    return LowLatencyDispatchOutput(out_x, recv_count, handle, event, hook)


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


def _check_combine(x, topk_idx, topk_weights, handle: LowLatencyHandle, num_ranks: int) -> None:
    l, c, h, t = handle.num_experts // num_ranks, handle.capacity, handle.hidden, handle.num_tokens
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape) != (l, num_ranks * c, h) \
            or x.dtype not in FLOAT_DTYPES:
        raise InputError(Code.LL_COMBINE_X, l, num_ranks * c, h)
    if not isinstance(topk_idx, torch.Tensor) or not isinstance(topk_weights, torch.Tensor) \
            or topk_idx.dtype != torch.int64 or topk_weights.dtype != torch.float32 or topk_idx.dim() != 2 \
            or topk_idx.shape[0] != t or topk_weights.shape != topk_idx.shape:
        raise InputError(Code.LL_ROUTING, t)
    if topk_idx.device != x.device or topk_weights.device != x.device:
        raise InputError(Code.DEVICE)


def _combine_block(mode: LowLatencyMode, x, topk_idx, handle: LowLatencyHandle, fmt: RowFormat) -> torch.Tensor:
    """This rank's send buffer of a combine: per peer a status row, then its ``[L, C]`` rows in the fixed
    block layout. Any exception here becomes the rank's status (the caller sends a status block)."""
    r, rank = mode.transport.world_size, mode.transport.rank
    c, e, hidden = handle.capacity, handle.num_experts, handle.hidden
    l, rb, device = e // r, fmt.row_bytes, handle.counts.device
    block = 1 + l * c
    send = torch.zeros(r * block, rb, dtype=torch.uint8, device=device)
    if not mode.host_checks:
        st = send.view(r, block, rb)[:, 0, :STATUS_BYTES].view(torch.int64)  # [R, STATUS_INTS]
        st.copy_(_range_status(topk_idx, e, rank).expand(r, -1))
    # Back to the fixed block layout [R, L, C, H]: row (s, e, j) = packed row offset[e, s] + j.
    counts = handle.counts  # [R, L]
    start = torch.cumsum(counts, 0) - counts  # [R, L]
    j = torch.arange(c, device=device)
    valid = j < counts.unsqueeze(2)  # [R, L, C]
    pos = torch.where(valid, start.unsqueeze(2) + j, 0)
    rows = x.detach().gather(1, pos.permute(1, 0, 2).reshape(l, r * c, 1).expand(l, r * c, hidden))
    rows = rows.view(l, r, c, hidden).transpose(0, 1)  # [R, L, C, H]
    rows = torch.where(valid.unsqueeze(3), rows, torch.zeros((), dtype=rows.dtype, device=device))
    fmt.views(send)["x"].view(r, block, hidden)[:, 1:].copy_(rows.reshape(r, l * c, hidden))
    return send


def _combine(mode: LowLatencyMode, x, topk_idx, topk_weights, handle, async_finish,
             return_recv_hook) -> LowLatencyCombineOutput:
    transport = mode.transport
    op, r, rank = "low_latency_combine", transport.world_size, transport.rank
    if not isinstance(handle, LowLatencyHandle) or handle.key != mode.key:
        # Without the handle nothing sizes the block: raised locally (SPMD programs do it on every rank).
        raise_status(op, Status(int(Code.LL_HANDLE), rank), r)
    c, e, t, hidden = handle.capacity, handle.num_experts, handle.num_tokens, handle.hidden
    l = e // r
    device = handle.counts.device
    # Rows travel in the handle's dtype (agreed at dispatch), so every rank's block has one size.
    fmt = RowFormat([("x", handle.x_dtype, hidden)])
    rb, block = fmt.row_bytes, 1 + l * c  # a status row, then [L, C] rows
    status, send = OK, None
    try:  # any exception while preparing this rank's block becomes its status (moekit.ep.guard)
        _check_combine(x, topk_idx, topk_weights, handle, r)
        if mode.host_checks:
            check_expert_range(topk_idx, e)
        send = _combine_block(mode, x, topk_idx, handle, fmt)
    except Exception as err:  # noqa: BLE001 - reported on every rank from the block's status rows
        status = mode.status_of(err)
    if send is None:  # a block of the handle's size carrying only this rank's status word
        send = torch.zeros(r * block, rb, dtype=torch.uint8, device=device)
        send.view(r, block, rb)[:, 0, :STATUS_BYTES].view(torch.int64).copy_(
            ints_on(status.ints(), device).expand(r, -1))
    transfer = _exchange(mode, send, block, l * c * rb, async_finish or return_recv_hook)
    out_dtype = x.dtype if status.ok else handle.x_dtype
    out = torch.empty(t, hidden, dtype=out_dtype, device=device)

    @torch.no_grad()
    def finish(back):
        statuses = back.view(r, block, rb)[:, 0, :STATUS_BYTES].view(torch.int64)
        mode.raise_first(op, statuses.tolist())  # host read (GPU: at completion)
        valid_k = (topk_idx >= 0) & (topk_idx < e)
        ex = torch.where(valid_k, topk_idx, 0)  # [T, K]
        sl = handle.slot.gather(1, ex)  # [T, K]
        row = torch.where(valid_k, (ex // l) * block + 1 + (ex % l) * c + sl, 1)  # masked: any data row
        got = fmt.views(back)["x"].index_select(0, row.flatten()).view(*ex.shape, hidden)
        # where, not a zero weight: a masked entry must not turn an inf/nan of another row into nan.
        out.copy_(torch.where(valid_k.unsqueeze(2), got.float() * topk_weights.unsqueeze(2), 0.0).sum(1))

    event, hook = _finish(transfer, async_finish, return_recv_hook, finish)
    return LowLatencyCombineOutput(out, event, hook)
