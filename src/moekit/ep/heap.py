"""Symmetric heaps: every rank's receive area, and a table of where every peer's area is, in this process.

One small interface, three implementations:

* :func:`torch_symmetric_heap` — PyTorch symmetric memory on CUDA/ROCm nodes
  (``torch.distributed._symmetric_memory.empty`` + ``rendezvous``: ``buffer_ptrs`` are the peers' buffers
  mapped into this process, ``signal_pad_ptrs`` their signal pads).
* :func:`shm_heap` — POSIX shared memory between the CPU processes of one node (gloo ranks): each rank
  creates a ``/dev/shm`` file, every rank maps all of them, and its pointer table holds the addresses of
  *its own* mappings (they differ from process to process).
* :func:`virtual_heaps` — the heaps of N virtual ranks in one process (one GPU or the CPU).

A :class:`Heap` is one rank's view: ``buffer`` (its own bytes, ``[nbytes]`` uint8) and ``ptrs``
(``[R]`` int64, rank d's buffer as an address valid here), on the device the kernels run on.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import torch

from .._util import check_positive_int


@dataclasses.dataclass(eq=False)
class Heap:
    """One rank's view of a symmetric heap. ``keep`` holds what must outlive the mappings (handles)."""

    kind: str  # "torch-symm-mem" | "shm" | "virtual"
    rank: int
    world_size: int
    buffer: torch.Tensor  # [nbytes] uint8, this rank's heap
    ptrs: torch.Tensor  # [R] int64: every rank's heap, as an address in this process
    keep: tuple = ()
    guard_bytes: int = 0  # virtual heaps only: GUARD-filled bytes on each side of ``buffer``
    outer: torch.Tensor | None = None  # the allocation holding the guards and the buffer
    peers: list | None = None  # [R] uint8 tensors: every rank's heap mapped here (CPU heaps; None on GPUs)
    pids: tuple | None = None  # shm heaps: each rank's process id (a waiter tells a dead peer from a slow one)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def guards_intact(self) -> bool:
        """Whether the guard bytes around the buffer still hold :data:`GUARD` (always True without guards)."""
        if self.outer is None or self.guard_bytes == 0:
            return True
        g = self.guard_bytes
        return bool((self.outer[:g] == GUARD).all() and (self.outer[-g:] == GUARD).all())


GUARD = 0xA5
MIN_BYTES = 4096  # the smallest heap_bytes accepted (by every way of building a heap)


def _check_nbytes(nbytes: int) -> None:
    check_positive_int("heap_bytes", nbytes, minimum=MIN_BYTES)


def virtual_heaps(world_size: int, nbytes: int, device: torch.device | str = "cpu",
                  guard_bytes: int = 0) -> list[Heap]:
    """The heaps of ``world_size`` virtual ranks in this process: plain tensors sharing one pointer table.
    ``guard_bytes``: that many :data:`GUARD` bytes on each side of every heap (see ``Heap.guards_intact``)."""
    _check_nbytes(nbytes)
    g = int(guard_bytes)
    outers = [torch.full((nbytes + 2 * g,), GUARD, dtype=torch.uint8, device=device) for _ in range(world_size)]
    bufs = [o[g:g + nbytes] for o in outers]
    for b in bufs:
        b.zero_()
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=device)
    return [Heap("virtual", r, world_size, b, ptrs, (outers,), g, o, bufs)
            for r, (b, o) in enumerate(zip(bufs, outers))]


SHM_DIR = "/dev/shm"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove this user's heap segments whose creating process is gone (a job killed between creating and
    mapping its heap); returns the paths removed. Called by every :func:`shm_heap` before it creates one."""
    prefix = f"moekit-{os.getuid()}-"
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _alive(pid):
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(os.path.join(shm_dir, name))
            except OSError:
                pass
    return removed


def shm_heap(comm, nbytes: int, shm_dir: str = SHM_DIR) -> Heap:
    """A heap in POSIX shared memory over the CPU processes of ``comm`` (a ``Comm``; collective).

    Each rank creates ``/dev/shm/moekit-<uid>-<token>-<rank>-<pid>`` (the token from rank 0; mode 0600, a
    sparse file: memory is used only where rows land), maps every rank's file with
    ``torch.from_file(shared=True)``, and after a second exchange (all mapped) removes its own name: the
    mappings stay valid and nothing is left in ``/dev/shm`` when a process exits, raises or is killed. A
    job killed inside that window leaves segments named by a dead pid: the next heap of the same user
    removes them (:func:`sweep_stale_segments`). Every rank must pass the same ``nbytes`` (checked by the
    transport).
    """
    _check_nbytes(nbytes)
    r, me = comm.size, comm.rank
    sweep_stale_segments(shm_dir)
    token = torch.zeros(r, 3, dtype=torch.int64)
    if me == 0:
        u = uuid.uuid4().int
        token[:, 0], token[:, 1] = u & ((1 << 62) - 1), (u >> 62) & ((1 << 62) - 1)
    token[:, 2] = os.getpid()
    got = comm.exchange_fixed(token)  # row s came from rank s
    pids = got[:, 2].tolist()
    lo, hi = got[0, :2].tolist()  # rank 0's token
    name = f"moekit-{os.getuid()}-{lo:x}{hi:x}"
    paths = [os.path.join(shm_dir, f"{name}-{d}-{pids[d]}") for d in range(r)]
    fd = os.open(paths[me], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        comm.exchange_fixed(torch.zeros(r, 1, dtype=torch.int64))  # every file exists
        bufs = [torch.from_file(p, shared=True, size=nbytes, dtype=torch.uint8) for p in paths]
        comm.exchange_fixed(torch.zeros(r, 1, dtype=torch.int64))  # every rank has mapped every file
    finally:
        os.unlink(paths[me])  # normal or not: the name goes, the mappings stay
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    return Heap("shm", me, r, bufs[me], ptrs, (bufs,), peers=bufs, pids=tuple(pids))


def torch_symmetric_heap(group, nbytes: int, device: torch.device) -> Heap:
    """A heap in PyTorch symmetric memory (CUDA/ROCm; collective over ``group``). Raises RuntimeError where
    this torch has none (see :func:`availability`). Not exercised on the CPU."""
    _check_nbytes(nbytes)
    import torch.distributed as dist
    from torch.distributed import _symmetric_memory as symm_mem

    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    group = group if group is not None else dist.group.WORLD
    handle = symm_mem.rendezvous(buf, group)
    buf.zero_()
    ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
    dist.barrier(group)  # every rank zeroed its flags before anyone pushes
    return Heap("torch-symm-mem", int(handle.rank), int(handle.world_size), buf, ptrs, (handle,))


def availability(device_type: str | None = None) -> tuple[str | None, str]:
    """``(heap kind or None, why)``: which heap a ``transport="symmetric"`` Buffer would use here."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            return "shm", "CPU: POSIX shared memory (/dev/shm) between the gloo ranks of a node"
        return None, "CPU: /dev/shm is not writable"
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.distributed._symmetric_memory"
    if not (hasattr(symm_mem, "empty") and hasattr(symm_mem, "rendezvous")):
        return None, f"torch {torch.__version__}: _symmetric_memory lacks empty/rendezvous"
    return "torch-symm-mem", "GPU: PyTorch symmetric memory (empty + rendezvous) inside a node"
