"""Which implementation runs (Triton kernel or plain-torch reference), and the argument checks they share.

``backend=None`` reads ``MOEKIT_KERNELS`` (``triton`` | ``torch`` | ``auto``, default ``auto``); ``auto``
runs the Triton kernels on GPU tensors and the torch references on CPU tensors. ``triton`` on CPU
tensors runs the kernels in Triton's interpreter (``moekit.platform`` turns it on when there is no GPU).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from moekit import platform
from moekit._util import cdiv  # noqa: F401  (re-exported for kernels/)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


class FP8Format(NamedTuple):
    """One FP8 E4M3 encoding: what the quantizers write and the GEMMs read.

    * ``e4m3fn`` (OCP FP8, NVIDIA sm_89+ and AMD gfx950 / MI355X): exponent bias 7, max 448, has -0.
    * ``e4m3fnuz`` (AMD gfx942 / MI300X, MI325X, whose MFMA reads only this one): bias 8, max 240, no -0
      (0x80 is the NaN), smallest subnormal 2^-10. See AMD's "Precision support" page of the ROCm docs.
    """

    name: str  # "e4m3fn" | "e4m3fnuz"
    dtype: torch.dtype
    max: float  # largest finite value: the quantizers scale a tile's max-abs onto it
    min_normal_exp: int  # exponent of the smallest normal value (-6 | -7)
    triton: str  # Triton's name of the element type in a kernel signature ("fp8e4nv" | "fp8e4b8")

    @property
    def fnuz(self) -> bool:
        return self.name == "e4m3fnuz"


E4M3FN = FP8Format("e4m3fn", torch.float8_e4m3fn, 448.0, -6, "fp8e4nv")
E4M3FNUZ = FP8Format("e4m3fnuz", torch.float8_e4m3fnuz, 240.0, -7, "fp8e4b8")
FP8_FORMATS = {f.name: f for f in (E4M3FN, E4M3FNUZ)}
FP8_DTYPES = (E4M3FN.dtype, E4M3FNUZ.dtype)
_FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")  # CDNA3: MI300A/X, MI325X


def fp8_format_for_arch(arch: str | int) -> FP8Format:
    """The native E4M3 format of a GPU architecture: ``e4m3fnuz`` on CDNA3 (gfx94x), ``e4m3fn`` elsewhere.

    ``arch`` is an AMD name (``"gfx942"``, ``"gfx950"``, with or without ``:feature`` suffixes) or an NVIDIA
    compute capability (``90``, ``100``).
    """
    return E4M3FNUZ if str(arch).split(":")[0] in _FNUZ_ARCHS else E4M3FN


def device_fp8_format(device: torch.device) -> FP8Format:
    """The native E4M3 format of ``device``: ``e4m3fnuz`` on an MI300-class GPU, ``e4m3fn`` on anything else."""
    if device.type == "cuda" and torch.version.hip:
        return fp8_format_for_arch(torch.cuda.get_device_properties(device).gcnArchName)
    return E4M3FN


def resolve_fp8_format(fp8_format: str | None, device: torch.device) -> FP8Format:
    """``fp8_format`` by name, or (``None``) the native format of ``device``; raises ValueError otherwise."""
    if fp8_format is None:
        return device_fp8_format(device)
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"fp8_format must be None, 'e4m3fn' or 'e4m3fnuz', got {fp8_format!r}")
    return FP8_FORMATS[fp8_format]


def format_of(dtype: torch.dtype) -> FP8Format:
    """The :class:`FP8Format` whose torch dtype is ``dtype`` (one of :data:`FP8_DTYPES`)."""
    return E4M3FNUZ if dtype == E4M3FNUZ.dtype else E4M3FN
BLOCK = 128  # DeepSeek-V3's scaling granularity: 1x128 activations, 128x128 weights
_BACKENDS = ("triton", "torch")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for a call on ``tensors``; raises if Triton cannot run on them."""
    choice = backend if backend is not None else os.environ.get("MOEKIT_KERNELS", "auto")
    if choice not in (*_BACKENDS, "auto"):
        src = "backend" if backend is not None else "MOEKIT_KERNELS"
        raise ValueError(f"{src} must be 'triton', 'torch' or 'auto', got {choice!r}")
    on_gpu = any(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if on_gpu else "torch"
    if choice == "triton" and not on_gpu and not platform.triton_interpreted():
        raise ValueError("backend='triton' on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1), "
                         "which moekit turns on only on machines without a GPU; move the tensors to the GPU")
    return choice


def check_dtype(name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], why: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must have shape {list(shape)}{extra}, got {list(t.shape)}")


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {list(t.shape)}")


def check_k(name: str, k: int, block: int = BLOCK) -> None:
    if k % block != 0 or k == 0:
        raise ValueError(f"{name} = {k} must be a positive multiple of {block}: FP8 scales cover 1x{block} "
                         f"(activations) and {block}x{block} (weights) tiles of K")


def same_device(**tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devs}")
