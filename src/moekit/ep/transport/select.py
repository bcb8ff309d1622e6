"""``Buffer(transport=...)``: which transport a Buffer uses, and why."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..._util import check_positive_int
from ...dist import NodeLayout
from .. import heap as heapmod
from .base import Transport
from .collective import CollectiveTransport
from .torch_dist import Comm

TRANSPORTS = ("auto", "collective", "symmetric")


def symmetric_available(device: torch.device, node_layout: NodeLayout, hierarchical: bool) -> tuple[bool, str]:
    """Whether ``transport="symmetric"`` can run for this Buffer, and why (not)."""
    kind, why = heapmod.availability(device.type)
    if kind is None:
        return False, why
    if node_layout.num_nodes > 1 and not hierarchical:
        return False, "the flat path spans several nodes (a heap lives inside one node): use the two-stage path"
    return True, why


def _check_agree(comm: Comm, heap_bytes: int, num_sms: int, device: torch.device) -> None:
    # Sizes that lay out every heap must agree: the same ValueError on every rank, before anything is mapped.
    msg = torch.tensor([[heap_bytes, num_sms]] * comm.size, dtype=torch.int64).to(device)
    got = comm.exchange_fixed(msg).tolist()
    for s, (b, k) in enumerate(got):
        if (b, k) != tuple(got[0]):
            raise ValueError(f"moekit.Buffer(transport='symmetric'): heap_bytes and num_sms must be the same on "
                             f"every rank: rank 0 has ({got[0][0]}, {got[0][1]}), rank {s} has ({b}, {k})")


def make_transport(kind: str, comm: Comm, node_layout: NodeLayout, node_groups=None, *, num_sms: int = 20,
                   device: torch.device | None = None, heap_bytes: int | None = None,
                   timeout: float | None = None) -> Transport:
    """The Transport of a Buffer. ``kind``: one of :data:`TRANSPORTS` (see ``Buffer``'s docstring).

    ``"auto"`` takes the symmetric transport where a heap can serve (PyTorch symmetric memory on GPUs, POSIX
    shared memory between the CPU processes of a node, run by the native executor), the group has several
    ranks and the path's symmetric stage lies inside one node (the two-stage path: its intra-node stage);
    else the collective one. ``MOEKIT_TRANSPORT=collective`` makes ``auto`` collective everywhere,
    ``MOEKIT_TRANSPORT=symmetric`` symmetric wherever a heap can serve (the CPU included).
    Collective over the group (over each node for the heap) when the result is symmetric; a one-rank
    group gets a heap of its own (no torch.distributed needed).
    """
    from .symmetric import DEFAULT_HEAP_BYTES, DEFAULT_SHM_HEAP_BYTES, DEFAULT_TIMEOUT_S, SymmetricTransport

    if kind not in TRANSPORTS:  # (an explicit "auto" is resolved below)
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    device = torch.device("cpu") if device is None else device
    hierarchical = node_groups is not None
    ok, why = symmetric_available(device, node_layout, hierarchical)
    if kind == "auto":
        prefer = os.environ.get("MOEKIT_TRANSPORT", "")
        if prefer == "collective" or not ok:
            kind = "collective"
        elif prefer != "symmetric" and (comm.size == 1 or not dist.is_initialized()):
            kind = "collective"
        else:
            kind = "symmetric"
    if kind in ("auto", "collective"):
        return CollectiveTransport(comm, node_layout, node_groups)
    if not ok:
        raise ValueError(f"transport='symmetric' is not available here: {why}")
    check_positive_int("heap_bytes", heap_bytes, none_ok=True, minimum=heapmod.MIN_BYTES)
    if heap_bytes is None:  # a CPU heap is a sparse /dev/shm file: memory is used only where rows land
        heap_bytes = DEFAULT_SHM_HEAP_BYTES if device.type == "cpu" and comm.size > 1 else DEFAULT_HEAP_BYTES
    _check_agree(comm, heap_bytes, num_sms, device)
    if comm.size == 1:
        return SymmetricTransport(comm, node_layout, heapmod.virtual_heaps(1, heap_bytes, device)[0], num_sms=num_sms,
                                  timeout=DEFAULT_TIMEOUT_S if timeout is None else float(timeout))
    if hierarchical:
        me = comm.rank
        heap_comm = Comm(node_groups.intra, node_layout.ranks_per_node, node_layout.local_of(me), comm.timeout,
                         comm.on_fail)
    else:
        heap_comm = comm
    if device.type == "cpu":
        heap = heapmod.shm_heap(heap_comm, heap_bytes)
    else:
        group = heap_comm.group
        heap = heapmod.torch_symmetric_heap(group, heap_bytes, device)
    return SymmetricTransport(comm, node_layout, heap, node_groups, num_sms=num_sms,
                              timeout=DEFAULT_TIMEOUT_S if timeout is None else float(timeout))
