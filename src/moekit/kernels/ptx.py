"""Inline-PTX helpers for what Triton does not emit well, each with a portable fallback.

Policy: a helper lives here only while the GPU suite (``bench/gpu_suite.sh``) shows it faster than its
fallback; the suite times both. Which variant a kernel compiles is a ``tl.constexpr`` mode chosen on the
host by :func:`cvt_mode`:

* ``CVT_PTX`` — NVIDIA with compiled Triton (``moekit.platform.ptx_enabled()``): one
  ``cvt.rn.satfinite.e4m3x2.f32`` converts two fp32 values into two packed e4m3 bytes.
* ``CVT_NATIVE`` — everywhere else compiled (AMD, or ``MOEKIT_PTX=0``): Triton's own ``.to(float8e4nv)``.
* ``CVT_EXACT`` — Triton's interpreter. Its numpy emulation of fp32 -> e4m3 truncates when rounding
  carries into the exponent (1.9999 becomes 1.0, not 2.0), so the value is first rounded onto the e4m3
  grid in fp32 arithmetic; the cast of an exactly representable value is then right.

All three saturate to the format's max and round to nearest even. The format is a second constexpr,
``FNUZ``: OCP ``e4m3fn`` (``tl.float8e4nv``, +-448) everywhere but AMD CDNA3 (gfx942), whose MFMA reads
``e4m3fnuz`` (``tl.float8e4b8``, +-240, bias 8); the PTX mode exists for ``e4m3fn`` only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moekit import platform

CVT_NATIVE = 0
CVT_PTX = 1
CVT_EXACT = 2


def cvt_mode(use_ptx: bool | None = None, fnuz: bool = False) -> int:
    """The fp32 -> e4m3 conversion mode for kernels launched now; ``use_ptx`` overrides the platform's choice.

    ``use_ptx=True`` is honoured only where PTX can run (never in the interpreter, on AMD or for ``fnuz``).
    """
    if platform.triton_interpreted():
        return CVT_EXACT
    if use_ptx is None:
        use_ptx = platform.ptx_enabled()
    return CVT_PTX if (use_ptx and platform.ptx_enabled() and not fnuz) else CVT_NATIVE


def cvt_mode_for(vendor: str, use_ptx: bool = True) -> int:
    """The mode a compiled launch on ``vendor`` (``"cuda"`` | ``"hip"``) picks: PTX on NVIDIA unless disabled."""
    return CVT_PTX if (vendor == "cuda" and use_ptx) else CVT_NATIVE


@triton.jit
def _e4m3x4_ptx(x):
    # pack=4: each asm instance sees four fp32 registers ($1..$4) and writes one b32 register ($0)
    # holding four e4m3 bytes, lowest byte = first element. cvt.e4m3x2 puts its first source in the
    # upper byte, hence the swapped operands.
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b16 lo, hi;
        cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
        cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
        mov.b32 $0, {lo, hi};
        }
        """,
        constraints="=r,r,r,r,r",
        args=[x],
        dtype=tl.uint8,
        is_pure=True,
        pack=4,
    ).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _round_to_e4m3_grid(x, MIN_EXP: tl.constexpr):
    # x already clamped to the format's range. Step of the e4m3 grid at |x|: 2^(e-3) for a normal exponent
    # e, 2^(MIN_EXP-3) below the smallest normal 2^MIN_EXP (-6 for e4m3fn, -7 for e4m3fnuz). Adding and
    # subtracting 1.5 * 2^23 * step rounds to a multiple of step with fp32's round-to-nearest-even.
    ax = tl.abs(x)
    e = ((ax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_EXP) - 3
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0  # 1.5 * 2^23
    r = (ax + magic) - magic
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # keeps -0.0 negative, like the hardware cvt
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def to_e4m3(x, MODE: tl.constexpr, FNUZ: tl.constexpr):
    """fp32 tensor -> float8e4nv (``FNUZ`` false, +-448) or float8e4b8 (``FNUZ``, +-240), saturating,
    round to nearest even (see the module docstring)."""
    if FNUZ:
        x = tl.minimum(tl.maximum(x, -240.0), 240.0)
        if MODE == 2:
            # fnuz has no -0: the cast maps a rounded-to-zero negative onto +0 like the hardware cvt.
            return _round_to_e4m3_grid(x, -7).to(tl.float8e4b8)
        else:
            return x.to(tl.float8e4b8)
    else:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if MODE == 1:
            return _e4m3x4_ptx(x)
        elif MODE == 2:
            return _round_to_e4m3_grid(x, -6).to(tl.float8e4nv)
        else:
            return x.to(tl.float8e4nv)
