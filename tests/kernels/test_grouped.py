"""Grouped FP8 GEMMs (contiguous and masked) vs their references and the unquantized products."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.kernels import (
    check_contiguous_layout,
    get_m_alignment_for_contiguous_layout,
    m_grouped_fp8_gemm_nt_contiguous,
    m_grouped_fp8_gemm_nt_masked,
    per_block_quant,
    per_token_group_quant,
)
from moekit.kernels.reference import calc_diff

ALIGN = get_m_alignment_for_contiguous_layout()


def _layout(rows_per_group):
    """m_indices of aligned segments, each padded with -1 rows up to the alignment."""
    parts = []
    for g, r in enumerate(rows_per_group):
        pad = (-r) % ALIGN
        parts += [torch.full((r,), g, dtype=torch.int32), torch.full((pad,), -1, dtype=torch.int32)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def _exact_contiguous(a, b, m_indices):
    m = m_indices.long()
    return torch.einsum("mk,mnk->mn", a.double(), b.double()[m.clamp(min=0)]) * (m >= 0)[:, None]


@settings(max_examples=4, deadline=None)
@given(rows=st.lists(st.integers(0, 130), min_size=1, max_size=3).filter(lambda r: sum(r) > 0),
       n=st.sampled_from([64, 192]), num_sms=st.sampled_from([2, 7]))
def test_contiguous_matches_reference(rows, n, num_sms):
    m_indices = _layout(rows)
    g, k = len(rows), 128
    a = torch.randn(m_indices.numel(), k, dtype=torch.bfloat16)
    b = torch.randn(g, n, k, dtype=torch.bfloat16)
    qa, qb = per_token_group_quant(a), per_block_quant(b)
    out = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices, out_dtype=torch.float32, num_sms=num_sms,
                                           backend="triton")
    ref = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices, out_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    assert (out[m_indices < 0] == 0).all()
    assert calc_diff(out, _exact_contiguous(a, b, m_indices)) < 1e-3


@pytest.mark.parametrize("tma", ["0", "1"])
def test_grouped_kernels_with_tma_descriptors(monkeypatch, tma):
    # MOEKIT_TMA=1: operands through TMA descriptors over 2-D views ([G * N, K]); the interpreter emulates them.
    monkeypatch.setenv("MOEKIT_TMA", tma)
    m_indices = _layout([70, 0, 130])
    a = torch.randn(m_indices.numel(), 128, dtype=torch.bfloat16)
    b = torch.randn(3, 96, 128, dtype=torch.bfloat16)  # N = 96: tiles run past each group's rows
    qa, qb = per_token_group_quant(a), per_block_quant(b)
    out = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices, out_dtype=torch.float32, backend="triton")
    ref = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices, out_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    masked_m = torch.tensor([5, 0, 40], dtype=torch.int32)
    am = torch.randn(3, 40, 128, dtype=torch.bfloat16)
    qam = per_token_group_quant(am)
    out = m_grouped_fp8_gemm_nt_masked(*qam, *qb, masked_m, 16, out_dtype=torch.float32, backend="triton")
    ref = m_grouped_fp8_gemm_nt_masked(*qam, *qb, masked_m, 16, out_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_contiguous_empty_group_one_group_and_bf16_out():
    # Group 1 of 3 is empty; K = 256 runs two promotion steps.
    m_indices = _layout([40, 0, 128])
    a = torch.randn(m_indices.numel(), 256, dtype=torch.bfloat16)
    b = torch.randn(3, 128, 256, dtype=torch.bfloat16)
    qa, qb = per_token_group_quant(a), per_block_quant(b)
    out = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices, backend="triton")
    assert out.dtype == torch.bfloat16
    assert calc_diff(out, _exact_contiguous(a, b, m_indices)) < 1e-3
    # One group, no padding at all: the same as fp8_gemm_nt.
    one = torch.zeros(64, dtype=torch.int32)
    out1 = m_grouped_fp8_gemm_nt_contiguous(qa.data[:64], qa.scales[:64], qb.data[:1], qb.scales[:1], one,
                                            backend="triton")
    assert calc_diff(out1, a[:64].double() @ b[0].double().T) < 1e-3


def test_contiguous_all_padding_and_empty():
    qa = per_token_group_quant(torch.randn(ALIGN, 128))
    qb = per_block_quant(torch.randn(2, 64, 128))
    out = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, torch.full((ALIGN,), -1, dtype=torch.int32), backend="triton")
    assert (out == 0).all()
    e = per_token_group_quant(torch.randn(0, 128))
    assert m_grouped_fp8_gemm_nt_contiguous(*e, *qb, torch.zeros(0, dtype=torch.int32),
                                            backend="triton").shape == (0, 64)


def test_contiguous_layout_errors():
    qa = per_token_group_quant(torch.randn(2 * ALIGN, 128))
    qb = per_block_quant(torch.randn(2, 64, 128))
    mixed = _layout([ALIGN + 10, 20])[: 2 * ALIGN].clone()
    mixed[ALIGN + 10:ALIGN + 30] = 1  # group 1 starts mid-tile
    with pytest.raises(ValueError, match="not aligned"):
        m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, mixed, backend="triton")
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\)"):
        check_contiguous_layout(torch.full((4,), 2), 2)
    with pytest.raises(ValueError, match="m_indices must have shape"):
        m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, torch.zeros(3, dtype=torch.int32), backend="torch")
    with pytest.raises(TypeError, match="m_indices must be"):
        m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, torch.zeros(2 * ALIGN), backend="torch")
    with pytest.raises(ValueError, match=r"3-D \[G, N, K\]"):
        m_grouped_fp8_gemm_nt_contiguous(*qa, qb.data[0], qb.scales[0], mixed, backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_matches_reference(backend):
    g, m_max, n, k = 4, 64, 128, 256
    masked_m = torch.tensor([0, m_max, 17, 200], dtype=torch.int32)  # 0, full, partial, over M_max
    a = torch.randn(g, m_max, k, dtype=torch.bfloat16)
    b = torch.randn(g, n, k, dtype=torch.bfloat16)
    qa, qb = per_token_group_quant(a), per_block_quant(b)
    qa.data[0] = float("nan")  # rows past masked_m must not leak into the output
    out = m_grouped_fp8_gemm_nt_masked(*qa, *qb, masked_m, 32, out_dtype=torch.float32, num_sms=5, backend=backend)
    assert out.shape == (g, m_max, n)
    keep = torch.arange(m_max)[None, :] < masked_m[:, None]
    exact = torch.bmm(a.double(), b.double().transpose(1, 2)) * keep[..., None]
    assert (out[~keep] == 0).all()
    assert calc_diff(out[keep], exact[keep]) < 1e-3
    if backend == "triton":
        ref = m_grouped_fp8_gemm_nt_masked(*qa, *qb, masked_m, 32, out_dtype=torch.float32, backend="torch")
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_masked_errors():
    qa = per_token_group_quant(torch.randn(2, 8, 128))
    qb = per_block_quant(torch.randn(2, 64, 128))
    mm = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="masked_m must have shape"):
        m_grouped_fp8_gemm_nt_masked(*qa, *qb, mm[:1], 4, backend="torch")
    with pytest.raises(ValueError, match="same number of groups"):
        m_grouped_fp8_gemm_nt_masked(*qa, qb.data[:1], qb.scales[:1], mm, 4, backend="torch")
    with pytest.raises(ValueError, match="expected_m"):
        m_grouped_fp8_gemm_nt_masked(*qa, *qb, mm, -1, backend="torch")
    with pytest.raises(ValueError, match="a_scales must have shape"):
        m_grouped_fp8_gemm_nt_masked(qa.data, qa.scales[:, :4], *qb, mm, 4, backend="torch")
