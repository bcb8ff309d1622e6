"""Plain-torch references of every FP8 kernel (the CPU path and what the Triton kernels are tested against), and
moekit's dequantizers of stored formats (MXFP4: :func:`mxfp4_dequant_ref`).

Quantization (DeepSeek-V3's recipe): a scale is the tile's max-abs (clamped below at 1e-4) over the format's
max (448 for e4m3fn, 240 for e4m3fnuz), the data is ``x / scale`` rounded to e4m3 with saturation;
``scale_fmt="ue8m0"`` rounds each scale up to a power of two. GEMMs dequantize both operands and multiply in
fp32, which is what the kernels compute with their per-128-of-K fp32 promotion (up to fp32 summation order).

Shape legend: M rows of activations, N output features, K reduction, G groups (experts), B = 128.
"""

from __future__ import annotations

import torch

from ._backend import FP8_FORMATS, cdiv

AMAX_EPS = 1e-4  # floor of a tile's max-abs, so that all-zero tiles get a finite scale


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``s`` (fp32, positive, normal), by bits so that it is exact everywhere."""
    bits = s.contiguous().view(torch.int32)
    up = (bits & 0x7FFFFF) != 0
    out = (bits & 0x7F800000) + (up.to(torch.int32) << 23)
    return out.view(torch.float32).reshape(s.shape)


def _scale(amax: torch.Tensor, scale_fmt: str | None, fp8_format: str) -> torch.Tensor:
    s = amax.clamp_min(AMAX_EPS) / FP8_FORMATS[fp8_format].max
    return ceil_pow2(s) if scale_fmt == "ue8m0" else s


def _to_e4m3(y: torch.Tensor, fp8_format: str) -> torch.Tensor:
    # Saturate first: torch's cast overflows to NaN (e4m3fnuz) rather than clamping.
    f = FP8_FORMATS[fp8_format]
    return y.clamp(-f.max, f.max).to(f.dtype)


def per_token_group_quant_ref(x: torch.Tensor, group_size: int, scale_fmt: str | None, fp8_format: str = "e4m3fn"):
    """``x [..., K]`` -> ``(e4m3 [..., K] in fp8_format, fp32 [..., K/group_size])``."""
    *lead, k = x.shape
    g = x.float().reshape(*lead, k // group_size, group_size)
    s = _scale(g.abs().amax(dim=-1), scale_fmt, fp8_format)  # [..., K/gs]
    q = _to_e4m3(g / s.unsqueeze(-1), fp8_format).reshape(*lead, k)
    return q, s


def per_token_group_dequant_ref(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``q [..., K]`` times its 1 x ``group_size`` scales ``[..., >= ceil(K/group_size)]`` -> fp32 ``[..., K]``; the
    last group may be partial (DeepEP's 1x128 tiles of any hidden size)."""
    k = q.shape[-1]
    return q.float() * scales.repeat_interleave(group_size, dim=-1)[..., :k]


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    *lead, n, k = w.shape
    pn, pk = cdiv(n, block) * block, cdiv(k, block) * block
    if (pn, pk) == (n, k):
        return w
    out = w.new_zeros(*lead, pn, pk)
    out[..., :n, :k] = w
    return out


def per_block_quant_ref(w: torch.Tensor, block: int, scale_fmt: str | None = None, fp8_format: str = "e4m3fn"):
    """``w [..., N, K]`` -> ``(e4m3 [..., N, K] in fp8_format, fp32 [..., ceil(N/B), ceil(K/B)])``; ragged edges
    count as zeros."""
    *lead, n, k = w.shape
    p = _pad_to_blocks(w.float(), block)
    nb, kb = p.shape[-2] // block, p.shape[-1] // block
    t = p.reshape(*lead, nb, block, kb, block)
    s = _scale(t.abs().amax(dim=(-3, -1)), scale_fmt, fp8_format)  # [..., nb, kb]
    q = _to_e4m3(t / s[..., :, None, :, None], fp8_format).reshape(*lead, nb * block, kb * block)
    return q[..., :n, :k], s


def per_block_dequant_ref(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    *lead, n, k = q.shape
    p = _pad_to_blocks(q.float(), block)
    nb, kb = p.shape[-2] // block, p.shape[-1] // block
    t = p.reshape(*lead, nb, block, kb, block) * scales[..., :, None, :, None]
    return t.reshape(*lead, nb * block, kb * block)[..., :n, :k].contiguous()


# --- MXFP4 (OCP Microscaling Formats (MX) Specification v1.0, section 5: MXFP4 = 32 FP4 E2M1 elements sharing
# one E8M0 scale) -------------------------------------------------------------------------------------------------

MXFP4_BLOCK = 32  # elements per shared scale (OCP MX v1.0, section 5: k = 32 for every concrete MX format)
# The 16 FP4 E2M1 values by code (OCP MX v1.0, section 5, the FP4 element type): bit 3 the sign, bits 2-1 the
# exponent (bias 1), bit 0 the mantissa; exponent 0 is subnormal (0, 0.5); no Inf/NaN codes; max 6.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127  # an E8M0 scale byte s means 2**(s - 127) (OCP MX v1.0, section 5, the E8M0 scale type)
E8M0_NAN = 0xFF  # ... except 0xFF, the format's only special value: NaN, which makes its whole block NaN
_MXFP4_OUT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MXFP4_CHUNK = 1 << 20  # blocks per step: bounds the intermediates (32M values: int64 codes, fp32 products)


def _e8m0_scale(scales: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 ``[...]`` -> fp32 ``2**(s - 127)``, built from its bits so that it is exact everywhere:
    s >= 1 is the normal fp32 with biased exponent s (both formats use bias 127), s = 0 is 2**-127, the fp32
    subnormal with only mantissa bit 22 set, and 0xFF is a quiet NaN."""
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 1 << 22), s << 23)
    bits = torch.where(s == E8M0_NAN, torch.full_like(s, 0x7FC00000), bits)
    return bits.view(torch.float32)


def mxfp4_dequant_ref(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                      ) -> torch.Tensor:
    """MXFP4 ``blocks`` and their E8M0 ``scales`` -> floats ``[..., G * 32]`` in ``dtype``.

    blocks: uint8 ``[..., G, 16]``: G blocks of 32 FP4 E2M1 codes, two per byte, element ``2j`` in the low
    nibble of byte j and element ``2j + 1`` in the high nibble (the layout of gpt-oss's checkpoints, e.g.
    ``mlp.experts.down_proj_blocks`` ``[E, H, I/32, 16]``; transformers reads them so in
    ``transformers/integrations/mxfp4.py``). scales: uint8 ``[..., G]``, one E8M0 byte per block (value
    ``2**(s - 127)``, 0xFF = NaN). dtype: float16, bfloat16, float32 or float64.

    Returns ``[..., G * 32]`` in ``dtype``: element ``32g + i`` = ``E2M1[code] * 2**(scales[g] - 127)``, correctly
    rounded into ``dtype`` (formed exactly in fp32, or fp64 for a float64 result, then cast once: fp32 holds
    every product down to 0.5 * 2**-127, and overflows only where ``dtype`` does); a NaN scale gives a NaN
    block. No transpose: the checkpoint's own row layout (see ``from_pretrained`` for gpt-oss's). Raises
    ``ValueError`` / ``TypeError`` naming the argument for a wrong shape or dtype.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise TypeError(f"mxfp4_dequant_ref: blocks must be a uint8 tensor [..., G, 16], got "
                        f"{getattr(blocks, 'dtype', type(blocks).__name__)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.uint8:
        raise TypeError(f"mxfp4_dequant_ref: scales must be a uint8 (E8M0) tensor [..., G], got "
                        f"{getattr(scales, 'dtype', type(scales).__name__)}")
    if blocks.dim() < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"mxfp4_dequant_ref: blocks must be [..., G, {MXFP4_BLOCK // 2}] (32 FP4 values per "
                         f"block, two per byte), got {list(blocks.shape)}")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"mxfp4_dequant_ref: scales must be blocks.shape[:-1] = {list(blocks.shape[:-1])} (one "
                         f"per block), got {list(scales.shape)}")
    if dtype not in _MXFP4_OUT:
        raise ValueError(f"mxfp4_dequant_ref: dtype must be one of {_MXFP4_OUT}, got {dtype}")
    *lead, g, nb = blocks.shape
    work = torch.float64 if dtype == torch.float64 else torch.float32
    lut = torch.tensor(E2M1_VALUES, dtype=work, device=blocks.device)
    flat_b, flat_s = blocks.reshape(-1, nb), scales.reshape(-1)
    out = torch.empty(flat_b.shape[0], MXFP4_BLOCK, dtype=dtype, device=blocks.device)
    for r0 in range(0, flat_b.shape[0], _MXFP4_CHUNK):
        b = flat_b[r0:r0 + _MXFP4_CHUNK]
        codes = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(b.shape[0], MXFP4_BLOCK)  # low nibble first
        scale = _e8m0_scale(flat_s[r0:r0 + _MXFP4_CHUNK]).to(work)
        out[r0:r0 + _MXFP4_CHUNK] = lut[codes.long()] * scale[:, None]
    return out.reshape(*lead, g * MXFP4_BLOCK)


def fp8_gemm_nt_ref(a, a_scales, b, b_scales, out_dtype, block: int = 128) -> torch.Tensor:
    """``a [M, K]`` (1xB scales) times ``b [N, K]`` (BxB scales) transposed -> ``[M, N]`` in ``out_dtype``."""
    da = per_token_group_dequant_ref(a, a_scales, block)
    db = per_block_dequant_ref(b, b_scales, block)
    return (da @ db.T).to(out_dtype)


def m_grouped_contiguous_ref(a, a_scales, b, b_scales, m_indices, out_dtype, block: int = 128) -> torch.Tensor:
    """Row ``i`` of the result is ``a[i] @ b[m_indices[i]].T``; rows with ``m_indices == -1`` are zero."""
    da = per_token_group_dequant_ref(a, a_scales, block)  # [M, K]
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    m = m_indices.long()
    for g in torch.unique(m[m >= 0]).tolist():  # host sync: fine on the reference path
        rows = (m == g).nonzero().squeeze(1)
        db = per_block_dequant_ref(b[g], b_scales[g], block)  # [N, K]
        out[rows] = da[rows] @ db.T
    return out.to(out_dtype)


def m_grouped_masked_ref(a, a_scales, b, b_scales, masked_m, out_dtype, block: int = 128) -> torch.Tensor:
    """``out[g, i] = a[g, i] @ b[g].T`` for ``i < masked_m[g]``, zero for the other rows of ``[G, M_max, N]``."""
    da = per_token_group_dequant_ref(a, a_scales, block)  # [G, M_max, K]
    db = per_block_dequant_ref(b, b_scales, block)  # [G, N, K]
    out = torch.bmm(da, db.transpose(1, 2))
    keep = torch.arange(a.shape[1], device=a.device)[None, :] < masked_m.to(a.device)[:, None]
    return torch.where(keep[..., None], out, 0.0).to(out_dtype)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's accuracy measure ``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64 (0 when equal)."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)
