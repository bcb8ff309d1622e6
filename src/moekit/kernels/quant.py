"""FP8 E4M3 quantizers of DeepSeek-V3's recipe: activations per 1x128 tile, weights per 128x128 block.

A tile's scale is ``max(amax, 1e-4) / fp8_max``; ``scale_fmt="ue8m0"`` rounds it up to a power of two (what
DeepSeek-V3 sends on the wire, and what Blackwell's scaled MMA wants). Data is ``x / scale`` rounded to
nearest even and saturated to +-fp8_max. Scales are always fp32 tensors (ue8m0 ones hold powers of two).

``fp8_format`` picks the encoding (:class:`moekit.kernels._backend.FP8Format`): ``e4m3fn`` (max 448) or
``e4m3fnuz`` (max 240, what AMD MI300's MFMA reads); the default is the native one of the tensor's device.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moekit import platform

from . import reference as ref
from ._backend import BLOCK, FP8_DTYPES, FP8Format, cdiv, check_dtype, resolve_backend, resolve_fp8_format
from .ptx import cvt_mode, to_e4m3

_IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Quantized(NamedTuple):
    """An FP8 tensor and its fp32 scales; unpacks like DeepGEMM's ``(data, scales)`` pairs."""

    data: torch.Tensor  # float8_e4m3fn or float8_e4m3fnuz
    scales: torch.Tensor  # float32


@triton.jit
def _ceil_pow2(s):
    # Exact on every backend (no log2/exp2 approximations): bump the exponent when any mantissa bit is set.
    bits = s.to(tl.int32, bitcast=True)
    up = ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return ((bits & 0x7F800000) + (up << 23)).to(tl.float32, bitcast=True)


def get_cuda_quant_configs() -> list[triton.Config]:
    """NVIDIA: row-tile heights of the 1x128 quantizer, the preferred one first."""
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 4), (16, 4), (64, 8), (128, 8))]


def get_hip_quant_configs() -> list[triton.Config]:
    """AMD: 64-lane wavefronts, so half the warps of NVIDIA's configs keep the same elements per lane."""
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 2), (16, 2), (64, 4), (128, 4))]


def get_quant_configs() -> list[triton.Config]:
    """Row-tile heights of the 1x128 quantizer: one small tile in the interpreter, a few on GPUs."""
    if platform.triton_interpreted():
        return [triton.Config({"BLOCK_M": 16}, num_warps=4)]
    configs = get_hip_quant_configs() if platform.backend() == "rocm" else get_cuda_quant_configs()
    return configs[:1] if os.environ.get("MOEKIT_AUTOTUNE", "1") == "0" else configs


@triton.autotune(configs=get_quant_configs(), key=["M_BUCKET", "K", "GROUP"])
@triton.jit
def _token_group_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, M_BUCKET,
    stride_xm, stride_qm, stride_sm, stride_sg,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, UE8M0: tl.constexpr, CVT: tl.constexpr, FNUZ: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """One program: BLOCK_M rows x one group of GROUP columns; x [M, K] -> q [M, K] e4m3, s [M, K/GROUP]."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = g * GROUP + tl.arange(0, GROUP)
    row_ok = offs_m < M
    mask = row_ok[:, None]
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4) / FP8_MAX
    if UE8M0:
        s = _ceil_pow2(s)
    q = to_e4m3(x / s[:, None], CVT, FNUZ)
    tl.store(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + offs_m.to(tl.int64) * stride_sm + g * stride_sg, s, mask=row_ok)


# 128x128 block quantizer: 256 lanes either way (8 NVIDIA warps of 32, 4 AMD wavefronts of 64).
BLOCK_QUANT_WARPS = {False: 8, True: 4}


@triton.jit
def _block_quant_kernel(
    w_ptr, q_ptr, s_ptr, N, K,
    stride_wg, stride_wn, stride_qg, stride_qn, stride_sg, stride_sn, stride_sk,
    BLOCK: tl.constexpr, UE8M0: tl.constexpr, CVT: tl.constexpr, FNUZ: tl.constexpr, FP8_MAX: tl.constexpr,
):
    """One program: one BLOCK x BLOCK tile of w [G, N, K] -> q (e4m3) and one fp32 scale."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + g * stride_wg + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    s = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), 1e-4) / FP8_MAX
    if UE8M0:
        s = _ceil_pow2(s)
    q = to_e4m3(w / s, CVT, FNUZ)
    tl.store(q_ptr + g * stride_qg + offs_n[:, None] * stride_qn + offs_k[None, :], q, mask=mask)
    tl.store(s_ptr + g * stride_sg + pid_n * stride_sn + pid_k * stride_sk, s)


def _check_quant_args(name: str, t: torch.Tensor, scale_fmt: str | None,
                      fp8_format: str | None) -> tuple[bool, FP8Format]:
    """The quantizers' shared checks: ``t``'s dtype, ``scale_fmt`` (returns whether it is ue8m0) and the FP8
    format (by name, or ``t``'s device's)."""
    check_dtype(name, t, *_IN_DTYPES)
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    return scale_fmt == "ue8m0", resolve_fp8_format(fp8_format, t.device)


def _check_tile(name: str, size: int) -> None:
    if size < 16 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def per_token_group_quant(
    x: torch.Tensor,
    group_size: int = BLOCK,
    *,
    scale_fmt: str | None = None,
    m_major_scales: bool = False,
    fp8_format: str | None = None,
    backend: str | None = None,
    use_ptx: bool | None = None,
) -> Quantized:
    """Quantize activations per ``1 x group_size`` tile of the last dimension.

    Args:
        x: ``[..., K]`` bf16 / fp16 / fp32, ``K`` a multiple of ``group_size``.
        group_size: tile width; a power of two >= 16 (128 in DeepSeek-V3).
        scale_fmt: ``None`` (fp32 scales) or ``"ue8m0"`` (each scale rounded up to a power of two).
        m_major_scales: store the scales M-major (strides ``(1, M)``, DeepGEMM's layout: a GEMM's row tile
            then reads its scales as one contiguous run per K step); 2-D ``x`` only.
        backend: ``"triton"``, ``"torch"`` or ``None`` (``MOEKIT_KERNELS``, else Triton on GPU tensors).
        use_ptx: force the inline-PTX conversion on or off (``None``: ``moekit.platform.ptx_enabled()``).

    Returns:
        ``Quantized(data [..., K] float8_e4m3fn | float8_e4m3fnuz, scales [..., K/group_size] float32)``; data
        contiguous, scales contiguous or M-major. No host synchronisation.
    """
    ue8m0, fmt = _check_quant_args("x", x, scale_fmt, fp8_format)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the one being quantized)")
    _check_tile("group_size", group_size)
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"the last dimension of x ({k}) must be a multiple of group_size ({group_size})")
    if m_major_scales and x.dim() != 2:
        raise ValueError(f"m_major_scales needs a 2-D x [M, K], got shape {list(x.shape)}")
    if resolve_backend(backend, x) == "torch":
        q, s = ref.per_token_group_quant_ref(x, group_size, scale_fmt, fmt.name)
        return Quantized(q, s.T.contiguous().T if m_major_scales else s)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty(m, k, dtype=fmt.dtype, device=x.device)
    s = torch.empty(m, k // group_size, dtype=torch.float32, device=x.device)
    if m_major_scales:
        s = torch.empty(k // group_size, m, dtype=torch.float32, device=x.device).T
    if m and k:

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]), k // group_size)

        _token_group_quant_kernel[grid](
            x2, q, s, m, k, triton.next_power_of_2(m), x2.stride(0), q.stride(0), s.stride(0), s.stride(1),
            GROUP=group_size, UE8M0=ue8m0, CVT=cvt_mode(use_ptx, fmt.fnuz), FNUZ=fmt.fnuz, FP8_MAX=fmt.max,
        )
    if m_major_scales:
        return Quantized(q, s)
    return Quantized(q.reshape(*lead, k), s.reshape(*lead, k // group_size))


def per_block_quant(
    w: torch.Tensor,
    block: int = BLOCK,
    *,
    scale_fmt: str | None = None,
    fp8_format: str | None = None,
    backend: str | None = None,
    use_ptx: bool | None = None,
) -> Quantized:
    """Quantize weights per ``block x block`` tile of the last two dimensions.

    Args:
        w: ``[N, K]`` or ``[G, N, K]`` bf16 / fp16 / fp32; ragged edges (N or K not a multiple of
            ``block``) are allowed and count as zeros in the edge tiles' max-abs.
        block: tile side, a power of two >= 16 (128 in DeepSeek-V3).
        scale_fmt, fp8_format, backend, use_ptx: as in :func:`per_token_group_quant`.

    Returns:
        ``Quantized(data [..., N, K] float8_e4m3fn | float8_e4m3fnuz,
        scales [..., ceil(N/block), ceil(K/block)] float32)``.
        No host synchronisation.
    """
    ue8m0, fmt = _check_quant_args("w", w, scale_fmt, fp8_format)
    if w.dim() not in (2, 3):
        raise ValueError(f"w must be [N, K] or [G, N, K], got shape {list(w.shape)}")
    _check_tile("block", block)
    if resolve_backend(backend, w) == "torch":
        return Quantized(*ref.per_block_quant_ref(w, block, scale_fmt, fmt.name))
    w3 = w.unsqueeze(0) if w.dim() == 2 else w
    if w3.stride(-1) != 1:
        w3 = w3.contiguous()
    g, n, k = w3.shape
    q = torch.empty(g, n, k, dtype=fmt.dtype, device=w.device)
    s = torch.empty(g, cdiv(n, block), cdiv(k, block), dtype=torch.float32, device=w.device)
    if g and n and k:
        grid = (cdiv(n, block), cdiv(k, block), g)
        _block_quant_kernel[grid](
            w3, q, s, n, k, w3.stride(0), w3.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
            s.stride(2), BLOCK=block, UE8M0=ue8m0, CVT=cvt_mode(use_ptx, fmt.fnuz), FNUZ=fmt.fnuz, FP8_MAX=fmt.max,
            num_warps=BLOCK_QUANT_WARPS[platform.backend() == "rocm"],
        )
    if w.dim() == 2:
        q, s = q[0], s[0]
    return Quantized(q, s)


def per_token_group_dequant(q: torch.Tensor, scales: torch.Tensor, group_size: int = BLOCK,
                            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`per_token_group_quant`: ``q [..., K]`` e4m3 (fn or fnuz), ``scales [..., K/group_size]``
    -> ``[..., K]``."""
    check_dtype("q", q, *FP8_DTYPES)
    check_dtype("scales", scales, torch.float32)
    want = (*q.shape[:-1], q.shape[-1] // group_size)
    if q.shape[-1] % group_size or tuple(scales.shape) != want:
        raise ValueError(f"scales must have shape {list(want)} for q of shape {list(q.shape)} and "
                         f"group_size {group_size}, got {list(scales.shape)}")
    return ref.per_token_group_dequant_ref(q, scales, group_size).to(out_dtype)


def per_block_dequant(q: torch.Tensor, scales: torch.Tensor, block: int = BLOCK,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`per_block_quant`: ``q [..., N, K]`` e4m3 (fn or fnuz),
    ``scales [..., ceil(N/B), ceil(K/B)]``."""
    check_dtype("q", q, *FP8_DTYPES)
    check_dtype("scales", scales, torch.float32)
    want = (*q.shape[:-2], cdiv(q.shape[-2], block), cdiv(q.shape[-1], block))
    if tuple(scales.shape) != want:
        raise ValueError(f"scales must have shape {list(want)} for q of shape {list(q.shape)} and block {block}, "
                         f"got {list(scales.shape)}")
    return ref.per_block_dequant_ref(q, scales, block).to(out_dtype)
