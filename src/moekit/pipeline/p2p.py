"""Point-to-point transfers between pipeline ranks, on any torch.distributed backend (gloo, NCCL, ...).

Every message of a step is known in advance (``moekit.schedule.simulate``), and so is the global order in
which messages leave their ranks. Between two neighbours, both ranks post their sends and receives
in that one order: receives as early as the order allows, a send as soon as its data is computed.
That makes the k-th operation of each side the counterpart of the other side's k-th operation, which

- on NCCL, where torch runs all send/recv ops between a pair of ranks on one communicator and one
  stream in issue order, rules out the deadlock of two ranks each sending before receiving;
- on gloo, where a blocked ``wait`` blocks the host, still never waits for a message whose sender
  needs something from us first (a later message in the order is never needed earlier: the order is
  the send time of a valid simulated run, see ``_advance``).

Messages carry ``len(shapes)`` tensors of the configured shapes and dtype: activations forward,
their gradients backward (DeepSeek's DualPipe convention).
"""

from __future__ import annotations

import datetime
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from ..schedule import Message

_default_shapes: list[tuple[int, ...]] | None = None
_default_dtype: torch.dtype | None = None


def set_p2p_tensor_shapes(shapes) -> None:
    """Set the default shapes of the tensors one stage sends to the next (a list of shapes).

    Every schedule without shapes of its own (``pipe.set_p2p_tensor_shapes``) uses these. Each
    micro-batch's stage output must be exactly these tensors: ``[micro_batch, ...]`` shapes.
    """
    global _default_shapes
    _default_shapes = normalize_shapes(shapes)


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Set the default dtype of the tensors sent between stages (activations and their gradients)."""
    global _default_dtype
    _default_dtype = normalize_dtype(dtype)


def normalize_shapes(shapes) -> list[tuple[int, ...]]:
    if isinstance(shapes, torch.Size) or (isinstance(shapes, (tuple, list)) and shapes
                                          and all(isinstance(d, int) for d in shapes)):
        raise TypeError(f"shapes must be a list of shapes (one per tensor a stage sends), got {shapes!r}; "
                        f"wrap a single shape in a list")
    if not isinstance(shapes, (tuple, list)) or not shapes:
        raise TypeError(f"shapes must be a non-empty list of shapes, got {shapes!r}")
    out = []
    for s in shapes:
        s = tuple(int(d) for d in s)
        if any(d < 0 for d in s):
            raise ValueError(f"shape {s} has a negative size")
        out.append(s)
    return out


def normalize_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype


def default_p2p_tensor_shapes() -> list[tuple[int, ...]] | None:
    return _default_shapes


def default_p2p_tensor_dtype() -> torch.dtype | None:
    return _default_dtype


Key = tuple  # (kind, src stage, mb)


def message_key(msg: Message) -> Key:
    return (msg.kind, msg.src, msg.mb)


class P2P:
    """The sends and receives of one rank for one step.

    ``sends`` is the global send order (``Simulation.sends``); only messages to or from ``rank`` are
    kept, grouped by neighbour. ``group_rank_of[pp_rank]`` is that rank's rank in ``group``.
    ``send`` and ``recv`` never block on the network except ``recv``'s wait for its own message.
    """

    def __init__(self, group, rank: int, group_rank_of: list[int], sends: list[tuple[float, Message]],
                 shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, backward: bool,
                 strict: bool = True, recv_ahead: int = 2, timeout: float = 300.0):
        self.group = group
        self.timeout = timeout  # seconds: every host wait on a message (CPU tensors; NCCL: its watchdog)
        self.strict = strict
        self.recv_ahead = recv_ahead
        self.rank = rank
        self.group_rank_of = group_rank_of
        self.shapes = shapes
        self.dtype = dtype
        self.device = device
        self.plan: dict[int, deque] = defaultdict(deque)  # peer -> [(is_send, key)] in global order
        self.peer_of: dict[Key, int] = {}
        for _, msg in sends:
            if msg.kind == "B" and not backward:
                continue
            src, dst = msg.src[0], msg.dst[0]
            if rank not in (src, dst):
                continue
            peer = dst if src == rank else src
            key = message_key(msg)
            self.plan[peer].append((src == rank, key))
            self.peer_of[key] = peer
        if not strict:
            # Both directions of a pair are independent (gloo): sends and receives get queues of their own.
            self.recv_plan = {p: deque(k for is_send, k in q if not is_send) for p, q in self.plan.items()}
            self.plan = {p: deque(x for x in q if x[0]) for p, q in self.plan.items()}
        self.ready: dict[Key, list[torch.Tensor]] = {}  # computed, not yet posted
        self.posted: dict[Key, tuple[list, list[torch.Tensor]]] = {}  # receives in flight
        self.in_flight: list[tuple[list, list[torch.Tensor]]] = []  # sends: (works, tensors to free)

    def send(self, key: Key, tensors: list[torch.Tensor], free: bool) -> None:
        """Hand over a computed message; it goes out as soon as the order allows (normally at once).

        ``free``: release the tensors' storage once sent (their autograd graph stays usable).
        """
        assert key in self.peer_of, f"message {key} is not in this step's plan"
        self.ready[key] = (tensors, free)
        self._advance(self.peer_of[key])
        self._reap()

    def recv(self, key: Key) -> list[torch.Tensor]:
        """Wait for message ``key`` and return its tensors (fresh buffers). Blocks the host on gloo;
        on NCCL only makes the current stream wait."""
        peer = self.peer_of[key]
        self._advance(peer)
        if not self.strict:
            rplan = self.recv_plan[peer]
            while key not in self.posted:
                self._post_recv(peer, rplan.popleft())
        assert key in self.posted, (f"rank {self.rank}: message {key} cannot be received yet: an earlier "
                                    f"send to rank {peer} has not been computed (schedule order broken)")
        works, bufs = self.posted.pop(key)
        if not self.strict:
            self._advance_loose(peer)  # keep the window of early receives full
        self._wait(works, peer, key)
        return bufs

    def _wait(self, works: list, peer: int | None, key) -> None:
        # Bounded on the host (gloo, CPU tensors): a dead or absent neighbour is moekit's PeerTimeout naming
        # it, not a hang until the process group's timeout. Device tensors: the stream waits (NCCL's
        # watchdog bounds those).
        host = self.device.type == "cpu"
        for w in works:
            if not host:
                w.wait()
                continue
            try:
                w.wait(timeout=datetime.timedelta(seconds=self.timeout))
            except RuntimeError as err:  # gloo: "Operation timed out!", "Connection reset by peer", ...
                from ..ep.errors import PeerTimeout  # (lazy: the pipeline does not need moekit.ep otherwise)

                ranks = () if peer is None else (peer,)
                raise PeerTimeout(f"pipeline step (rank {self.rank} waiting for message {key})", ranks,
                                  self.timeout, detail=str(err).splitlines()[0][:200]) from err

    def _advance(self, peer: int) -> None:
        if not self.strict:
            return self._advance_loose(peer)
        # Post, in order, every receive and every already-computed send to this peer.
        plan = self.plan[peer]
        while plan:
            is_send, key = plan[0]
            if is_send:
                if key not in self.ready:
                    return
                self._post_send(peer, key)
            else:
                self._post_recv(peer, key)
            plan.popleft()

    def _post_send(self, peer: int, key: Key) -> None:
        tensors, free = self.ready.pop(key)
        works = [dist.isend(t, group=self.group, group_dst=self.group_rank_of[peer]) for t in tensors]
        self.in_flight.append((works, tensors if free else []))

    def _post_recv(self, peer: int, key: Key) -> None:
        bufs = [torch.empty(s, dtype=self.dtype, device=self.device) for s in self.shapes]
        works = [dist.irecv(b, group=self.group, group_src=self.group_rank_of[peer]) for b in bufs]
        self.posted[key] = (works, bufs)

    def _advance_loose(self, peer: int) -> None:
        plan = self.plan.get(peer, ())
        while plan and plan[0][1] in self.ready:
            self._post_send(peer, plan.popleft()[1])
        rplan = self.recv_plan.get(peer, ())
        pending = sum(1 for k in self.posted if self.peer_of[k] == peer)
        while rplan and pending < self.recv_ahead:
            self._post_recv(peer, rplan.popleft())
            pending += 1

    def _reap(self) -> None:
        keep = []
        for works, tensors in self.in_flight:
            if all(w.is_completed() for w in works):
                self._wait(works, None, "a send")
                _free(tensors)
            else:
                keep.append((works, tensors))
        self.in_flight = keep

    def finish(self) -> None:
        """Wait for every send; check that every planned message went out and came in."""
        for works, tensors in self.in_flight:
            self._wait(works, None, "a send")
            _free(tensors)
        self.in_flight = []
        left = {p: list(q) for p, q in self.plan.items() if q}
        if not self.strict:
            left.update({("recv", p): list(q) for p, q in self.recv_plan.items() if q})
        assert not left and not self.ready and not self.posted, \
            f"rank {self.rank}: unfinished messages {left} ready={list(self.ready)} posted={list(self.posted)}"


def _free(tensors: list[torch.Tensor]) -> None:
    # The autograd graph keeps what backward needs (shapes in its metadata), so the activation's own
    # storage can go as soon as the next stage has it: this is what keeps DualPipe at PP+1 activations.
    for t in tensors:
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
