"""Pipeline schedules as data: which stage lives where, and the ordered list of ops each rank runs.

A *stage* is ``(rank, module)``: local module 0 or 1 of a pipeline rank. Micro-batches flow along a
*direction*, a chain of stages. An op is one of

- ``F``  forward of one micro-batch through one local module,
- ``B``  backward of one micro-batch (``zb=True``: weight gradients deferred to ``WeightGradStore``),
- ``W``  the deferred weight gradients of the oldest ``zb`` backward,
- ``FB`` a forward and a backward run as one overlapped pair.

DualPipe, DualPipeV and 1F1B differ only in their stage graph and their op lists; one executor
(``engine.py``) runs all three. ``simulate`` runs the op lists of every rank against each other with
given op durations: it proves a schedule free of deadlock, gives the order in which messages leave
each rank (the p2p layer posts sends and receives in that order, see ``p2p.py``), and predicts the
timeline that ``bench/pipeline_bubbles.py`` measures.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import NamedTuple

Stage = tuple[int, int]  # (pipeline rank, local module index)

KINDS = ("1f1b", "dualpipe", "dualpipev")


class StageLinks(NamedTuple):
    """Where a stage's activations come from and go to (``None``: first / last stage of its direction)."""

    direction: int
    prev: Stage | None
    next: Stage | None


@dataclasses.dataclass(frozen=True)
class Op:
    """One entry of a rank's program. For ``FB``, ``module``/``mb`` is the forward, ``module_b``/``mb_b`` the
    backward; for ``W``, ``module``/``mb`` name the backward whose weight gradients it runs."""

    kind: str  # "F" | "B" | "W" | "FB"
    module: int
    mb: int
    zb: bool = False
    module_b: int | None = None
    mb_b: int | None = None


def stage_graph(kind: str, num_ranks: int) -> dict[Stage, StageLinks]:
    """The stages of a ``kind`` pipeline over ``num_ranks`` ranks and how they are chained.

    - ``1f1b``: one module per rank, stages 0..R-1 on ranks 0..R-1.
    - ``dualpipe``: direction 0 runs module 0 of ranks 0..R-1, direction 1 module 1 of ranks R-1..0
      (rank r holds stages r and R-1-r of the model).
    - ``dualpipev``: one direction down module 0 of ranks 0..R-1, then up module 1 of ranks R-1..0
      (rank r holds stages r and 2R-1-r; the turn at rank R-1 stays on the rank).
    """
    if kind == "1f1b":
        chains = [[(r, 0) for r in range(num_ranks)]]
    elif kind == "dualpipe":
        chains = [[(r, 0) for r in range(num_ranks)], [(r, 1) for r in reversed(range(num_ranks))]]
    elif kind == "dualpipev":
        chains = [[(r, 0) for r in range(num_ranks)] + [(r, 1) for r in reversed(range(num_ranks))]]
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    graph = {}
    for d, chain in enumerate(chains):
        for i, s in enumerate(chain):
            graph[s] = StageLinks(d, chain[i - 1] if i > 0 else None, chain[i + 1] if i + 1 < len(chain) else None)
    return graph


def microbatches_per_direction(kind: str, num_chunks: int) -> int:
    return num_chunks // 2 if kind == "dualpipe" else num_chunks


def check_schedule_args(kind: str, num_ranks: int, num_chunks: int) -> None:
    """Raise ``ValueError`` when ``kind`` cannot run ``num_chunks`` micro-batches on ``num_ranks`` ranks."""
    if num_ranks < 1:
        raise ValueError(f"a pipeline needs at least one rank, got num_ranks={num_ranks}")
    if kind == "dualpipe":
        if num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of ranks (rank r pairs with rank R-1-r), "
                             f"got {num_ranks}; use DualPipeV for an odd count")
        if num_chunks % 2 or num_chunks < 2 * num_ranks:
            raise ValueError(f"DualPipe needs an even num_chunks >= 2 * num_ranks = {2 * num_ranks} "
                             f"(half enter at each end), got num_chunks={num_chunks}")
    elif kind == "dualpipev":
        if num_chunks < 2 * num_ranks:
            raise ValueError(f"DualPipeV needs num_chunks >= 2 * num_ranks = {2 * num_ranks}, "
                             f"got num_chunks={num_chunks}")
    elif kind == "1f1b":
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class _Builder:
    """Turns phase-level verbs into ``Op``s with micro-batch numbers and a FIFO of deferred W chunks."""

    def __init__(self, module_of_phase):
        self.module_of_phase = module_of_phase
        self.f = [0, 0]
        self.b = [0, 0]
        self.pending_w: list[tuple[int, int]] = []
        self.ops: list[Op] = []

    def _next_f(self, phase):
        m = self.module_of_phase(phase)
        self.f[m] += 1
        return m, self.f[m] - 1

    def _next_b(self, phase):
        m = self.module_of_phase(phase)
        self.b[m] += 1
        return m, self.b[m] - 1

    def F(self, phase):
        self.ops.append(Op("F", *self._next_f(phase)))

    def B(self, phase, zb=False):
        m, mb = self._next_b(phase)
        if zb:
            self.pending_w.append((m, mb))
        self.ops.append(Op("B", m, mb, zb=zb))

    def W(self):
        assert self.pending_w, "schedule pops a W chunk that no zero-bubble backward queued"
        self.ops.append(Op("W", *self.pending_w.pop(0)))

    def FB(self, phase_f, phase_b):
        mf, mbf = self._next_f(phase_f)
        mb_, mbb = self._next_b(phase_b)
        self.ops.append(Op("FB", mf, mbf, module_b=mb_, mb_b=mbb))


def _dual_program(b: _Builder, n: int, r: int, c: int, turn: bool) -> list[Op]:
    """The bidirectional schedule of one rank, in "phases" (0: the direction fed at my end of the pipe).

    ``n`` ranks per direction, my position ``r`` from my end, ``c`` micro-batches per direction;
    ``turn``: I sit where the two directions meet (its first F&B pair is not overlapped, which shortens
    the bubble). DualPipe runs it with (R/2, min(r, R-1-r), chunks/2), DualPipeV with (R, r, chunks).
    """
    edge = n - r - 1  # ranks between me and the far end of my half
    for _ in range(2 * edge):  # warm-up: forwards of my own direction only
        b.F(0)
    for _ in range(r + 1):  # both directions start
        b.F(0)
        b.F(1)
    for _ in range(edge):  # first backwards; their W fills the bubble right after
        b.B(1, zb=True)
        b.W()
        b.F(1)
    for i in range(c - 2 * n + r + 1):  # steady state: pairs of overlapped F&B
        if i == 0 and turn:
            b.F(0)
            b.B(1)
        else:
            b.FB(0, 1)
        b.FB(1, 0)
    for _ in range(edge):
        b.B(1)
        b.FB(1, 0)
    zb = False
    for i in range(r + 1):  # drain: the second half of these backwards defers W into the tail bubble
        if i == (r + 1) // 2 and r % 2 == 1:
            zb = True
        b.B(1, zb=zb)
        if i == (r + 1) // 2 and r % 2 == 0:
            zb = True
        b.B(0, zb=zb)
    for _ in range(edge):
        b.W()
        b.B(0, zb=True)
    for _ in range(r + 1):
        b.W()
    assert not b.pending_w
    return b.ops


def program(kind: str, rank: int, num_ranks: int, num_chunks: int) -> list[Op]:
    """The ordered ops of pipeline rank ``rank`` (arguments checked by ``check_schedule_args``)."""
    check_schedule_args(kind, num_ranks, num_chunks)
    if kind == "1f1b":
        b = _Builder(lambda phase: 0)
        warmup = min(num_ranks - rank - 1, num_chunks)
        for _ in range(warmup):
            b.F(0)
        for _ in range(num_chunks - warmup):
            b.F(0)
            b.B(0)
        for _ in range(warmup):
            b.B(0)
        return b.ops
    if kind == "dualpipe":
        half = num_ranks // 2
        second = rank >= half  # in the second half, "my end's direction" is direction 1
        b = _Builder(lambda phase: phase ^ int(second))
        hr = min(rank, num_ranks - 1 - rank)
        return _dual_program(b, half, hr, num_chunks // 2, turn=hr == half - 1)
    b = _Builder(lambda phase: phase)
    return _dual_program(b, num_ranks, rank, num_chunks, turn=rank == num_ranks - 1)


# ---------------------------------------------------------------------------------------------
# Simulation


class Message(NamedTuple):
    """A p2p message: ``kind`` "F" (activations) or "B" (gradients) of micro-batch ``mb`` sent by ``src``."""

    kind: str
    src: Stage
    dst: Stage
    mb: int


class SimResult(NamedTuple):
    """``times[rank][i]``: (start, end) of op i of ``programs[rank]``; ``sends``: every cross-rank message
    with its send time, in the global order the p2p layer follows."""

    programs: list[list[Op]]
    times: list[list[tuple[float, float]]]
    sends: list[tuple[float, Message]]
    makespan: float


@dataclasses.dataclass(frozen=True)
class Durations:
    """Op durations for ``simulate``: forward, full backward, weight part of a backward, F&B pair."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None  # None: F + B (no overlap gain)

    def of(self, op: Op) -> float:
        if op.kind == "F":
            return self.F
        if op.kind == "B":
            return self.B - self.W if op.zb else self.B
        if op.kind == "W":
            return self.W
        return self.F + self.B if self.FB is None else self.FB


def _inputs_of(op: Op, rank: int, graph) -> list[tuple[str, Stage, int]]:
    """Data an op waits for: ("F", producer stage, mb) activations or ("B", producer stage, mb) grads."""
    need = []
    if op.kind in ("F", "FB"):
        prev = graph[(rank, op.module)].prev
        if prev is not None:
            need.append(("F", prev, op.mb))
    if op.kind in ("B", "FB"):
        m, mb = (op.module_b, op.mb_b) if op.kind == "FB" else (op.module, op.mb)
        nxt = graph[(rank, m)].next
        if nxt is not None:
            need.append(("B", nxt, mb))
        need.append(("done", (rank, m), mb))  # its own forward ran (program order, checked)
    return need


def _outputs_of(op: Op, rank: int, graph) -> list[Message]:
    out = []
    if op.kind in ("F", "FB"):
        nxt = graph[(rank, op.module)].next
        if nxt is not None:
            out.append(Message("F", (rank, op.module), nxt, op.mb))
    if op.kind in ("B", "FB"):
        m, mb = (op.module_b, op.mb_b) if op.kind == "FB" else (op.module, op.mb)
        prev = graph[(rank, m)].prev
        if prev is not None:
            out.append(Message("B", (rank, m), prev, mb))
    return out


def simulate(kind: str, num_ranks: int, num_chunks: int, durations: Durations | None = None,
             latency: float = 0.0) -> SimResult:
    """Run every rank's program as soon as its data is there; raise ``RuntimeError`` on a deadlock.

    ``latency`` is added to every cross-rank message. Returns op times, the cross-rank messages in
    send order (ties broken by source rank, then program position) and the makespan.
    """
    durations = durations or Durations()
    graph = stage_graph(kind, num_ranks)
    programs = [program(kind, r, num_ranks, num_chunks) for r in range(num_ranks)]
    ready: dict[tuple[str, Stage, int], float] = {}  # data key -> time it is available at its consumer
    times: list[list[tuple[float, float]]] = [[] for _ in range(num_ranks)]
    free = [0.0] * num_ranks
    pos = [0] * num_ranks
    sends: list[tuple[float, int, int, int, Message]] = []
    progress = True
    while progress:
        progress = False
        for r in range(num_ranks):
            while pos[r] < len(programs[r]):
                op = programs[r][pos[r]]
                need = _inputs_of(op, r, graph)
                if any(k not in ready for k in need):
                    break
                start = max([free[r]] + [ready[k] for k in need])
                end = start + durations.of(op)
                times[r].append((start, end))
                if op.kind in ("F", "FB"):
                    ready[("done", (r, op.module), op.mb)] = end
                for j, msg in enumerate(_outputs_of(op, r, graph)):
                    remote = msg.dst[0] != r
                    ready[(msg.kind, msg.src, msg.mb)] = end + (latency if remote else 0.0)
                    if remote:
                        heapq.heappush(sends, (end, r, pos[r], j, msg))
                free[r] = end
                pos[r] += 1
                progress = True
    stuck = [r for r in range(num_ranks) if pos[r] < len(programs[r])]
    if stuck:
        raise RuntimeError(f"{kind} schedule deadlocks: ranks {stuck} wait at ops "
                           f"{[programs[r][pos[r]] for r in stuck]}")
    ordered = [(t, msg) for t, _, _, _, msg in (heapq.heappop(sends) for _ in range(len(sends)))]
    return SimResult(programs, times, ordered, max(free))


def sim_records(sim: SimResult) -> list:
    """The simulated run as ``PhaseRecord``s (times in the units of the ``Durations``), for ``plot_timeline``."""
    from .timeline import PhaseRecord

    return [PhaseRecord(r, op.kind, op.module, op.mb, s, e, microbatch_b=op.mb_b, chunk_b=op.module_b)
            for r, (prog, times) in enumerate(zip(sim.programs, sim.times)) for op, (s, e) in zip(prog, times)]
