"""The symmetric transport: moekit's Triton push kernels over a symmetric heap (``transport="symmetric"``).

Heap layout of every rank (bytes): ``flags`` int32 ``[2, R, K]`` (parity, source rank, program), then two
*receive areas* (parity 0 and 1) of ``R`` slots each. Exchange ``n`` (counted alike on every rank) uses
parity ``n % 2``; in it, source rank s writes its chunk for rank d into slot s of d's area, row by row
(rows of ``row_bytes``: the slot holds ``area / R // row_bytes`` of them), and each of its K programs then
sets flag ``[parity, s, program]`` of d to ``n`` with a release store at system scope. Rank d waits until
all ``R * K`` flags of the parity read ``n`` (acquire), then copies its rows out.

Why two areas suffice: a rank starts exchange n + 2 (which overwrites area n % 2) only after it has
received every peer's exchange n + 1, and a peer sends exchange n + 1 only after it has copied exchange n
out of its area (a Channel completes its pending exchange before starting the next). Flags are never
reset: an exchange number is never reused.

Every chunk starts with its sender's status word (the convention of every exchange in ``moekit.ep``): a
sender whose chunk does not fit a slot sends, instead of its rows, one row whose status is
``Code.HEAP_CAPACITY``, and every rank raises the same error from it; the heap is never written out of
bounds and the next exchange works.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable

import torch

from ... import platform
from ..._util import round_up
from ...dist import NodeLayout
from ...kernels import comm as kcomm
from .. import wire
from ..errors import Code, PeerTimeout, Status, first_failure, raise_status
from ..handle import DispatchHandle
from ..heap import Heap
from ..stats import Traffic
from ..wire import plus_status
from .base import Rows, Transfer
from .collective import RowEngine
from .torch_dist import Comm

DEFAULT_HEAP_BYTES = 32 << 20
DEFAULT_SHM_HEAP_BYTES = 1 << 30  # sparse: pages exist only where rows have landed
DEFAULT_TIMEOUT_S = 300.0


class Landing:
    """The receiving end of one exchange: waits for the flags once, then copies the rows out of the heap."""

    def __init__(self, channel: Channel, op: str, seq: int, parity: int, row_bytes: int,
                 gather: Callable[[torch.Tensor, int], dict[str, torch.Tensor]]):
        self.channel, self.op, self.seq, self.parity, self.row_bytes = channel, op, seq, parity, row_bytes
        self._gather, self._data = gather, None

    def arrive(self) -> dict[str, torch.Tensor]:
        """Wait for every peer (bounded: PeerTimeout), then copy the received rows out (once)."""
        if self._data is None:
            ch = self.channel
            ch.wait(self)
            # No autograd here: the next exchange's start may complete this one inside a differentiable
            # call, and the rows land in tensors an autograd Function has already returned.
            with torch.no_grad():
                self._data = self._gather(ch.area(self.parity, self.row_bytes), ch.slot_rows(self.row_bytes))
        return self._data

    def complete(self) -> None:
        """:meth:`arrive`, for a ``Transfer``'s arrive step."""
        self.arrive()


EXECUTORS = ("auto", "native", "triton")


def choose_executor(heap: Heap, executor: str = "auto") -> tuple[str, str]:
    """``(executor, why)``: who runs the protocol's steps on ``heap``. ``"native"`` (worker threads, torch
    copies, libatomic flags: :mod:`moekit.kernels.comm_native`) where the heap is in host memory and mapped
    here (``Heap.peers``); ``"triton"`` (the kernels of :mod:`moekit.kernels.comm`: compiled on GPUs, Triton's
    interpreter on the CPU) otherwise. ``MOEKIT_COMM_EXECUTOR=triton|native`` overrides ``"auto"``."""
    import os

    from ...kernels import atomics

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "auto":
        executor = os.environ.get("MOEKIT_COMM_EXECUTOR", "auto") or "auto"
        if executor not in EXECUTORS:
            raise ValueError(f"MOEKIT_COMM_EXECUTOR must be one of {EXECUTORS[1:]}, got {executor!r}")
    host = heap.peers is not None and heap.buffer.device.type == "cpu"
    ok, why = atomics.available()
    if executor == "auto":
        if host and ok:
            return "native", f"CPU heap: {why}"
        return "triton", "Triton kernels" + ("" if host else " (device heap)") + ("" if ok else f" ({why})")
    if executor == "native" and not (host and ok):
        raise ValueError(f"executor='native' needs a CPU heap mapped in this process and libatomic: "
                         f"heap kind {heap.kind!r} on {heap.buffer.device}; {why}")
    return executor, "chosen explicitly"


class Channel:
    """One rank's end of the heap protocol (see the module docstring).

    Args:
        heap: this rank's :class:`~moekit.ep.heap.Heap`.
        num_programs: K, the grid of every push (``num_sms``): Triton programs, or native worker threads.
        timeout: seconds a wait for the peers may take before :class:`~moekit.ep.errors.PeerTimeout`.
        group_ranks: the group rank of each heap rank (for error messages); default ``range(R)``.
        executor: ``"auto"`` | ``"native"`` | ``"triton"`` (:func:`choose_executor`).
    """

    def __init__(self, heap: Heap, num_programs: int, timeout: float = DEFAULT_TIMEOUT_S,
                 group_ranks: list[int] | None = None, executor: str = "auto", on_fail=None):
        r, k = heap.world_size, num_programs
        self.heap, self.rank, self.world_size, self.num_programs, self.timeout = heap, heap.rank, r, k, timeout
        self.group_ranks = list(range(r)) if group_ranks is None else list(group_ranks)
        flag_bytes = 2 * r * k * 4
        self.data_off = round_up(flag_bytes, 256)
        self.area_bytes = (heap.nbytes - self.data_off) // 2 // 256 * 256
        if self.area_bytes < 256 * r:
            raise ValueError(f"heap_bytes={heap.nbytes} is too small for {r} ranks x {k} programs")
        self.flags = heap.buffer[:flag_bytes].view(torch.int32).view(2, r, k)
        self.seq = 0
        self._pending: Landing | None = None
        self._polls = 1 if platform.triton_interpreted() else 1 << 14  # per launch; the host loop bounds the rest
        self.on_fail = on_fail  # called with the error of a wait that ran out (Comm.on_fail); may raise
        self.executor_name, self.executor_why = choose_executor(heap, executor)
        self.native = None
        if self.executor_name == "native":
            from ...kernels.comm_native import NativeExecutor

            self.native = NativeExecutor(heap.peers, k)

    @property
    def last_workers(self) -> int | None:
        """Native executor: how many worker threads ran the last push (== K); None for the Triton kernels."""
        return None if self.native is None else self.native.last_workers

    def notify(self, is_token_in_rank: torch.Tensor) -> torch.Tensor:
        """``pos [T, R] int32``: each (token, rank) pair's row in that rank's chunk (:func:`kcomm.notify`)."""
        if self.native is not None:
            return self.native.notify(is_token_in_rank)[0]
        return kcomm.notify(is_token_in_rank, self.num_programs)[0]

    def combine_rows(self, rows: torch.Tensor, pos: torch.Tensor, slot_rows: int) -> torch.Tensor:
        """The rows of each token summed in rank order, float32 (:func:`kcomm.combine_rows`)."""
        if self.native is not None:
            return self.native.combine_rows(rows, pos, slot_rows)
        return kcomm.combine_rows(rows, pos, slot_rows, self.num_programs)

    def slot_rows(self, row_bytes: int) -> int:
        return self.area_bytes // self.world_size // row_bytes

    def area(self, parity: int, row_bytes: int) -> torch.Tensor:
        """``[R * slot_rows, row_bytes]`` uint8 view of receive area ``parity``: slot s = rows from rank s."""
        n = self.world_size * self.slot_rows(row_bytes)
        start = self.data_off + parity * self.area_bytes
        return self.heap.buffer[start:start + n * row_bytes].view(n, row_bytes)

    def start(self, op: str, src: torch.Tensor, idx: torch.Tensor, counts: list[int],
              gather: Callable[[torch.Tensor, int], dict[str, torch.Tensor]]) -> Landing:
        """Push chunk d = rows ``src[idx[sum(counts[:d]) : ...]]`` (``src`` [n, rb] uint8, each chunk's first
        row holding the sender's status word) to rank d; returns the Landing of this exchange. ``gather(area,
        slot_rows)`` copies the received rows out. Collective; no host sync (one on a GPU to complete a
        pending exchange first)."""
        if self._pending is not None:
            self._pending.arrive()  # in-order completion: what makes two receive areas enough
        r, rb = self.world_size, src.shape[1]
        assert rb % 8 == 0 and rb >= wire.STATUS_BYTES and len(counts) == r
        self.seq += 1
        parity = self.seq % 2
        cap = self.slot_rows(rb)
        worst = max(range(r), key=lambda d: counts[d])
        if counts[worst] > cap:
            # Too big for the peer's slot: send one status row instead of the rows (every rank raises).
            src = torch.zeros(1, rb, dtype=torch.uint8, device=src.device)
            st = Status(int(Code.HEAP_CAPACITY), self.group_ranks[self.rank], counts[worst], cap,
                        self.group_ranks[worst])
            src[0, :wire.STATUS_BYTES].view(torch.int64).copy_(wire.ints_on(st.ints(), src.device))
            idx, counts = torch.zeros(r, dtype=torch.int64, device=src.device), [1] * r
        dst = self.data_off + parity * self.area_bytes + self.rank * cap * rb
        flag = (parity * r + self.rank) * self.num_programs
        if self.native is not None:
            self.native.push_rows(src.contiguous(), idx, list(counts), dst, flag, self.seq, self.rank)
        else:
            off = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(self.heap.ptrs.device)
            kcomm.push_rows(self.heap.ptrs, src.contiguous().view(torch.int32), idx, off, dst // 4, flag, self.seq,
                            self.num_programs)
        landing = Landing(self, op, self.seq, parity, rb, gather)
        self._pending = landing
        return landing

    def _dead(self, ready: list[bool]) -> list[int]:
        """Group ranks of the not-ready peers whose process is gone (shm heaps record each rank's pid)."""
        pids = self.heap.pids
        if pids is None:
            return []
        gone = []
        for s, ok in enumerate(ready):
            if not ok and s != self.rank:
                try:
                    os.kill(int(pids[s]), 0)
                except ProcessLookupError:
                    gone.append(self.group_ranks[s])
                except PermissionError:  # alive, another user's
                    pass
        return gone

    def wait(self, landing: Landing) -> None:
        """Block until every peer's flags of ``landing`` are set; PeerTimeout names the ranks missing."""
        if self._pending is landing:
            self._pending = None
        flags = self.flags[landing.parity]
        deadline = time.monotonic() + self.timeout
        pause, spins = 1e-4, 0
        ready = [False] * self.world_size
        while True:
            if self.native is not None:  # acquire loads, no tensor read back
                ready = self.native.ready(flags, landing.seq, ready)
            else:
                ready = kcomm.wait_flags(flags.flatten(), landing.seq, self._polls).view(self.world_size, -1) \
                    .all(1).tolist()
            if all(ready):
                return
            gone = self._dead(ready) if spins % 64 == 63 else []
            if gone and self.on_fail is not None:  # a peer's process has exited: no need to wait it out
                self.on_fail(ConnectionError(f"Connection closed by peer: the process of rank(s) {gone} exited"))
            if time.monotonic() > deadline or gone:
                missing = [self.group_ranks[s] for s, ok in enumerate(ready) if not ok]
                err = PeerTimeout(f"moekit.Buffer.{landing.op}", missing, self.timeout,
                                  "symmetric transport: flags never set")
                if self.on_fail is not None:  # the Buffer's watch: names who did not arrive, marks it broken
                    self.on_fail(TimeoutError(f"timed out: symmetric heap flags of rank(s) {missing} never set"))
                raise err
            spins += 1
            if self.native is not None and spins < 200:
                time.sleep(0)  # yield: a native peer is usually microseconds away
                continue
            time.sleep(pause)
            pause = min(pause * 2, 0.01 if self.native is None else 1e-3)


def chunk_rows(area: torch.Tensor, slot_rows: int, counts: list[int], first: int = 0) -> torch.Tensor:
    """``[sum(counts)]`` rows of ``area``: rows ``first .. first + counts[s]`` of slot s, in source order;
    indices clamped into the area (a failing sender's chunk is not there, and its status says so)."""
    device = area.device
    c = torch.tensor(counts, dtype=torch.int64, device=device)
    start = torch.arange(len(counts), device=device) * slot_rows + first - (torch.cumsum(c, 0) - c)
    pos = torch.repeat_interleave(start, c) + torch.arange(int(sum(counts)), device=device)
    return pos.clamp_(max=area.shape[0] - 1)


class SymmetricComm:
    """A :class:`~moekit.ep.transport.torch_dist.Comm` look-alike over a :class:`Channel`: the same
    ``all_to_all_rows`` / ``exchange_fixed`` / ``all_reduce_sum`` (rows of every chunk start with a status
    word), moved by the push kernels. Used for the intra-node stage of the two-stage path and for the
    small exchanges of the flat path."""

    def __init__(self, channel: Channel, op: str = "exchange", group=None):
        self.channel, self.size, self.rank, self.op = channel, channel.world_size, channel.rank, op
        self.group = group  # the process group the heap spans (None = the default group), as Comm.group

    def start(self, send: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> Landing:
        """Push ``send`` [sum(send_rows), rb] uint8 chunk by chunk; the Landing's ``"rows"`` are the
        received chunks [sum(recv_rows), rb] in source order (a copy, out of the heap)."""
        idx = torch.arange(send.shape[0], device=send.device)

        def gather(area, slot_rows):
            return {"rows": area.index_select(0, chunk_rows(area, slot_rows, recv_rows))}
        return self.channel.start(self.op, send, idx, list(send_rows), gather)

    def all_to_all_rows(self, send: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                        async_op: bool = False):
        """As ``Comm.all_to_all_rows``; completes before it returns (``work`` is None) even with ``async_op``."""
        return self.start(send, send_rows, recv_rows).arrive()["rows"], None

    def exchange_fixed(self, msg: torch.Tensor) -> torch.Tensor:
        """As ``Comm.exchange_fixed``: row ``p`` of ``msg`` [R, W] (any dtype) to rank ``p``."""
        assert msg.shape[0] == self.size and msg.dim() == 2
        raw = msg.contiguous().view(torch.uint8).view(self.size, -1)
        nb = raw.shape[1]
        rb = max(round_up(nb, 8), wire.STATUS_BYTES)  # a row of the heap holds at least a status word
        if rb != nb:
            raw = torch.cat([raw, raw.new_zeros(self.size, rb - nb)], 1)
        recv, _ = self.all_to_all_rows(raw, [1] * self.size, [1] * self.size)
        return recv[:, :nb].contiguous().view(msg.dtype).view(self.size, msg.shape[1])

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(1, -1).to(torch.int64) if t.dtype != torch.int64 else t.reshape(1, -1)
        got = self.exchange_fixed(flat.expand(self.size, -1).contiguous())
        t.copy_(got.sum(0).view(t.shape).to(t.dtype))
        return t


class SymmetricTransport(RowEngine):
    """``transport="symmetric"``. Flat path: the token rows are pushed by :func:`moekit.kernels.comm.push_rows`
    straight from a per-token table (each token packed once, pushed once per destination rank), and combine
    sums each token's returned rows with :func:`moekit.kernels.comm.combine_rows` in rank order. Two-stage
    path: the inter-node stage stays collective, the intra-node stage runs on the heap.

    Args:
        comm: the Buffer's collective ``Comm`` (construction checks, and the two-stage path's world).
        node_layout: the node layout. heap: this rank's heap (over the group, or over its node when two-stage).
        node_groups: the two-stage path's sub-groups, or None (flat: the heap spans the group).
        num_sms: K, the grid of every communication kernel. timeout: bound of every wait, seconds.
    """

    name = "symmetric"

    def __init__(self, comm: Comm, node_layout: NodeLayout, heap: Heap, node_groups=None, *, num_sms: int = 20,
                 timeout: float = DEFAULT_TIMEOUT_S):
        me = comm.rank
        if node_groups is None:
            ranks = list(range(node_layout.world_size))
        else:
            node = node_layout.node_of(me)
            ranks = [node_layout.rank_of(node, l) for l in range(node_layout.ranks_per_node)]
        self.heap = heap
        self.channel = Channel(heap, num_sms, timeout, ranks, on_fail=comm.on_fail)
        sym = SymmetricComm(self.channel, group=comm.group if node_groups is None else node_groups.intra)
        if node_groups is None:
            super().__init__(sym, node_layout)
        else:
            inter = Comm(node_groups.inter, node_layout.num_nodes, node_layout.node_of(me), comm.timeout, comm.on_fail)
            super().__init__(comm, node_layout, inter, sym)
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def num_sms(self) -> int:
        return self.channel.num_programs

    # ---- per-handle device plans ---------------------------------------------------------------
    def _plan(self, h: DispatchHandle) -> dict:
        plan = self._plans.get(h)
        if plan is None:
            device = h.send_token.device
            # notify: each (token, rank) pair's row in that rank's chunk, on the device.
            pos = self.channel.notify(h.is_token_in_rank.to(device))
            # Push order of a dispatch: for each rank d, the status row (row T of the table) then d's tokens.
            status_pos, data_pos = wire.positions(h.send_counts, device)
            idx = torch.empty(len(h.send_token) + self.world_size, dtype=torch.int64, device=device)
            idx[status_pos] = h.num_tokens
            idx[data_pos] = h.send_token
            plan = {"pos": pos, "dispatch_idx": idx}
            self._plans[h] = plan
        return plan

    def _transfer(self, op: str, landing: Landing, traffic: Traffic) -> Transfer:
        def check():  # the status word heading each received chunk (a host read)
            raise_status(op, first_failure(landing.arrive()["_status"].tolist()), self.world_size)
        return Transfer(traffic, arrive=landing.complete, check=check,
                        unpack=lambda: {k: v for k, v in landing.arrive().items() if k != "_status"})

    def _statuses(self, area: torch.Tensor, slot_rows: int) -> torch.Tensor:
        rows = torch.arange(self.world_size, device=area.device) * slot_rows
        return area.index_select(0, rows)[:, :wire.STATUS_BYTES].contiguous().view(torch.int64)  # [R, 5]

    def exchange_blocks(self, send: torch.Tensor, block_rows: int, traffic: Traffic, *,
                        async_op: bool = False) -> Transfer:
        if self.intra is not None:  # two-stage layout: low-latency blocks cross nodes, collectively
            return super().exchange_blocks(send, block_rows, traffic, async_op=async_op)
        # The push is issued now; the Transfer's arrive (a low-latency hook) waits for the flags.
        landing = self.comm.start(send, [block_rows] * self.world_size, [block_rows] * self.world_size)
        return Transfer(traffic, arrive=landing.complete, unpack=landing.arrive)

    # ---- flat dispatch / combine -------------------------------------------------------------------
    def dispatch(self, op: str, plan: DispatchHandle, rows: Rows, *, async_op: bool = False,
                 stage2_rows=None, out: dict[str, torch.Tensor] | None = None) -> Transfer:
        h = plan
        if h.hier is not None:
            return super().dispatch(op, plan, rows, async_op=async_op, stage2_rows=stage2_rows, out=out)
        fmt, fields, status = rows
        device = h.send_token.device
        table = wire.row_table(fmt, fields, h.num_tokens, status, device)
        recv_counts = list(h.recv_counts)

        def gather(area, slot_rows):
            data_pos = chunk_rows(area, slot_rows, recv_counts, first=1)  # after each chunk's status row
            return {"_status": self._statuses(area, slot_rows), **wire.select_rows(fmt, area, data_pos, out)}
        landing = self.channel.start(op, table, self._plan(h)["dispatch_idx"], plus_status(h.send_counts), gather)
        return self._transfer(op, landing, self._flat_traffic(h.send_counts, fmt.row_bytes))

    def combine(self, op: str, plan: DispatchHandle, rows: Rows, *, async_op: bool = False) -> Transfer:
        h = plan
        if h.hier is not None:
            return super().combine(op, plan, rows, async_op=async_op)
        fmt, fields, status = rows
        device = h.send_token.device
        m = h.num_recv_tokens
        table = wire.row_table(fmt, fields, m, status, device)
        status_pos, data_pos = wire.positions(h.recv_counts, device)
        idx = torch.empty(m + self.world_size, dtype=torch.int64, device=device)
        idx[status_pos] = m
        idx[data_pos] = torch.arange(m, device=device)
        pos = self._plan(h)["pos"]

        def gather(area, slot_rows):
            got = {"_status": self._statuses(area, slot_rows)}
            if any(c + 1 > slot_rows for c in h.send_counts):
                # A failing (too big) exchange: the rows are not there; the status raises.
                return {**got, **{f.name: torch.zeros(h.num_tokens, f.width, device=device) for f in fmt.fields}}
            for name, v in fmt.views(area).items():
                got[name] = self.channel.combine_rows(v, pos, slot_rows)
            return got
        landing = self.channel.start(op, table, idx, plus_status(h.recv_counts), gather)
        return self._transfer(op, landing, self._flat_traffic(h.recv_counts, fmt.row_bytes))
