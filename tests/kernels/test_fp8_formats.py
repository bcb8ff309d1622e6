"""FP8 formats: e4m3fn (NVIDIA, MI355X) and e4m3fnuz (MI300), in the quantizers, the GEMMs and their references.

Runs the Triton kernels in the interpreter (the compiled builds per target are in test_targets.py) and compares
them with the torch references and with float64 products (DeepGEMM's measure).
"""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.kernels import (
    fp8_gemm_nt,
    m_grouped_fp8_gemm_nt_contiguous,
    per_block_dequant,
    per_block_quant,
    per_token_group_dequant,
    per_token_group_quant,
)
from moekit.kernels._backend import (
    E4M3FN,
    E4M3FNUZ,
    FP8_FORMATS,
    device_fp8_format,
    format_of,
    fp8_format_for_arch,
    resolve_fp8_format,
)
from moekit.kernels.ptx import CVT_EXACT, to_e4m3
from moekit.kernels.reference import calc_diff

FORMATS = ["e4m3fn", "e4m3fnuz"]


def _bits(t):
    return t.view(torch.uint8)


def test_format_constants_match_torch():
    for f in (E4M3FN, E4M3FNUZ):
        fi = torch.finfo(f.dtype)
        assert fi.max == f.max
        assert fi.smallest_normal == 2.0**f.min_normal_exp
    assert E4M3FNUZ.fnuz and not E4M3FN.fnuz
    assert format_of(torch.float8_e4m3fnuz) is E4M3FNUZ and format_of(torch.float8_e4m3fn) is E4M3FN


def test_format_per_architecture():
    assert fp8_format_for_arch("gfx942") is E4M3FNUZ
    assert fp8_format_for_arch("gfx942:sramecc+:xnack-") is E4M3FNUZ
    assert fp8_format_for_arch("gfx950") is E4M3FN
    assert fp8_format_for_arch(90) is E4M3FN and fp8_format_for_arch(100) is E4M3FN
    assert device_fp8_format(torch.device("cpu")) is E4M3FN
    assert resolve_fp8_format(None, torch.device("cpu")) is E4M3FN
    assert resolve_fp8_format("e4m3fnuz", torch.device("cpu")) is E4M3FNUZ
    with pytest.raises(ValueError, match="fp8_format must be"):
        resolve_fp8_format("e5m2", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp8_format must be"):
        per_token_group_quant(torch.randn(2, 128), fp8_format="fnuz")


@triton.jit
def _cvt_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, FNUZ: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, to_e4m3(x, CVT_EXACT, FNUZ), mask=offs < n)


@pytest.mark.parametrize("name", FORMATS)
def test_exact_conversion_on_every_rounding_boundary(name):
    f = FP8_FORMATS[name]
    # Every finite value of the format, midpoints between neighbours (ties to even), values just off them,
    # and out-of-range ones (saturate).
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f.dtype).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]),
                   torch.tensor([500.0, -1e6, f.max + 8, 2.0 ** (f.min_normal_exp - 6), -(2.0**-14)])])
    y = torch.empty(x.numel(), dtype=f.dtype)
    _cvt_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256, FNUZ=f.fnuz)
    want = x.clamp(-f.max, f.max).to(f.dtype)
    if f.fnuz:  # no negative zero: 0x80 is fnuz's NaN, so a negative that rounds to 0 must give +0
        assert not (_bits(y) == 0x80).any()
    assert torch.equal(_bits(y), _bits(want))


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 40), kb=st.integers(1, 2), mag=st.sampled_from([1e-6, 1.0, 1e4]),
       scale_fmt=st.sampled_from([None, "ue8m0"]), name=st.sampled_from(FORMATS))
def test_token_quant_kernel_matches_reference_per_format(m, kb, mag, scale_fmt, name):
    x = torch.randn(m, 128 * kb) * mag
    got = per_token_group_quant(x, scale_fmt=scale_fmt, fp8_format=name, backend="triton")
    want = per_token_group_quant(x, scale_fmt=scale_fmt, fp8_format=name, backend="torch")
    assert got.data.dtype == want.data.dtype == FP8_FORMATS[name].dtype
    assert torch.equal(_bits(got.data), _bits(want.data))
    assert torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("name", FORMATS)
def test_block_quant_kernel_matches_reference_per_format(name):
    w = torch.randn(2, 200, 300, dtype=torch.bfloat16) * 3
    got = per_block_quant(w, fp8_format=name, backend="triton")
    want = per_block_quant(w, fp8_format=name, backend="torch")
    assert got.data.dtype == FP8_FORMATS[name].dtype
    assert torch.equal(_bits(got.data), _bits(want.data)) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scale_maps_max_abs_onto_the_format_max(name, backend):
    f = FP8_FORMATS[name]
    x = torch.randn(4, 256) * 7
    q, s = per_token_group_quant(x, fp8_format=name, backend=backend)
    amax = x.reshape(4, 2, 128).abs().amax(-1)
    torch.testing.assert_close(s, amax / f.max, rtol=0, atol=0)
    assert (q.float().abs().reshape(4, 2, 128).amax(-1) == f.max).all()
    assert q.float().isfinite().all()
    # Round trip within half an ulp (3-bit mantissa) in the normal range, half a subnormal step below it.
    back = per_token_group_dequant(q, s)
    step = s.repeat_interleave(128, dim=1) * 2.0 ** (f.min_normal_exp - 4)
    assert ((back - x).abs() <= x.abs() * 2.0**-4 + step + 1e-12).all()
    w = torch.randn(256, 384)
    qw, sw = per_block_quant(w, fp8_format=name, backend=backend)
    assert qw.dtype == f.dtype
    assert ((per_block_dequant(qw, sw) - w).abs() <= w.abs() * 2.0**-4 + sw.max() * 2.0 ** (f.min_normal_exp - 4)).all()


def _float64_reference(a, b):
    return a.double() @ b.double().T


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gemm_per_format_meets_deepgemm_measure(name, backend):
    m, n, k = 48, 192, 256
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    qa = per_token_group_quant(a, fp8_format=name, backend=backend)
    qb = per_block_quant(b, fp8_format=name, backend=backend)
    out = fp8_gemm_nt(*qa, *qb, out_dtype=torch.float32, num_sms=3, backend=backend)
    assert calc_diff(out, _float64_reference(a, b)) < 1e-3
    ref = fp8_gemm_nt(*qa, *qb, out_dtype=torch.float32, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_grouped_contiguous_with_fnuz():
    g, n, k = 2, 128, 256
    a = torch.randn(256, k)
    w = torch.randn(g, n, k)
    m_indices = torch.cat([torch.zeros(128, dtype=torch.int32), torch.ones(128, dtype=torch.int32)])
    qa = per_token_group_quant(a, fp8_format="e4m3fnuz", backend="triton")
    qw = per_block_quant(w, fp8_format="e4m3fnuz", backend="triton")
    out = m_grouped_fp8_gemm_nt_contiguous(*qa, *qw, m_indices, out_dtype=torch.float32, num_sms=2,
                                           backend="triton")
    exact = torch.cat([_float64_reference(a[:128], w[0]), _float64_reference(a[128:], w[1])])
    assert calc_diff(out, exact) < 1e-3


def test_the_two_formats_give_different_bytes_and_scales():
    # 240 vs 448 max, bias 8 vs 7: the same tensor quantizes to other bytes and other scales (both tiles' scales
    # are the same max-abs over the format's max).
    x = torch.randn(8, 256)
    fn = per_token_group_quant(x, fp8_format="e4m3fn", backend="triton")
    fnuz = per_token_group_quant(x, fp8_format="e4m3fnuz", backend="triton")
    assert not torch.equal(_bits(fn.data), _bits(fnuz.data))
    torch.testing.assert_close(fn.scales * 448, fnuz.scales * 240, rtol=1e-6, atol=0)
    assert (fnuz.scales > fn.scales).all()


def test_gemm_rejects_mixed_formats():
    a = per_token_group_quant(torch.randn(4, 128), fp8_format="e4m3fn")
    b = per_block_quant(torch.randn(128, 128), fp8_format="e4m3fnuz")
    with pytest.raises(TypeError, match="one FP8 format"):
        fp8_gemm_nt(*a, *b)
