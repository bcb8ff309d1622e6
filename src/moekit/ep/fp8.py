"""FP8 (e4m3) 1x128 tile quantization for the dispatch wire.

DeepSeek-V3 sends dispatched activations in FP8 with one scale per 1x128 tile, scales rounded up to
a power of two (so that dequantization is exact in any precision). ``scales`` are multipliers:
``x ≈ data.float() * scales`` broadcast over each 128-wide tile, as in DeepGEMM.
"""

from __future__ import annotations

import torch

from moekit._util import cdiv
from moekit.kernels import per_token_group_quant
from moekit.kernels._backend import BLOCK as TILE
from moekit.kernels._backend import FP8_DTYPE, FP8_MAX  # noqa: F401  (re-exported for ep/)
from moekit.kernels.reference import per_token_group_dequant_ref


def num_scale_cols(hidden: int) -> int:
    return cdiv(hidden, TILE)


def quantize_1x128(x: torch.Tensor, round_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` float (H % 128 == 0) → ``(data [T, H] float8_e4m3fn, scales [T, H/128] float32)``.

    The ue8m0 (power-of-two) flavour of :func:`moekit.kernels.per_token_group_quant` by default;
    ``round_scale=False``: plain ``amax / 448`` scales (DeepEP's low-latency default). The Triton kernel
    on GPU tensors, its torch reference on the CPU.
    """
    assert x.shape[-1] % TILE == 0, x.shape
    # The wire stays OCP e4m3fn on every GPU (the FP8 checks of ep/ expect it); GEMMs on MI300 read fnuz.
    data, scales = per_token_group_quant(x, TILE, scale_fmt="ue8m0" if round_scale else None, fp8_format="e4m3fn")
    return data, scales


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 ``scales [..., G]`` (G % 4 == 0) → ``[..., G/4]`` int32 of packed UE8M0 exponents.

    Byte j of word i (little-endian) is the biased exponent ``log2(scale) + 127`` of group ``4i + j``: the
    layout of DeepEP's ``low_latency_dispatch(use_ue8m0=True)`` scales (and of DeepGEMM's UE8M0 inputs).
    The exponent is the fp32 exponent field, exact for power-of-two scales in [2^-126, 2^127].
    """
    assert scales.dtype == torch.float32 and scales.shape[-1] % 4 == 0, (scales.dtype, scales.shape)
    exp = (scales.contiguous().view(torch.int32) >> 23) & 0xFF  # [..., G]
    exp = exp.view(*scales.shape[:-1], -1, 4)
    return exp[..., 0] | (exp[..., 1] << 8) | (exp[..., 2] << 16) | (exp[..., 3] << 24)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: ``[..., G/4]`` int32 → ``[..., G]`` fp32 powers of two."""
    parts = [(packed >> (8 * j)) & 0xFF for j in range(4)]
    exp = torch.stack(parts, dim=-1).flatten(-2)  # [..., G]
    return (exp.to(torch.int32) << 23).view(torch.float32)


def dequantize_1x128(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_1x128`: ``[T, H]`` float32 (any H; the last tile may be partial)."""
    return per_token_group_dequant_ref(data, scales.float(), TILE)
