"""Quantizers: Triton kernels bit-exact against the torch references, round trips, scale formats, errors."""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.kernels import per_block_dequant, per_block_quant, per_token_group_dequant, per_token_group_quant
from moekit.kernels._backend import resolve_backend
from moekit.kernels.ptx import CVT_EXACT, cvt_mode, to_e4m3

E4M3_EPS = 2.0**-4  # half an ulp of a 3-bit mantissa, relative


def _bits(t):
    return t.view(torch.uint8)


def _assert_same(a, b):
    assert torch.equal(_bits(a.data), _bits(b.data))
    assert torch.equal(a.scales, b.scales)


@settings(max_examples=6, deadline=None)
@given(m=st.integers(0, 40), kb=st.integers(1, 2), mag=st.sampled_from([1e-6, 1.0, 1e4]),
       fmt=st.sampled_from([None, "ue8m0"]), dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_token_quant_triton_matches_reference(m, kb, mag, fmt, dtype):
    x = (torch.randn(m, 128 * kb) * mag).to(dtype)
    got = per_token_group_quant(x, scale_fmt=fmt, backend="triton")
    _assert_same(got, per_token_group_quant(x, scale_fmt=fmt, backend="torch"))
    assert got.data.shape == (m, 128 * kb) and got.scales.shape == (m, kb)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_m_major_scales(backend):
    x = torch.randn(40, 256)
    q, s = per_token_group_quant(x, m_major_scales=True, backend=backend)
    assert s.shape == (40, 2) and s.stride() == (1, 40)
    want = per_token_group_quant(x, backend="torch")
    assert torch.equal(s, want.scales) and torch.equal(_bits(q), _bits(want.data))
    with pytest.raises(ValueError, match="2-D"):
        per_token_group_quant(x[None], m_major_scales=True, backend=backend)


def test_token_quant_leading_dims_and_group_size():
    x = torch.randn(3, 5, 64)
    got = per_token_group_quant(x, 32, backend="triton")
    assert got.scales.shape == (3, 5, 2)
    _assert_same(got, per_token_group_quant(x, 32, backend="torch"))


@pytest.mark.parametrize("shape", [(256, 128), (200, 300), (2, 130, 256)])
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_block_quant_triton_matches_reference(shape, fmt):
    w = torch.randn(shape) * 3
    got = per_block_quant(w, scale_fmt=fmt, backend="triton")
    _assert_same(got, per_block_quant(w, scale_fmt=fmt, backend="torch"))
    *lead, n, k = shape
    assert got.scales.shape == (*lead, -(-n // 128), -(-k // 128))


def test_round_trip_error_bounds():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    q, s = per_token_group_quant(x, backend="triton")
    back = per_token_group_dequant(q, s)
    step = s.repeat_interleave(128, dim=1)
    # Normal range: half an ulp relative; subnormal range: half the smallest step (2^-9 * scale).
    assert ((back - x).abs() <= x.abs() * E4M3_EPS + step * 2.0**-10 + 1e-12).all()
    w = torch.randn(2, 256, 384)
    q, s = per_block_quant(w, backend="triton")
    back = per_block_dequant(q, s)
    step = s.repeat_interleave(128, -2).repeat_interleave(128, -1)
    assert ((back - w).abs() <= w.abs() * E4M3_EPS + step * 2.0**-10).all()


def test_max_abs_maps_to_448_and_zero_tiles_get_floor_scale():
    x = torch.randn(4, 256)
    x[1] = 0
    q, s = per_token_group_quant(x, backend="triton")
    assert (q[0].float().abs().reshape(2, 128).amax(1) == 448).all()
    assert (s[1] == 1e-4 / 448).all() and (q[1].float() == 0).all()


def test_ue8m0_scales_are_powers_of_two():
    x = torch.randn(16, 256) * torch.logspace(-4, 4, 16)[:, None]
    plain = per_token_group_quant(x, backend="triton").scales
    s = per_token_group_quant(x, scale_fmt="ue8m0", backend="triton").scales
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()
    assert (s >= plain).all() and (s < 2 * plain).all()
    w = per_block_quant(torch.randn(256, 256), scale_fmt="ue8m0", backend="triton").scales
    assert (torch.frexp(w)[0] == 0.5).all()


@triton.jit
def _cvt_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, MODE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, to_e4m3(x, MODE, False), mask=offs < n)


def test_exact_conversion_matches_torch_on_every_rounding_boundary():
    # All finite e4m3 values, the midpoints between neighbours (ties to even) and values just off them.
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]),
                   torch.tensor([500.0, -1e6, 464.0, 2.0**-12])])
    assert cvt_mode() == CVT_EXACT  # the interpreter always takes the exact path
    y = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
    _cvt_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256, MODE=CVT_EXACT)
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(_bits(y), _bits(want))


def test_backend_choice(monkeypatch):
    x = torch.zeros(1)
    assert resolve_backend(None, x) == "torch"
    monkeypatch.setenv("MOEKIT_KERNELS", "triton")
    assert resolve_backend(None, x) == "triton"
    assert resolve_backend("torch", x) == "torch"
    monkeypatch.setenv("MOEKIT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MOEKIT_KERNELS"):
        resolve_backend(None, x)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", x)


def test_env_forces_triton(monkeypatch):
    monkeypatch.setenv("MOEKIT_KERNELS", "triton")
    x = torch.randn(3, 128)
    calls = []
    import moekit.kernels.quant as quant

    real = quant._token_group_quant_kernel
    monkeypatch.setattr(quant, "_token_group_quant_kernel", _Spy(real, calls))
    per_token_group_quant(x)
    assert calls == ["launched"]


class _Spy:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append("launched")
        return self.kernel[grid]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise(backend):
    with pytest.raises(ValueError, match="multiple of group_size"):
        per_token_group_quant(torch.randn(2, 100), backend=backend)
    with pytest.raises(TypeError, match="x must be"):
        per_token_group_quant(torch.ones(2, 128, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="scale_fmt"):
        per_token_group_quant(torch.randn(2, 128), scale_fmt="e8m0", backend=backend)
    with pytest.raises(ValueError, match="power of two"):
        per_token_group_quant(torch.randn(2, 96), 48, backend=backend)
    with pytest.raises(ValueError, match=r"\[N, K\] or \[G, N, K\]"):
        per_block_quant(torch.randn(128), backend=backend)
    q, s = per_token_group_quant(torch.randn(2, 256), backend=backend)
    with pytest.raises(ValueError, match="scales must have shape"):
        per_token_group_dequant(q, s[:, :1])
    with pytest.raises(TypeError, match="q must be"):
        per_block_dequant(torch.randn(128, 128), torch.ones(1, 1))
