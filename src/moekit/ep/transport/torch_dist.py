"""Transport over torch.distributed collectives: works on every backend (gloo, NCCL, RCCL).

A :class:`Comm` is a process group seen from one rank. A one-rank ``Comm`` never calls
torch.distributed (so a Buffer works without ``init_process_group``); the peer of rank 0 is itself.

Bounded waits: every wait of the host on a collective (gloo: all of them; NCCL: the exchanges whose
result the host reads at once) is ``work.wait(timeout)`` with the Comm's ``timeout`` (seconds). When it
runs out, or the backend reports a lost peer (gloo: "Connection reset by peer"), the Comm calls
``on_fail(error)``, which raises moekit's :class:`~moekit.ep.errors.PeerTimeout` naming the ranks that
did not arrive (``moekit.ep.guard.Watch``); without ``on_fail`` it raises a PeerTimeout that cannot
name them. NCCL's stream-ordered all-to-alls are never waited for by the host: the process group's
own timeout (NCCL's watchdog) bounds them.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..errors import PeerTimeout


@dataclasses.dataclass(frozen=True)
class Comm:
    group: object  # a ProcessGroup, or None for the default group (ignored when size == 1)
    size: int
    rank: int
    timeout: float = 300.0  # seconds, every host wait
    on_fail: Callable[[BaseException], None] | None = None  # raises the PeerTimeout of a failed wait

    def _wait(self, work) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as err:  # gloo: "Operation timed out!", "Connection reset by peer", ...
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        if self.on_fail is not None:
            self.on_fail(err)
        raise PeerTimeout("a collective of moekit", (), self.timeout, detail=str(err).splitlines()[0][:200]) from err

    def all_to_all_rows(self, send: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                        async_op: bool = False):
        """Exchange rows of ``send`` ``[sum(send_rows), B]``; returns ``(recv [sum(recv_rows), B], work)``.

        ``work`` is None unless ``async_op`` (then ``recv`` is valid after ``work.wait()``, which is
        bounded by ``timeout`` on CPU tensors).
        """
        assert len(send_rows) == len(recv_rows) == self.size
        recv = torch.empty(sum(recv_rows), *send.shape[1:], dtype=send.dtype, device=send.device)
        if self.size == 1:
            recv.copy_(send)
            return recv, None
        host = send.device.type == "cpu"
        work = dist.all_to_all_single(recv, send, output_split_sizes=recv_rows, input_split_sizes=send_rows,
                                      group=self.group, async_op=async_op or host)
        if not host:
            return recv, work
        if async_op:
            return recv, _BoundedWork(self, work)
        self._wait(work)
        return recv, None

    def exchange_fixed(self, msg: torch.Tensor) -> torch.Tensor:
        """Row ``p`` of ``msg`` [P, W] goes to peer ``p``; row ``p`` of the result came from peer ``p``.
        The host waits for it (bounded): its result is read on the host."""
        assert msg.shape[0] == self.size
        if self.size == 1:
            return msg.clone()
        out = torch.empty_like(msg)
        self._wait(dist.all_to_all_single(out, msg.contiguous(), group=self.group, async_op=True))
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group; the host waits for it (bounded)."""
        if self.size > 1:
            self._wait(dist.all_reduce(t, group=self.group, async_op=True))
        return t


class _BoundedWork:
    """A pending gloo work whose ``wait()`` is bounded by the Comm's timeout."""

    def __init__(self, comm: Comm, work):
        self._comm, self._work = comm, work

    def wait(self, timeout=None) -> bool:
        self._comm._wait(self._work)
        return True
