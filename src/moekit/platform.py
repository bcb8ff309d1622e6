"""What moekit runs on: CUDA, ROCm or the CPU; SM count; Triton compiled or interpreted; PTX on or off.

Importing this module is the one place where moekit chooses Triton's mode: with no GPU it sets
``TRITON_INTERPRET=1`` so that every ``@triton.jit`` kernel imported afterwards runs in the
interpreter on the CPU. ``moekit/__init__.py`` imports it first, so kernel modules always see it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform as _py_platform

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Must happen before any kernel module is imported: Triton decides at decoration time.
    os.environ["TRITON_INTERPRET"] = "1"


@dataclasses.dataclass(frozen=True)
class PlatformInfo:
    """A snapshot of the machine, as ``moekit info`` prints it."""

    backend: str  # "cuda" | "rocm" | "cpu"
    device_name: str
    sm_count: int  # SMs (NVIDIA) or CUs (AMD); CPU cores on the CPU
    capability: tuple[int, int] | None
    triton_version: str | None
    triton_interpreted: bool
    ptx_enabled: bool
    ptx_reason: str
    dist_backends: tuple[str, ...]
    python_version: str
    torch_version: str


def backend() -> str:
    """``"cuda"``, ``"rocm"`` or ``"cpu"``: where tensors of the default device live."""
    if torch.cuda.is_available():
        return "rocm" if torch.version.hip else "cuda"
    return "cpu"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def sm_count(device: int | None = None) -> int:
    """Streaming multiprocessors of the GPU (CUs on AMD); the CPU core count without a GPU."""
    if torch.cuda.is_available():
        idx = torch.cuda.current_device() if device is None else device
        return torch.cuda.get_device_properties(idx).multi_processor_count
    return os.cpu_count() or 1


def symmetric_heap_status() -> tuple[str | None, str]:
    """Which symmetric heap ``Buffer(transport="symmetric")`` would use here, and why: ``("torch-symm-mem",
    ...)`` on a GPU whose torch has symmetric memory, ``("shm", ...)`` on the CPU, or ``(None, reason)``."""
    from .ep.heap import availability  # lazy: platform stays importable before the kernels

    return availability("cpu" if backend() == "cpu" else "cuda")


def ptx_status() -> tuple[bool, str]:
    """Whether inline-PTX fast paths may run, and why (they need NVIDIA hardware and compiled Triton)."""
    if os.environ.get("MOEKIT_PTX", "1") == "0":
        return False, "disabled by MOEKIT_PTX=0"
    b = backend()
    if b != "cuda":
        return False, f"backend is {b}: PTX runs on NVIDIA only"
    if triton_interpreted():
        return False, "Triton runs in its interpreter (TRITON_INTERPRET=1)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed"
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        return False, f"sm_{major}x: the FP8 PTX helpers need sm_89+ (e4m3 cvt) / sm_90"
    return True, "NVIDIA GPU with compiled Triton"


def ptx_enabled() -> bool:
    return ptx_status()[0]


def dist_backends() -> tuple[str, ...]:
    import torch.distributed as dist

    if not dist.is_available():
        return ()
    found = []
    for name, probe in (("gloo", dist.is_gloo_available), ("nccl", dist.is_nccl_available),
                        ("mpi", dist.is_mpi_available)):
        if probe():
            # NCCL on a ROCm build is RCCL under the same name.
            found.append("rccl" if name == "nccl" and torch.version.hip else name)
    return tuple(found)


def info() -> PlatformInfo:
    try:
        import triton

        tver: str | None = triton.__version__
    except ImportError:
        tver = None
    b = backend()
    if b == "cpu":
        name = _py_platform.processor() or _py_platform.machine()
        cap = None
    else:
        name = torch.cuda.get_device_name()
        cap = torch.cuda.get_device_capability()
    ok, why = ptx_status()
    return PlatformInfo(
        backend=b,
        device_name=name,
        sm_count=sm_count(),
        capability=cap,
        triton_version=tver,
        triton_interpreted=triton_interpreted(),
        ptx_enabled=ok,
        ptx_reason=why,
        dist_backends=dist_backends(),
        python_version=_py_platform.python_version(),
        torch_version=torch.__version__,
    )
