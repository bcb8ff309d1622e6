"""Release stores and acquire loads of 32-bit words at host addresses, through libatomic (ctypes).

The native CPU executor of the heap protocol (:mod:`moekit.kernels.comm_native`) sets a flag in a peer's
shared-memory heap after copying its rows there, and a waiter reads the flags before it reads the rows.
That data-then-flag order must hold on every CPU we run on, not only on x86's strong ordering: the flag
is written with ``__atomic_store_4(ptr, v, __ATOMIC_RELEASE)`` and read with
``__atomic_load_4(ptr, __ATOMIC_ACQUIRE)`` (GCC's libatomic, the runtime of the C11/C++11 atomics:
on x86_64 a plain ``mov`` with the compiler barrier, on aarch64 ``stlr`` / ``ldar``). Aligned 4-byte
words are lock-free, so the order holds across processes that map the same file. libatomic ships with
GCC on every Linux distribution (Debian: ``libatomic1``); where it is missing, :func:`available` says so
and the heap's native executor is not chosen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

RELAXED, ACQUIRE, RELEASE = 0, 2, 3  # GCC's __ATOMIC_* memory orders


@functools.lru_cache(maxsize=1)
def _lib():
    name = ctypes.util.find_library("atomic")
    for cand in ([name] if name else []) + ["libatomic.so.1", "libatomic.so"]:
        try:
            lib = ctypes.CDLL(cand)
        except OSError:
            continue
        load, store = getattr(lib, "__atomic_load_4"), getattr(lib, "__atomic_store_4")
        load.argtypes, load.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_uint32
        store.argtypes, store.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int], None
        return load, store
    return None


def available() -> tuple[bool, str]:
    """``(ok, why)``: whether libatomic's 4-byte atomics can be called here."""
    if _lib() is None:
        return False, "libatomic (GCC's atomics runtime, Debian package libatomic1) not found"
    return True, "libatomic __atomic_store_4 (release) / __atomic_load_4 (acquire)"


def store_release(addr: int, value: int) -> None:
    """``*(uint32 *)addr = value`` with release order: every earlier write of this thread is visible first."""
    assert addr % 4 == 0
    _lib()[1](addr, value & 0xFFFFFFFF, RELEASE)


def load_acquire(addr: int) -> int:
    """``*(uint32 *)addr`` with acquire order: later reads see what the releasing writer wrote before it."""
    assert addr % 4 == 0
    return int(_lib()[0](addr, ACQUIRE))
