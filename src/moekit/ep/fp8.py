"""FP8 (e4m3) 1x128 tile quantization for the dispatch wire, in plain torch.

DeepSeek-V3 sends dispatched activations in FP8 with one scale per 1x128 tile, scales rounded up to
a power of two (so that dequantization is exact in any precision). ``scales`` are multipliers:
``x ≈ data.float() * scales`` broadcast over each 128-wide tile, as in DeepGEMM.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
TILE = 128


def num_scale_cols(hidden: int) -> int:
    return (hidden + TILE - 1) // TILE


def quantize_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` float (H % 128 == 0) → ``(data [T, H] float8_e4m3fn, scales [T, H/128] float32)``."""
    t, h = x.shape
    assert h % TILE == 0, h
    tiles = x.float().reshape(t, h // TILE, TILE)
    amax = tiles.abs().amax(dim=2).clamp_min(1e-4)  # [T, H/128]; floor keeps all-zero tiles finite
    # Power-of-two scale >= amax / FP8_MAX: the largest element still fits after division.
    scales = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    data = (tiles / scales.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(t, h)
    return data, scales


def dequantize_1x128(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_1x128`: ``[T, H]`` float32 (any H; the last tile may be partial)."""
    t, h = data.shape
    expanded = scales.float().repeat_interleave(TILE, dim=1)[:, :h]
    return data.float() * expanded
