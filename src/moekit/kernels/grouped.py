"""Grouped FP8 GEMMs for the MoE experts: contiguous (training / prefill) and masked (low-latency decode).

Both reuse the persistent tile loop of :mod:`moekit.kernels.gemm` (same math, same autotuned configs): a
tile's ``B`` operand is its group's weight ``b[g]``.

* contiguous: ``a [M, K]`` holds the rows of every group back to back; ``m_indices [M]`` names each row's
  group, ``-1`` for padding. Every group's segment starts at a multiple of
  :func:`get_m_alignment_for_contiguous_layout` (128), so that a row tile never straddles two groups.
  Rows with ``-1`` get zeros (the kernel writes them: the output never holds stale memory).
* masked: ``a [G, M_max, K]``; only the first ``masked_m[g]`` rows of group ``g`` are real (the layout of
  the low-latency dispatch). The other rows get zeros; tiles entirely past ``masked_m[g]`` skip the math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._util import is_int
from . import reference as ref
from ._backend import BLOCK, cdiv, check_dtype, check_shape, resolve_backend, same_device
from .gemm import (
    check_gemm_args,
    clamped_offsets,
    fp8_tile_dot,
    get_configs,
    kernel_operands,
    m_bucket,
    operand_arg,
    resolve_num_sms,
    tile_coords,
)


def get_m_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group's segment in the contiguous layout (a multiple of every BLOCK_M used)."""
    return BLOCK


@triton.autotune(configs=get_configs(), key=["M_BUCKET", "N", "K", "NUM_SMS", "USE_TMA"])
@triton.jit
def _grouped_contiguous_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, idx_ptr, M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_ask, stride_bg, stride_bn, stride_bsg, stride_bsn, stride_bsk, stride_cm,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = K // BLOCK_K
    for tile_id in tl.range(pid, num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_group = tl.load(idx_ptr + rows, mask=rows < M, other=-1)
        # Alignment makes every non-padding row of the tile belong to one group.
        g = tl.max(row_group, axis=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if g >= 0:
            offs_m = clamped_offsets(pid_m, M, BLOCK_M)
            offs_n = clamped_offsets(pid_n, N, BLOCK_N)
            g64 = g.to(tl.int64)
            if USE_TMA:  # b is the 2-D view [G * N, K]: group g starts at row g * N
                b_src = b_ptr
            else:
                b_src = b_ptr + g64 * stride_bg
            acc = fp8_tile_dot(a_ptr, as_ptr, b_src, bs_ptr + g64 * stride_bsg, pid_m * BLOCK_M, offs_m,
                               g * N + pid_n * BLOCK_N, offs_n, pid_n * BLOCK_N // BLOCK_K, k_tiles, stride_am,
                               stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K,
                               USE_TMA)
            acc = tl.where((row_group >= 0)[:, None], acc, 0.0)
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.autotune(configs=get_configs(), key=["M_BUCKET", "N", "K", "NUM_SMS", "USE_TMA"])
@triton.jit
def _grouped_masked_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, mm_ptr, G, M, N, K, M_BUCKET,
    stride_ag, stride_am, stride_asg, stride_asm, stride_ask,
    stride_bg, stride_bn, stride_bsg, stride_bsn, stride_bsk, stride_cg, stride_cm,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = num_pid_m * num_pid_n
    k_tiles = K // BLOCK_K
    for tile_id in tl.range(pid, G * per_group, NUM_SMS):
        g = tile_id // per_group
        pid_m, pid_n = tile_coords(tile_id % per_group, num_pid_m, num_pid_n, GROUP_M)
        valid_m = tl.load(mm_ptr + g)
        g64 = g.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if pid_m * BLOCK_M < valid_m:
            offs_m = clamped_offsets(pid_m, M, BLOCK_M)
            offs_n = clamped_offsets(pid_n, N, BLOCK_N)
            if USE_TMA:  # a and b are the 2-D views [G * M, K] and [G * N, K]
                a_src = a_ptr
                b_src = b_ptr
            else:
                a_src = a_ptr + g64 * stride_ag
                b_src = b_ptr + g64 * stride_bg
            acc = fp8_tile_dot(a_src, as_ptr + g64 * stride_asg, b_src, bs_ptr + g64 * stride_bsg,
                               g * M + pid_m * BLOCK_M, offs_m, g * N + pid_n * BLOCK_N, offs_n,
                               pid_n * BLOCK_N // BLOCK_K, k_tiles, stride_am, stride_asm, stride_ask, stride_bn,
                               stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA)
            acc = tl.where((rows < valid_m)[:, None], acc, 0.0)
        c_ptrs = c_ptr + g64 * stride_cg + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def check_contiguous_layout(m_indices: torch.Tensor, num_groups: int, alignment: int | None = None) -> None:
    """Raise ValueError unless ``m_indices`` is a valid contiguous layout. Syncs with the host (reads m_indices).

    Valid: values in ``[-1, num_groups)``; every row tile of ``alignment`` rows holds at most one group.
    """
    align = alignment or get_m_alignment_for_contiguous_layout()
    m = m_indices.long().cpu()
    if m.numel() and (int(m.min()) < -1 or int(m.max()) >= num_groups):
        raise ValueError(f"m_indices must lie in [-1, {num_groups}), got values in "
                         f"[{int(m.min())}, {int(m.max())}]")
    pad = (-m.numel()) % align
    tiles = torch.cat([m, m.new_full((pad,), -1)]).reshape(-1, align)
    hi = tiles.max(dim=1).values
    lo = torch.where(tiles >= 0, tiles, hi[:, None]).min(dim=1).values
    bad = (lo != hi).nonzero()
    if bad.numel():
        t = int(bad[0, 0])
        raise ValueError(f"m_indices is not aligned: rows {t * align}..{(t + 1) * align - 1} mix groups "
                         f"{sorted(set(tiles[t][tiles[t] >= 0].tolist()))}; each group's segment must start at a "
                         f"multiple of {align} (pad with -1 rows)")


def m_grouped_fp8_gemm_nt_contiguous(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    m_indices: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    num_sms: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped ``out[i] = a[i] @ b[m_indices[i]].T`` over per-group contiguous row segments.

    Args:
        a: ``[M, K]`` float8_e4m3fn or float8_e4m3fnuz (``b`` the same), rows grouped by expert; each group's
            segment starts at a multiple of
            :func:`get_m_alignment_for_contiguous_layout` (128). ``K`` a multiple of 128.
        a_scales: ``[M, K/128]`` float32.
        b: ``[G, N, K]`` float8_e4m3fn, one weight per group.
        b_scales: ``[G, ceil(N/128), K/128]`` float32.
        m_indices: ``[M]`` int32 (or int64): the group of each row, ``-1`` for padding rows.
        out_dtype, num_sms, backend: as in :func:`moekit.kernels.fp8_gemm_nt`.

    Returns:
        ``[M, N]`` in ``out_dtype``; rows with ``m_indices == -1`` are zero. The Triton path does not sync with
        the host and does not check the alignment on GPU tensors (that would sync: call
        :func:`check_contiguous_layout` yourself when in doubt); on CPU tensors it checks.
    """
    n, k = check_gemm_args(a, a_scales, b, b_scales, out_dtype, "[M, K]", "[G, N, K]")
    m, num_groups = a.shape[0], b.shape[0]
    check_dtype("m_indices", m_indices, torch.int32, torch.int64)
    check_shape("m_indices", m_indices, (m,), "one group index per row of a")
    same_device(a=a, m_indices=m_indices)
    sms = resolve_num_sms(num_sms, a.device)
    if resolve_backend(backend, a) == "torch":
        return ref.m_grouped_contiguous_ref(a, a_scales, b, b_scales, m_indices, out_dtype)
    if not a.is_cuda:
        check_contiguous_layout(m_indices, num_groups)
    a, b, tma = kernel_operands(a, b, flat_b=True)  # b's descriptor sees [G * N, K]
    m_indices = m_indices.to(torch.int32)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out

    def grid(meta):
        return (min(sms, cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])),)

    _grouped_contiguous_kernel[grid](
        operand_arg(a, tma), a_scales, operand_arg(b.reshape(-1, k), tma) if tma else b, b_scales, out, m_indices,
        m, n, k, m_bucket(m), a.stride(0), a_scales.stride(0), a_scales.stride(1), b.stride(0), b.stride(1),
        b_scales.stride(0), b_scales.stride(1), b_scales.stride(2), out.stride(0),
        NUM_SMS=sms, BLOCK_K=BLOCK, USE_TMA=tma,
    )
    return out


def m_grouped_fp8_gemm_nt_masked(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    masked_m: torch.Tensor,
    expected_m: int,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    num_sms: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped ``out[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T`` (the low-latency, per-expert layout).

    Args:
        a: ``[G, M_max, K]`` float8_e4m3fn or float8_e4m3fnuz (``b`` the same); ``K`` a multiple of 128.
        a_scales: ``[G, M_max, K/128]`` float32.
        b: ``[G, N, K]`` float8_e4m3fn.
        b_scales: ``[G, ceil(N/128), K/128]`` float32.
        masked_m: ``[G]`` int32 (or int64) on a's device: real rows per group, each in ``[0, M_max]``
            (larger values are treated as ``M_max``). Read by the kernel, never by the host.
        expected_m: a hint of the typical ``masked_m`` (picks the autotuning bucket instead of M_max).
        out_dtype, num_sms, backend: as in :func:`moekit.kernels.fp8_gemm_nt`.

    Returns:
        ``[G, M_max, N]`` in ``out_dtype``; rows ``>= masked_m[g]`` are zero. No host synchronisation.
    """
    n, k = check_gemm_args(a, a_scales, b, b_scales, out_dtype, "[G, M_max, K]", "[G, N, K]", same_groups=True)
    num_groups, m_max = a.shape[0], a.shape[1]
    check_dtype("masked_m", masked_m, torch.int32, torch.int64)
    check_shape("masked_m", masked_m, (num_groups,), "one row count per group")
    same_device(a=a, masked_m=masked_m)
    if not is_int(expected_m, 0):
        raise ValueError(f"expected_m must be a non-negative int, got {expected_m!r}")
    sms = resolve_num_sms(num_sms, a.device)
    if resolve_backend(backend, a) == "torch":
        return ref.m_grouped_masked_ref(a, a_scales, b, b_scales, masked_m.clamp(max=m_max), out_dtype)
    a, b, tma = kernel_operands(a, b, flat_a=True, flat_b=True)  # descriptors: [G * M_max, K], [G * N, K]
    masked_m = masked_m.to(torch.int32)
    out = torch.empty(num_groups, m_max, n, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (min(sms, num_groups * cdiv(m_max, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])),)

    a_arg = operand_arg(a.reshape(-1, k), tma) if tma else a
    b_arg = operand_arg(b.reshape(-1, k), tma) if tma else b
    _grouped_masked_kernel[grid](
        a_arg, a_scales, b_arg, b_scales, out, masked_m, num_groups, m_max, n, k, m_bucket(min(expected_m, m_max)),
        a.stride(0), a.stride(1), a_scales.stride(0), a_scales.stride(1), a_scales.stride(2),
        b.stride(0), b.stride(1), b_scales.stride(0), b_scales.stride(1), b_scales.stride(2),
        out.stride(0), out.stride(1), NUM_SMS=sms, BLOCK_K=BLOCK, USE_TMA=tma,
    )
    return out
