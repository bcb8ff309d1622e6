"""Fine-grained FP8 kernels in Triton (names follow DeepGEMM), each with a plain-torch reference.

* quantizers: :func:`per_token_group_quant` (1x128 tiles), :func:`per_block_quant` (128x128 blocks) and
  their dequantizers;
* GEMMs: :func:`fp8_gemm_nt`, :func:`m_grouped_fp8_gemm_nt_contiguous`, :func:`m_grouped_fp8_gemm_nt_masked`
  (persistent, ``num_sms``-bounded);
* the MoE experts' layer: :func:`grouped_fp8_linear` with :class:`FP8WeightCache`.

``MOEKIT_KERNELS=triton|torch`` or ``backend=`` chooses the implementation (default: Triton on GPU
tensors, the torch reference on CPU tensors). See docs/fp8.md.
"""

from .fp8_linear import FP8WeightCache, grouped_fp8_linear
from .gemm import fp8_gemm_nt
from .grouped import (
    check_contiguous_layout,
    get_m_alignment_for_contiguous_layout,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
)
from .quant import Quantized, per_block_dequant, per_block_quant, per_token_group_dequant, per_token_group_quant

__all__ = [
    "FP8WeightCache",
    "Quantized",
    "check_contiguous_layout",
    "fp8_gemm_nt",
    "get_m_alignment_for_contiguous_layout",
    "grouped_fp8_linear",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "per_block_dequant",
    "per_block_quant",
    "per_token_group_dequant",
    "per_token_group_quant",
]
