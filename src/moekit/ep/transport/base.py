"""The seam between a Buffer and how its rows move: :class:`Transport` and :class:`Transfer`.

A Buffer plans an exchange (who sends which token to whom: a :class:`~moekit.ep.handle.DispatchHandle`)
and packs the rows (a :class:`Rows`); a Transport moves them and returns a :class:`Transfer`, which
owns the completion: waiting for the rows to land, the collective status check, the unpacking, and
the bytes moved. Two transports implement it: ``collective`` (torch.distributed all-to-alls, any
backend) and ``symmetric`` (moekit's Triton push kernels over a symmetric heap). Both return the same
rows in the same order with the same dtypes, and raise the same errors.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import NamedTuple

import torch

from ...dist import NodeLayout
from ..errors import Status
from ..handle import DispatchHandle
from ..stats import Traffic
from ..wire import RowFormat


class Rows(NamedTuple):
    """The rows of one exchange: ``fields[name]`` ``[n, width]`` packed by ``fmt``; ``status`` = the
    sender's status word, sent with them so that every receiver can raise a failing sender's error."""

    fmt: RowFormat
    fields: dict[str, torch.Tensor]
    status: Status


class Transfer:
    """One exchange in flight. ``wait()`` = ``arrive()`` + ``check()`` + ``unpack()`` (each step runs once).

    Args (for transports):
        traffic: the bytes this rank handed to the transport, by hop kind (``Buffer.stats``).
        arrive: blocks until the rows have landed (gloo works, symmetric flags); None = already there.
        check: raises the collective error if any sender's status word failed (a host read).
        unpack: returns the received fields ``{name: [m, width]}`` (no host sync on a GPU).
    """

    def __init__(self, traffic: Traffic, *, arrive: Callable[[], None] | None = None,
                 check: Callable[[], None] | None = None,
                 unpack: Callable[[], dict[str, torch.Tensor]] | None = None):
        self.traffic = traffic
        self._arrive, self._check, self._unpack = arrive, check, unpack
        self._result: dict[str, torch.Tensor] | None = None

    @property
    def bytes_moved(self) -> int:
        return self.traffic.total_bytes

    def arrive(self) -> None:
        """Block until the rows are in this rank's receive buffer (CPU/gloo: the host waits; GPU: enqueued)."""
        step, self._arrive = self._arrive, None
        if step is not None:
            step()

    def check(self) -> None:
        """Raise the error of the lowest failing sender (the same on every rank); no-op once passed."""
        self.arrive()
        step, self._check = self._check, None
        if step is not None:
            step()

    def unpack(self) -> dict[str, torch.Tensor]:
        """The received fields, ``{name: [m, width]}``; does not check statuses (``wait`` does)."""
        self.arrive()
        if self._result is None:
            self._result = self._unpack() if self._unpack is not None else {}
        return self._result

    def wait(self) -> dict[str, torch.Tensor]:
        """Complete the exchange: wait, raise a collective error if any, return the received fields."""
        self.check()
        return self.unpack()


class Transport(abc.ABC):
    """How a Buffer's rows move between the ranks of its group.

    Every method is collective over the group (every rank calls it, in the same order), and returns
    the same results on every transport. ``plan`` is a handle from ``Buffer.dispatch``; ``rows`` are
    the sender's rows: for :meth:`dispatch` one per local token (``[T, w]``, sent to every rank
    the plan names), for :meth:`combine` one per received row (``[M, w]``, sent back and summed).
    """

    name: str = "?"
    node_layout: NodeLayout
    rank: int

    @property
    def world_size(self) -> int:
        return self.node_layout.world_size

    @abc.abstractmethod
    def exchange_fixed(self, msg: torch.Tensor) -> torch.Tensor:
        """Row ``p`` of ``msg`` [R, W] int64 goes to rank ``p``; row ``p`` of the result came from rank ``p``.
        Blocking (the counts exchange of a dispatch)."""

    @abc.abstractmethod
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``t`` over the group; returns ``t``. Blocking."""

    @abc.abstractmethod
    def dispatch(self, op: str, plan: DispatchHandle, rows: Rows, *, async_op: bool = False,
                 stage2_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 out: dict[str, torch.Tensor] | None = None) -> Transfer:
        """Send each token row to the ranks of ``plan``; the Transfer unpacks ``{name: [M, w]}`` in
        (source rank, token) order (into ``out[name]`` where given). ``stage2_rows``: the two-stage path's
        forwarding rows from the global expert ids of the received rows (first dispatch of a plan).
        ``async_op``: CPU only, return before the rows arrived (``Transfer.arrive`` waits)."""

    @abc.abstractmethod
    def combine(self, op: str, plan: DispatchHandle, rows: Rows, *, async_op: bool = False) -> Transfer:
        """Send received rows ``[M, w]`` back to their source; the Transfer unpacks ``{name: [T, w]}``
        float32: the rows of each token summed in a fixed order (source rank order on each hop)."""

    @abc.abstractmethod
    def exchange_blocks(self, send: torch.Tensor, block_rows: int, traffic: Traffic, *,
                        async_op: bool = False) -> Transfer:
        """Fixed-size exchange (low-latency mode): ``send`` [R * B, rb] uint8, block ``p`` to rank ``p``.
        The Transfer unpacks ``{"rows": [R * B, rb]}``, block ``p`` from rank ``p``, and reports
        ``traffic`` (what the caller counts as sent). No host sync."""
