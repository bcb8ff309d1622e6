"""``grouped_fp8_linear``: the MoE experts' linear layer in FP8 (forward), differentiable (backward in bf16/fp32).

Forward, per call: activations are quantized per 1x128 tile online; weights come block-quantized (128x128)
from an :class:`FP8WeightCache` (re-quantized only when the weight changes); rows are regrouped into
per-expert segments padded to the contiguous kernel's alignment, multiplied by
:func:`m_grouped_fp8_gemm_nt_contiguous`, and put back in the caller's row order.

Backward runs in the input's dtype with plain torch matmuls, one per non-empty expert, and treats the
quantization as the identity (straight-through): ``grad_x = grad_out @ W[g]``, ``grad_W[g] = grad_out.T @ x``.
The backward runs in bf16/fp32; DeepSeek-V3 also runs the two backward GEMMs in FP8 (not done here).

Shape legend: M rows (token-expert pairs), K in-features, N out-features, G experts, A = row alignment (128).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._util import round_up
from ._backend import BLOCK, check_dtype, check_ndim, check_shape
from .grouped import get_m_alignment_for_contiguous_layout, m_grouped_fp8_gemm_nt_contiguous
from .quant import Quantized, per_block_quant, per_token_group_quant

_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FP8WeightCache:
    """The 128x128 block-quantized copy of one weight tensor, rebuilt when the weight changes.

    The key is ``(data_ptr, _version, shape, dtype, device)``: an optimizer step (an in-place update under
    ``no_grad``) bumps ``_version``, a re-assignment changes ``data_ptr``. Writes through ``weight.data``
    bypass the version counter: call :meth:`clear` after those. One cache per weight tensor.
    """

    def __init__(self, scale_fmt: str | None = None):
        self.scale_fmt = scale_fmt
        self._key: tuple | None = None
        self._value: Quantized | None = None
        self.rebuilds = 0  # how many times the weight was quantized (tests and stats read it)

    def get(self, weight: torch.Tensor, backend: str | None = None) -> Quantized:
        """``Quantized(data [G, N, K] e4m3, scales [G, ceil(N/128), K/128] fp32)`` of ``weight``."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device)
        if key != self._key or self._value is None:
            self._value = per_block_quant(weight.detach(), BLOCK, scale_fmt=self.scale_fmt, backend=backend)
            self._key = key
            self.rebuilds += 1
        return self._value

    def clear(self) -> None:
        self._key = None
        self._value = None


class ContiguousLayout(NamedTuple):
    """Where each row goes in the padded, per-expert contiguous layout (P padded rows)."""

    src: torch.Tensor  # [P] int64: source row of x for each padded row; M (a zero row) for padding
    m_indices: torch.Tensor  # [P] int32: expert of each padded row, -1 for padding
    dest: torch.Tensor  # [M] int64: padded row of each row of x; rows with m_indices -1 point at a padding row


def contiguous_layout(m_indices: torch.Tensor, num_groups: int, align: int | None = None) -> ContiguousLayout:
    """Plan the padded layout of ``m_indices [M]`` (values in ``[-1, num_groups)``).

    No host sync on GPU tensors: P is then the bound ``round_up(M + G*(A-1), A) + A``; on CPU tensors P is
    exact (``sum_g round_up(count_g, A) + A``). The last A rows are always padding, so ``-1`` rows can point
    at a row the kernel writes as zeros.
    """
    align = align or get_m_alignment_for_contiguous_layout()
    dev = m_indices.device
    m = m_indices.long()
    rows = m.numel()
    key = torch.where(m >= 0, m, num_groups)  # -1 sorts after every expert
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_groups] + align - 1) // align * align  # [G]
    pad_start = torch.cumsum(padded, 0) - padded  # [G]
    start = torch.cumsum(counts, 0) - counts  # [G+1], in sorted order
    if m_indices.is_cuda:
        used = round_up(rows + num_groups * (align - 1), align)
    else:
        used = int(padded.sum())
    total = used + align
    order = torch.argsort(key, stable=True)  # [M]
    skey = key[order]
    rank = torch.arange(rows, device=dev) - start[skey]
    valid = skey < num_groups
    dest_sorted = torch.where(valid, pad_start[skey.clamp(max=max(num_groups - 1, 0))] + rank, total - 1)
    dest = torch.empty(rows, dtype=torch.long, device=dev).scatter_(0, order, dest_sorted)
    trash = torch.where(valid, dest_sorted, total)  # -1 rows write into a slot sliced off below
    src = torch.full((total + 1,), rows, dtype=torch.long, device=dev).scatter_(0, trash, order)[:total]
    m_pad = torch.full((total + 1,), -1, dtype=torch.int32, device=dev)
    m_pad = m_pad.scatter_(0, trash, skey.to(torch.int32))[:total]
    return ContiguousLayout(src, m_pad, dest)


def _forward(x, m_indices, wq: Quantized, backend) -> torch.Tensor:
    num_groups = wq.data.shape[0]
    lay = contiguous_layout(m_indices, num_groups)
    xq, xs = per_token_group_quant(x, BLOCK, backend=backend)  # quantize M rows, then move bytes
    k = x.shape[1]
    xq_ext = torch.cat([xq.view(torch.uint8), xq.new_zeros(1, k, dtype=torch.uint8)])
    xs_ext = torch.cat([xs, xs.new_ones(1, xs.shape[1])])
    a = xq_ext.index_select(0, lay.src).view(xq.dtype)  # [P, K]
    a_s = xs_ext.index_select(0, lay.src)  # [P, K/128]
    out = m_grouped_fp8_gemm_nt_contiguous(a, a_s, wq.data, wq.scales, lay.m_indices, out_dtype=x.dtype,
                                           backend=backend)  # [P, N]
    return out.index_select(0, lay.dest)  # [M, N]


def _backward(grad_out, x, m_indices, weight, need_x: bool, need_w: bool):
    num_groups = weight.shape[0]
    m = m_indices.long()
    key = torch.where(m >= 0, m, num_groups)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_groups + 1).tolist()  # one host sync per backward
    go = grad_out.index_select(0, order)
    xs = x.index_select(0, order)
    gx_sorted = torch.zeros_like(x) if need_x else None
    gw = torch.zeros_like(weight) if need_w else None
    off = 0
    for g in range(num_groups):
        c = counts[g]
        if c:
            seg = slice(off, off + c)
            w_g = weight[g].to(go.dtype)  # [N, K]
            if need_x:
                gx_sorted[seg] = go[seg] @ w_g
            if need_w:
                gw[g] = (go[seg].T @ xs[seg]).to(weight.dtype)
        off += c
    gx = None
    if need_x:
        gx = torch.empty_like(x).index_copy_(0, order, gx_sorted)
    return gx, gw


class _GroupedFP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, m_indices, weight, wq_data, wq_scales, backend):
        ctx.save_for_backward(x, m_indices, weight)
        return _forward(x, m_indices, Quantized(wq_data, wq_scales), backend)

    @staticmethod
    def backward(ctx, grad_out):
        x, m_indices, weight = ctx.saved_tensors
        gx, gw = _backward(grad_out.contiguous(), x, m_indices, weight, ctx.needs_input_grad[0],
                           ctx.needs_input_grad[2])
        return gx, None, gw, None, None, None


def grouped_fp8_linear(
    x: torch.Tensor,
    m_indices: torch.Tensor,
    weight: torch.Tensor,
    *,
    weight_cache: FP8WeightCache | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-row expert linear ``out[i] = x[i] @ weight[m_indices[i]].T`` with an FP8 forward.

    Args:
        x: ``[M, K]`` bf16 / fp16 / fp32; rows in any order (they need not be sorted by expert).
        m_indices: ``[M]`` int32 / int64 on x's device: each row's expert in ``[0, G)``, or ``-1`` to skip
            the row (its output row is zero, its gradient too).
        weight: ``[G, N, K]`` (any float dtype; gradients come back in it). ``K`` must be a multiple of 128
            (1x128 / 128x128 scaling); ``N`` may be anything.
        weight_cache: an :class:`FP8WeightCache` for this weight; without one the weight is quantized on
            every call.
        backend: ``"triton"``, ``"torch"`` or ``None`` (``MOEKIT_KERNELS``, else Triton on GPU tensors).

    Returns:
        ``[M, N]`` in x's dtype, differentiable wrt ``x`` and ``weight`` (backward in x's dtype, torch).

    Forward: no host sync on GPU (the padded size is an upper bound); backward syncs once (expert counts).
    """
    check_dtype("x", x, *_X_DTYPES)
    check_ndim("x", x, 2, "[M, K]")
    check_ndim("weight", weight, 3, "[G, N, K]")
    check_dtype("weight", weight, torch.bfloat16, torch.float16, torch.float32)
    check_dtype("m_indices", m_indices, torch.int32, torch.int64)
    num_groups, _, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x [M, K] and weight [G, N, K] must share K, got x {list(x.shape)} and "
                         f"weight {list(weight.shape)}")
    if k % BLOCK or k == 0:
        raise ValueError(f"grouped_fp8_linear needs the in-features K (= {k}) to be a positive multiple of {BLOCK} "
                         f"(FP8 scales cover 1x{BLOCK} / {BLOCK}x{BLOCK} tiles); models whose hidden or expert "
                         f"intermediate size is not a multiple of {BLOCK} must use the bf16 experts")
    check_shape("m_indices", m_indices, (x.shape[0],), "one expert index per row of x")
    if not m_indices.is_cuda and m_indices.numel():
        lo, hi = int(m_indices.min()), int(m_indices.max())
        if lo < -1 or hi >= num_groups:
            raise ValueError(f"m_indices must lie in [-1, {num_groups}), got values in [{lo}, {hi}]")
    wq = weight_cache.get(weight, backend) if weight_cache is not None else per_block_quant(
        weight.detach(), BLOCK, backend=backend)
    return _GroupedFP8Linear.apply(x, m_indices, weight, wq.data, wq.scales, backend)
