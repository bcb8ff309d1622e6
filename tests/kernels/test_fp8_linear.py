"""grouped_fp8_linear: the MoE experts' FP8 layer (forward through the contiguous kernel, torch backward)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.kernels import FP8WeightCache, grouped_fp8_linear
from moekit.kernels.fp8_linear import contiguous_layout
from moekit.kernels.reference import calc_diff


def _reference(x, m_indices, weight):
    m = m_indices.long()
    return torch.einsum("mk,mnk->mn", x, weight[m.clamp(min=0)]) * (m >= 0)[:, None].to(x.dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_backward_against_unquantized(backend):
    g, n, k, m = 4, 96, 128, 60
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(g, n, k, requires_grad=True)
    m_indices = torch.randint(-1, g, (m,), dtype=torch.int32)
    m_indices[m_indices == 2] = 1  # expert 2 gets no rows
    out = grouped_fp8_linear(x, m_indices, w, backend=backend)
    ref = _reference(x, m_indices, w)
    assert out.dtype == x.dtype and out.shape == (m, n)
    assert (out[m_indices < 0] == 0).all()
    assert calc_diff(out, ref) < 1e-3
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    # Backward is the unquantized one (straight-through), computed by plain fp32 matmuls.
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)
    assert (gx[m_indices < 0] == 0).all() and (gw[2] == 0).all()


def test_bf16_input_fp32_weight_and_int64_indices():
    x = torch.randn(40, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, 128, 256, requires_grad=True)
    m_indices = torch.randint(0, 2, (40,))
    out = grouped_fp8_linear(x, m_indices, w, backend="triton")
    assert out.dtype == torch.bfloat16
    assert calc_diff(out, _reference(x.double(), m_indices, w.double())) < 1e-3
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_weight_cache_rebuilds_after_optimizer_step_only():
    x = torch.randn(8, 128)
    m_indices = torch.tensor([0, 1] * 4, dtype=torch.int32)
    w = torch.nn.Parameter(torch.randn(2, 64, 128))
    cache = FP8WeightCache()
    opt = torch.optim.SGD([w], lr=0.5)
    y0 = grouped_fp8_linear(x, m_indices, w, weight_cache=cache)
    grouped_fp8_linear(x, m_indices, w, weight_cache=cache)
    assert cache.rebuilds == 1
    y0.square().sum().backward()
    opt.step()
    y1 = grouped_fp8_linear(x, m_indices, w, weight_cache=cache)
    assert cache.rebuilds == 2
    assert calc_diff(y1, _reference(x, m_indices, w.detach())) < 1e-3  # the new weight, not the cached old one
    cache.clear()
    grouped_fp8_linear(x, m_indices, w, weight_cache=cache)
    assert cache.rebuilds == 3


def test_no_rows_and_all_skipped():
    w = torch.randn(3, 64, 128, requires_grad=True)
    x0 = torch.zeros(0, 128, requires_grad=True)
    out = grouped_fp8_linear(x0, torch.zeros(0, dtype=torch.int32), w, backend="triton")
    assert out.shape == (0, 64)
    out.sum().backward()
    assert (w.grad == 0).all()
    x = torch.randn(5, 128)
    assert (grouped_fp8_linear(x, torch.full((5,), -1, dtype=torch.int32), w) == 0).all()


def test_errors_name_the_problem():
    w = torch.randn(2, 32, 64)
    with pytest.raises(ValueError, match=r"K \(= 64\) to be a positive multiple of 128.*bf16 experts"):
        grouped_fp8_linear(torch.randn(4, 64), torch.zeros(4, dtype=torch.int32), w)
    w = torch.randn(2, 32, 128)
    with pytest.raises(ValueError, match="share K"):
        grouped_fp8_linear(torch.randn(4, 256), torch.zeros(4, dtype=torch.int32), w)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 2\)"):
        grouped_fp8_linear(torch.randn(4, 128), torch.full((4,), 2, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="m_indices must have shape"):
        grouped_fp8_linear(torch.randn(4, 128), torch.zeros(3, dtype=torch.int32), w)
    with pytest.raises(TypeError, match="m_indices must be"):
        grouped_fp8_linear(torch.randn(4, 128), torch.zeros(4), w)


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 300), min_size=1, max_size=5), skipped=st.integers(0, 20),
       align=st.sampled_from([4, 128]))
def test_contiguous_layout_plan(counts, skipped, align):
    g = len(counts)
    m = torch.cat([torch.full((c,), i, dtype=torch.int32) for i, c in enumerate(counts)]
                  + [torch.full((skipped,), -1, dtype=torch.int32)])
    m = m[torch.randperm(m.numel())]
    lay = contiguous_layout(m, g, align)
    total = lay.m_indices.numel()
    assert total % align == 0 and total == sum(-(-c // align) * align for c in counts) + align
    # Each row lands on a padded row of its own expert; skipped rows on a padding row.
    assert torch.equal(lay.m_indices[lay.dest], torch.where(m >= 0, m, -1))
    assert torch.equal(lay.src[lay.dest[m >= 0]], torch.nonzero(m >= 0).squeeze(1))
    assert (lay.src[lay.m_indices < 0] == m.numel()).all()
    # Every aligned tile holds one expert at most, in stable (original) row order.
    tiles = lay.m_indices.reshape(-1, align)
    for t in tiles:
        assert t[t >= 0].unique().numel() <= 1
    for i in range(g):
        assert (lay.src[lay.m_indices == i].diff() > 0).all()
