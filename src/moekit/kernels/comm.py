"""Communication kernels of the symmetric transport, each beside its plain-torch reference.

Shape legend: R = ranks of the heap, T = tokens, W = 32-bit words per packed row (row bytes / 4),
K = ``NUM_PROGS`` = the SM budget (``num_sms``): the exact grid of every launch here.

The heap of every rank is addressed through a *pointer table* ``ptrs [R] int64``: rank d's heap as an
address valid in the launching process (a peer's CUDA IPC / symmetric-memory mapping on a GPU, a
shared-memory mapping on the CPU, a plain tensor for virtual ranks). The kernels turn those integers
into pointers; Triton's interpreter does the same with host addresses, so the one source runs
everywhere.

Memory ordering (DeepEP's ``st.release.sys`` / ``ld.acquire.sys`` flags, written with Triton's
portable atomics): a program copies its rows into the peer's receive slot, then every thread of the
program meets at a barrier, then ONE release store at system scope sets the program's flag in the
peer's heap. The waiter reads the flags with acquire loads at system scope before reading the rows.
No program waits for another program of its launch (a launch may run with fewer SMs than programs;
the interpreter runs them one at a time): all waiting is for other ranks' launches. Offsets are
widened with ``tl.cast(..., tl.int64)`` before they are multiplied (a loop counter is a plain int in
the interpreter); no nested ``@triton.jit`` helpers (each costs a re-patch per call in the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int, lo: int = 16, hi: int = 1024) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# ---- push: rows into the peers' receive slots, then one flag per (destination, program) ------------------
@triton.jit
def _push_rows_kernel(ptrs_ptr, src_ptr, idx_ptr, off_ptr, dst_word_off, flag_word_off, seq, R, W,
                      NUM_PROGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    # Rows of chunk d = src[idx[off[d]:off[d+1]]] ([*, W] int32 words) go to rank d's heap at word
    # dst_word_off, row after row; then this program's flag, word flag_word_off + pid, becomes seq.
    # Program p copies rows p, p + K, p + 2K, ... of every chunk, BLOCK_R of them per step.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    lanes = tl.arange(0, BLOCK_R)
    for d in range(R):
        heap = tl.load(ptrs_ptr + d).to(tl.pointer_type(tl.int32))  # rank d's heap in this process
        dst = heap + dst_word_off
        lo = tl.load(off_ptr + d)
        n = tl.load(off_ptr + d + 1) - lo
        mine = tl.cdiv(n - pid, NUM_PROGS)  # rows of this chunk that are this program's
        for j0 in range(0, mine, BLOCK_R):
            r = pid + (j0 + lanes) * NUM_PROGS  # [BLOCK_R] rows of the chunk
            rm = r < n
            row = tl.load(idx_ptr + lo + r, mask=rm, other=0)
            for w0 in range(0, W, BLOCK):
                m = rm[:, None] & (w0 + cols < W)[None, :]
                v = tl.load(src_ptr + row[:, None] * W + w0 + cols[None, :], mask=m)
                tl.store(dst + tl.cast(r, tl.int64)[:, None] * W + w0 + cols[None, :], v, mask=m)
        # Data before flag: every thread's stores, then one release store visible system-wide.
        tl.debug_barrier()
        tl.atomic_xchg(heap + flag_word_off + pid, seq, sem="release", scope="sys")


def push_rows(ptrs: torch.Tensor, src: torch.Tensor, idx: torch.Tensor, off: torch.Tensor, dst_word_off: int,
              flag_word_off: int, seq: int, num_programs: int) -> None:
    """Push chunk d (rows ``src[idx[off[d]:off[d+1]]]``) to rank d's heap at int32 word ``dst_word_off``,
    then set words ``flag_word_off + p`` of rank d's heap to ``seq`` (p < ``num_programs``, one per program).

    ``ptrs`` [R] int64 heap addresses; ``src`` [n, W] int32 contiguous; ``idx`` int64; ``off`` [R+1] int64
    exclusive prefix of the chunk sizes (on the device). Exactly ``num_programs`` programs, each copying
    rows ``p, p + K, ...`` of every chunk. No host sync; returns once enqueued.
    """
    r, w = ptrs.numel(), src.shape[1]
    _push_rows_kernel[(num_programs,)](ptrs, src, idx, off, dst_word_off, flag_word_off, seq, r, w,
                                       NUM_PROGS=num_programs, BLOCK_R=4, BLOCK=_pow2(w, hi=512))


def push_rows_reference(heaps: list[torch.Tensor], src: torch.Tensor, idx: torch.Tensor, off: list[int],
                        dst_word_off: int, flag_word_off: int, seq: int, num_programs: int) -> None:
    """Plain torch: what :func:`push_rows` writes, into ``heaps`` [R] int32 tensors (virtual ranks)."""
    for d, heap in enumerate(heaps):
        rows = src.index_select(0, idx[off[d]:off[d + 1]])
        heap[dst_word_off:dst_word_off + rows.numel()] = rows.flatten()
        heap[flag_word_off:flag_word_off + num_programs] = seq


# ---- wait: bounded polling of this rank's flags ---------------------------------------------------------
@triton.jit
def _wait_flags_kernel(flags_ptr, ready_ptr, seq, n, max_polls, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m = offs < n
    v = tl.atomic_add(flags_ptr + offs, 0, mask=m, sem="acquire", scope="sys")
    missing = tl.sum(((v != seq) & m).to(tl.int32), 0)
    polls = 1
    while (missing > 0) & (polls < max_polls):
        v = tl.atomic_add(flags_ptr + offs, 0, mask=m, sem="acquire", scope="sys")
        missing = tl.sum(((v != seq) & m).to(tl.int32), 0)
        polls += 1
    tl.store(ready_ptr + offs, (v == seq).to(tl.int32), mask=m)


def wait_flags(flags: torch.Tensor, seq: int, max_polls: int) -> torch.Tensor:
    """Poll ``flags`` [n] int32 (acquire, system scope) up to ``max_polls`` times until all equal ``seq``.
    Returns ``ready`` [n] int32 (1 = arrived). One program; the caller's host loop bounds the total wait."""
    n = flags.numel()
    ready = torch.empty(n, dtype=torch.int32, device=flags.device)
    _wait_flags_kernel[(1,)](flags, ready, seq, n, max_polls, BLOCK=_pow2(n, hi=1 << 16))
    return ready


# ---- notify: routing -> each row's place in its destination chunk ----------------------------------------
@triton.jit
def _notify_kernel(in_rank_ptr, pos_ptr, counts_ptr, T, R, NUM_PROGS: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_T)
    for d in range(pid, R, NUM_PROGS):
        carry = tl.full([], 0, tl.int32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs
            m = t < T
            x = tl.load(in_rank_ptr + tl.cast(t, tl.int64) * R + d, mask=m, other=0).to(tl.int32)
            c = tl.cumsum(x, 0) + carry
            tl.store(pos_ptr + tl.cast(t, tl.int64) * R + d, tl.where(x > 0, c - 1, -1), mask=m)
            carry += tl.sum(x, 0)
        tl.store(counts_ptr + d, carry.to(tl.int64))


def notify(is_token_in_rank: torch.Tensor, num_programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``is_token_in_rank`` [T, R] bool → ``(pos [T, R] int32, counts [R] int64)`` on the device: ``pos[t, d]``
    = the row of token t in its chunk for rank d (tokens in order), -1 where t does not go to d; ``counts[d]``
    = the chunk's size. ``num_programs`` programs, each scanning whole destination columns. No host sync."""
    t, r = is_token_in_rank.shape
    pos = torch.empty(t, r, dtype=torch.int32, device=is_token_in_rank.device)
    counts = torch.empty(r, dtype=torch.int64, device=is_token_in_rank.device)
    src = is_token_in_rank.contiguous().view(torch.int8)
    _notify_kernel[(num_programs,)](src, pos, counts, t, r, NUM_PROGS=num_programs, BLOCK_T=_pow2(t, hi=256))
    return pos, counts


def notify_reference(is_token_in_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch :func:`notify`."""
    x = is_token_in_rank.to(torch.int64)
    pos = torch.where(is_token_in_rank, torch.cumsum(x, 0) - 1, -1).to(torch.int32)
    return pos, x.sum(0)


# ---- combine: the rows of each token summed in rank order ------------------------------------------------
@triton.jit
def _combine_kernel(rows_ptr, pos_ptr, out_ptr, T, R, row_stride, slot_rows, WIDTH,
                    NUM_PROGS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    # Token t's row from rank d is row d * slot_rows + 1 + pos[t, d] of the receive area (+1: the status
    # row heading each chunk). Summed in float32 in rank order d = 0, 1, ...: the same additions, in the
    # same order, whatever the grid, so the result is bitwise reproducible run to run. Program p sums
    # tiles p, p + K, ... of BLOCK_T tokens.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    toks = tl.arange(0, BLOCK_T)
    for t0 in range(pid * BLOCK_T, T, NUM_PROGS * BLOCK_T):
        t = tl.cast(t0 + toks, tl.int64)
        tm = t < T
        for w0 in range(0, WIDTH, BLOCK):
            cm = (w0 + cols < WIDTH)[None, :]
            acc = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)
            for d in range(R):
                p = tl.load(pos_ptr + t * R + d, mask=tm, other=-1)  # [BLOCK_T]
                hit = (p >= 0)[:, None]
                row = tl.cast(d * slot_rows + 1 + p, tl.int64)
                v = tl.load(rows_ptr + row[:, None] * row_stride + w0 + cols[None, :], mask=hit & cm, other=0.0)
                acc = tl.where(hit, acc + v.to(tl.float32), acc)
            tl.store(out_ptr + t[:, None] * WIDTH + w0 + cols[None, :], acc, mask=tm[:, None] & cm)


def combine_rows(rows: torch.Tensor, pos: torch.Tensor, slot_rows: int, num_programs: int) -> torch.Tensor:
    """``out[t] = Σ_d rows[d * slot_rows + 1 + pos[t, d]]`` over the d with ``pos[t, d] >= 0``, in rank order.

    ``rows``: a ``[N, width]`` view (bf16/fp16/fp32, row stride any, unit column stride) of the receive area;
    ``pos`` [T, R] int32 from :func:`notify`. Returns ``[T, width]`` float32. ``num_programs`` programs over
    the tokens (tiles of 4). No host sync.
    """
    t, r = pos.shape
    width = rows.shape[1]
    assert rows.stride(1) == 1
    out = torch.empty(t, width, dtype=torch.float32, device=rows.device)
    _combine_kernel[(num_programs,)](rows, pos, out, t, r, rows.stride(0), slot_rows, width,
                                     NUM_PROGS=num_programs, BLOCK_T=4, BLOCK=_pow2(width, hi=512))
    return out


def combine_rows_reference(rows: torch.Tensor, pos: torch.Tensor, slot_rows: int) -> torch.Tensor:
    """Plain torch :func:`combine_rows` (the same float32 additions in the same order)."""
    t, r = pos.shape
    out = torch.zeros(t, rows.shape[1], dtype=torch.float32, device=rows.device)
    for d in range(r):
        p = pos[:, d].long()
        got = rows.index_select(0, (d * slot_rows + 1 + p).clamp(min=0)).float()
        out = torch.where((p >= 0).unsqueeze(1), out + got, out)
    return out
