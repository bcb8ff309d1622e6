"""``fp8_gemm_nt``: FP8 E4M3 GEMM with 1x128 activation scales and 128x128 weight scales, persistent grid.

Math (per output tile, B = 128 = BLOCK_K)::

    out[m, n] = sum_kb  (sum_{k in kb} a[m, k] * b[n, k])  *  a_scales[m, kb] * b_scales[n // B, kb]

The inner sum is one tensor-core dot over 128 of K, started from zero; its fp32 result is scaled and added
to the fp32 accumulator: DeepSeek-V3's "promotion to FP32 every 128 elements of K", which keeps the tensor
cores' limited-precision accumulation to short runs.

Persistence: the grid has ``min(num_sms, tiles)`` programs, each walking tiles ``pid, pid + num_sms, ...``,
so a caller can leave SMs free for communication kernels running beside the GEMM. The tile loop and the
dot loop live in :func:`fp8_tile_dot` and :func:`tile_coords`, shared with the grouped kernels.

Operand loads: pointers (Triton's cp.async pipelining) or, with ``MOEKIT_TMA=1``, host-side TMA descriptors
(:func:`use_tma`); a ``tl.constexpr`` picks the path, so each compiles without the other.

Autotuning: one config list per vendor (:func:`get_cuda_configs`, :func:`get_hip_configs`, and a single small
one in the interpreter), keyed on ``(next_pow2(M), N, K, num_sms)`` so that a changing token count does not
retune every step. ``MOEKIT_AUTOTUNE=0`` (read at import) keeps only the first config.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moekit import platform
from moekit._util import check_positive_int

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer path only
    TensorDescriptor = None

from . import reference as ref
from ._backend import (
    BLOCK,
    FP8_DTYPES,
    cdiv,
    check_dtype,
    check_k,
    check_ndim,
    check_shape,
    resolve_backend,
    same_device,
)

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def set_descriptor_blocks(nargs: dict) -> None:
    """Autotune pre-hook: give the operands' TMA descriptors (when the launch uses them) the config's tile."""
    bk = nargs["BLOCK_K"]
    for name, rows in (("a_ptr", nargs["BLOCK_M"]), ("b_ptr", nargs["BLOCK_N"])):
        if TensorDescriptor is not None and isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [rows, bk]


def _config(kwargs: dict, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages, pre_hook=set_descriptor_blocks)


def get_cuda_configs() -> list[triton.Config]:
    """NVIDIA (Hopper first): tiles whose fp32 accumulator + per-128-K partial product fit in registers."""
    c = _config
    return [
        c({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        c({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=5),
    ]


def get_hip_configs() -> list[triton.Config]:
    """AMD (CDNA3 / CDNA4): two stages, since NVIDIA's 4-stage 128x128 tile asks for 96 KB of LDS per program and
    an MI300 CU has 64 KB (``moekit info --targets``, docs/portability.md). ``waves_per_eu`` and
    ``matrix_instr_nonkdim`` stay at the compiler's defaults until an AMD device times them."""
    c = _config
    return [
        c({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=2),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=2),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=2),
    ]


def get_interpreter_configs() -> list[triton.Config]:
    """Triton's interpreter: one small tile (BLOCK_N < 128 exercises the per-column weight-scale lookup)."""
    return [_config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 2}, num_warps=4, num_stages=1)]


def get_configs() -> list[triton.Config]:
    """The config list for this machine (see the module docstring)."""
    if platform.triton_interpreted():
        return get_interpreter_configs()
    configs = get_hip_configs() if platform.backend() == "rocm" else get_cuda_configs()
    if os.environ.get("MOEKIT_AUTOTUNE", "1") == "0":
        configs = configs[:1]
    return configs


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("swizzled") tile order: GROUP_M row-tiles share each column of B while it sits in L2."""
    width = GROUP_M * num_pid_n
    group = tile_id // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % width) % size_m
    pid_n = (tile_id % width) // size_m
    return pid_m, pid_n


@triton.jit
def _promote(acc, a, b, sa, sb, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A fresh fp32 dot per 128 of K, promoted (scaled, added) into the fp32 accumulator.
    if BLOCK_N <= BLOCK_K:
        return acc + tl.dot(a, tl.trans(b)) * (sa * sb)[:, None]
    else:
        return acc + tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]


@triton.jit
def fp8_tile_dot(
    a_src, as_ptr, b_src, bs_ptr, a_row0, offs_m, b_row0, offs_n, n_block, k_tiles,
    stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``(a * as) @ (b * bs).T``.

    Operands come through TMA descriptors (``USE_TMA``: rows ``a_row0...`` / ``b_row0...`` of 2-D views,
    out-of-range rows zero-filled) or pointers (``offs_m`` / ``offs_n``, already clamped in range). Scales
    are read through pointers with ``offs_m`` either way; ``n_block`` is the 128-block of N holding the
    tile's first column.
    """
    as_ptrs = as_ptr + offs_m * stride_asm
    if BLOCK_N <= BLOCK_K:
        # BLOCK_N divides 128: the tile lies in one weight block, whose scale is one scalar per K step.
        bs_ptrs = bs_ptr + n_block * stride_bsn
    else:
        bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        for ki in range(0, k_tiles):
            a = a_src.load([a_row0, ki * BLOCK_K])
            b = b_src.load([b_row0, ki * BLOCK_K])
            acc = _promote(acc, a, b, tl.load(as_ptrs), tl.load(bs_ptrs), BLOCK_N, BLOCK_K)
            as_ptrs += stride_ask
            bs_ptrs += stride_bsk
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_src + offs_m[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_src + offs_n[:, None] * stride_bn + offs_k[None, :]
        for _ in range(0, k_tiles):
            acc = _promote(acc, tl.load(a_ptrs), tl.load(b_ptrs), tl.load(as_ptrs), tl.load(bs_ptrs), BLOCK_N, BLOCK_K)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
            as_ptrs += stride_ask
            bs_ptrs += stride_bsk
    return acc


@triton.jit
def clamped_offsets(pid, size, BLOCK: tl.constexpr):
    """Row/column offsets of a tile, out-of-range ones folded onto row 0 so that the K loop needs no masks."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs = tl.where(offs < size, offs, 0).to(tl.int64)
    return tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)


@triton.autotune(configs=get_configs(), key=["M_BUCKET", "N", "K", "NUM_SMS", "USE_TMA"])
@triton.jit
def _fp8_gemm_nt_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cm,
    NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = K // BLOCK_K
    for tile_id in tl.range(pid, num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = clamped_offsets(pid_m, M, BLOCK_M)
        offs_n = clamped_offsets(pid_n, N, BLOCK_N)
        acc = fp8_tile_dot(a_ptr, as_ptr, b_ptr, bs_ptr, pid_m * BLOCK_M, offs_m, pid_n * BLOCK_N, offs_n,
                           pid_n * BLOCK_N // BLOCK_K, k_tiles, stride_am, stride_asm, stride_ask, stride_bn,
                           stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def resolve_num_sms(num_sms: int | None, device: torch.device) -> int:
    """``num_sms`` or all SMs of ``device``; a positive int (the interpreter "has" as many as asked)."""
    if num_sms is None:
        return platform.sm_count(device.index) if device.type == "cuda" else 4
    check_positive_int("num_sms", num_sms, none_ok=True)
    return num_sms


def m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


def check_operands(a, a_scales, b, b_scales, a_lead: tuple[int, ...], b_lead: tuple[int, ...]) -> tuple[int, int]:
    """Shared checks of the GEMMs: dtypes, K multiple of 128, scale shapes; returns (N, K)."""
    check_dtype("a", a, *FP8_DTYPES)
    check_dtype("b", b, *FP8_DTYPES)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must use one FP8 format, got a {a.dtype} and b {b.dtype}")
    check_dtype("a_scales", a_scales, torch.float32)
    check_dtype("b_scales", b_scales, torch.float32)
    k = a.shape[-1]
    n = b.shape[-2]
    if b.shape[-1] != k:
        raise ValueError(f"a and b must share K (the last dimension), got a {list(a.shape)} and b {list(b.shape)}")
    check_k("K", k)
    check_shape("a_scales", a_scales, (*a_lead, k // BLOCK), "one fp32 scale per 1x128 tile of a")
    check_shape("b_scales", b_scales, (*b_lead, cdiv(n, BLOCK), k // BLOCK), "one fp32 scale per 128x128 block of b")
    same_device(a=a, a_scales=a_scales, b=b, b_scales=b_scales)
    return n, k


def check_gemm_args(a, a_scales, b, b_scales, out_dtype: torch.dtype, a_dims: str, b_dims: str, *,
                    same_groups: bool = False) -> tuple[int, int]:
    """The launchers' shared preamble: the ranks of ``a`` and ``b`` (``a_dims`` like ``"[G, M_max, K]"``),
    ``out_dtype``, with ``same_groups`` one group count in ``a`` and ``b``, then :func:`check_operands` with
    the leading dims of ``a`` (its scales') and ``b`` (its scales'); returns (N, K)."""
    check_ndim("a", a, a_dims.count(",") + 1, a_dims)
    check_ndim("b", b, b_dims.count(",") + 1, b_dims)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if same_groups and b.shape[0] != a.shape[0]:
        raise ValueError(f"a and b must have the same number of groups, got a {list(a.shape)} and b {list(b.shape)}")
    return check_operands(a, a_scales, b, b_scales, tuple(a.shape[:-1]), tuple(b.shape[:-2]))


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def use_tma(*operands: torch.Tensor) -> bool:
    """Whether the GEMMs load their FP8 operands through TMA descriptors: opt-in with ``MOEKIT_TMA=1``
    (read per call) on NVIDIA sm_90+ (or in the interpreter, which emulates them), 16-byte aligned operands.
    """
    if os.environ.get("MOEKIT_TMA", "0") != "1" or TensorDescriptor is None:
        return False
    # TMA wants 16-byte aligned bases and row strides (FP8: one byte per element).
    if not all(t.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in t.stride()[:-1]) for t in operands):
        return False
    if platform.triton_interpreted():
        return True
    return platform.backend() == "cuda" and torch.cuda.get_device_capability(operands[0].device)[0] >= 9


def kernel_operands(a: torch.Tensor, b: torch.Tensor, *, flat_a: bool = False,
                    flat_b: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(a, b, tma)`` as the GEMM kernels load them: last dims contiguous, and with TMA (:func:`use_tma`)
    fully contiguous where ``flat_a`` / ``flat_b`` (a descriptor then sees that operand as one 2-D
    ``[G * rows, K]`` view)."""
    a, b = last_dim_contiguous(a), last_dim_contiguous(b)
    tma = use_tma(a, b)
    if tma:
        a, b = (a.contiguous() if flat_a else a), (b.contiguous() if flat_b else b)
    return a, b, tma


def operand_arg(t2d: torch.Tensor, tma: bool):
    """The kernel argument for a 2-D FP8 operand: itself, or a TMA descriptor over it (tile set by the pre-hook)."""
    return TensorDescriptor.from_tensor(t2d, [16, BLOCK]) if tma else t2d


def fp8_gemm_nt(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    num_sms: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out = a @ b.T`` with DeepSeek-V3's fine-grained FP8 scaling.

    Args:
        a: ``[M, K]`` float8_e4m3fn (or float8_e4m3fnuz, AMD MI300's native format), ``K`` a multiple of 128.
        a_scales: ``[M, K/128]`` float32, one per 1x128 tile of ``a`` (any strides: row-major from
            :func:`per_token_group_quant`, or M-major as DeepGEMM stores them).
        b: ``[N, K]``, the same FP8 dtype as ``a`` (any N).
        b_scales: ``[ceil(N/128), K/128]`` float32, one per 128x128 block of ``b``.
        out_dtype: bf16 (default), fp16 or fp32.
        num_sms: at most this many persistent programs (default: every SM), leaving the rest to others.
        backend: ``"triton"``, ``"torch"`` or ``None`` (``MOEKIT_KERNELS``, else Triton on GPU tensors).

    Returns:
        ``[M, N]`` in ``out_dtype``. No host synchronisation; CUDA-graph safe once autotuned for the shape.
    """
    n, k = check_gemm_args(a, a_scales, b, b_scales, out_dtype, "[M, K]", "[N, K]")
    m = a.shape[0]
    sms = resolve_num_sms(num_sms, a.device)
    if resolve_backend(backend, a) == "torch":
        return ref.fp8_gemm_nt_ref(a, a_scales, b, b_scales, out_dtype)
    a, b, tma = kernel_operands(a, b)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out

    def grid(meta):
        return (min(sms, cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"])),)

    _fp8_gemm_nt_kernel[grid](
        operand_arg(a, tma), a_scales, operand_arg(b, tma), b_scales, out, m, n, k, m_bucket(m),
        a.stride(0), a_scales.stride(0), a_scales.stride(1), b.stride(0), b_scales.stride(0), b_scales.stride(1),
        out.stride(0), NUM_SMS=sms, BLOCK_K=BLOCK, USE_TMA=tma,
    )
    return out
