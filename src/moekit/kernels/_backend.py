"""Which implementation runs (Triton kernel or plain-torch reference), and the argument checks they share.

``backend=None`` reads ``MOEKIT_KERNELS`` (``triton`` | ``torch`` | ``auto``, default ``auto``); ``auto``
runs the Triton kernels on GPU tensors and the torch references on CPU tensors. ``triton`` on CPU
tensors runs the kernels in Triton's interpreter (``moekit.platform`` turns it on when there is no GPU).
"""

from __future__ import annotations

import os

import torch

from moekit import platform

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
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


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
