"""Transport over torch.distributed collectives: works on every backend (gloo, NCCL, RCCL).

A :class:`Comm` is a process group seen from one rank. A one-rank ``Comm`` never calls
torch.distributed (so a Buffer works without ``init_process_group``); the peer of rank 0 is itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Comm:
    group: object  # a ProcessGroup, or None for the default group (ignored when size == 1)
    size: int
    rank: int

    def all_to_all_rows(self, send: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                        async_op: bool = False):
        """Exchange rows of ``send`` ``[sum(send_rows), B]``; returns ``(recv [sum(recv_rows), B], work)``.

        ``work`` is None unless ``async_op`` (then ``recv`` is valid after ``work.wait()``).
        """
        assert len(send_rows) == len(recv_rows) == self.size
        recv = torch.empty(sum(recv_rows), *send.shape[1:], dtype=send.dtype, device=send.device)
        if self.size == 1:
            recv.copy_(send)
            return recv, None
        work = dist.all_to_all_single(recv, send, output_split_sizes=recv_rows, input_split_sizes=send_rows,
                                      group=self.group, async_op=async_op)
        return recv, work

    def exchange_fixed(self, msg: torch.Tensor) -> torch.Tensor:
        """Row ``p`` of ``msg`` [P, W] goes to peer ``p``; row ``p`` of the result came from peer ``p``."""
        assert msg.shape[0] == self.size
        if self.size == 1:
            return msg.clone()
        out = torch.empty_like(msg)
        dist.all_to_all_single(out, msg.contiguous(), group=self.group)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, group=self.group)
        return t
