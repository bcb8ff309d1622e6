"""FP8 (e4m3) 1x128 tile quantization for the dispatch wire.

DeepSeek-V3 sends dispatched activations in FP8 with one scale per 1x128 tile, scales rounded up to
a power of two (so that dequantization is exact in any precision). ``scales`` are multipliers:
``x ≈ data.float() * scales`` broadcast over each 128-wide tile, as in DeepGEMM.
"""

from __future__ import annotations

import torch

from moekit.kernels import per_token_group_quant
from moekit.kernels._backend import BLOCK as TILE
from moekit.kernels._backend import FP8_DTYPE, FP8_MAX  # noqa: F401  (re-exported for ep/)


def num_scale_cols(hidden: int) -> int:
    return (hidden + TILE - 1) // TILE


def quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` float (H % 128 == 0) → ``(data [T, H] float8_e4m3fn, scales [T, H/128] float32)``.

    The ue8m0 (power-of-two) flavour of :func:`moekit.kernels.per_token_group_quant`: the Triton kernel
    on GPU tensors, its torch reference on the CPU.
    """
    assert x.shape[-1] % TILE == 0, x.shape
    # The wire stays OCP e4m3fn on every GPU (the FP8 checks of ep/ expect it); GEMMs on MI300 read fnuz.
    data, scales = per_token_group_quant(x, TILE, scale_fmt="ue8m0", fp8_format="e4m3fn")
    return data, scales


def dequantize_1x128(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_1x128`: ``[T, H]`` float32 (any H; the last tile may be partial)."""
    t, h = data.shape
    expanded = scales.float().repeat_interleave(TILE, dim=1)[:, :h]
    return data.float() * expanded
