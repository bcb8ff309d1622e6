"""Discrete-event simulation of one training step over the pipeline ranks.

Each pipeline rank runs its schedule's op order (``schedules.rank_orders``). An op starts when the
rank is free and its inputs have arrived: a forward waits for the previous stage's forward of the
same micro-batch (+ the point-to-point time), a backward for the next stage's backward. Inside an
op, each layer is a chain of pieces on two streams — compute and communication — and an ``FB``
op interleaves the forward chain of one micro-batch with the backward chain of another, greedily,
so one's communication runs under the other's compute (DualPipe's overlap). Every DP/EP replica of a
stage is assumed identical (expected loads), so simulating the ``pp`` ranks of one pipeline stands for
the whole cluster.

The result carries ``moekit.pipeline.timeline.PhaseRecord``s (F/B/W/FB per op, COMM per transfer), so
the pipeline's timeline plot draws it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple, Protocol

from ..pipeline.timeline import PhaseRecord
from .cost import LayerTimes, Piece
from .schedules import check_schedule, layout, rank_orders


class OpTiming(NamedTuple):
    """One op's internal schedule, relative to its start: ``duration``; busy seconds of ``compute``
    and ``comm``; ``comm_hidden`` seconds of comm overlapping compute; ``comm_spans`` (start, end)."""

    duration: float
    compute: float
    comm: float
    comm_hidden: float
    comm_spans: tuple[tuple[float, float], ...] = ()


class CostModel(Protocol):
    def op(self, kind: str, stage: int, split: bool, stage_b: int | None) -> OpTiming: ...


class UniformCosts:
    """Every stage costs the same: forward ``f``, input-gradient backward ``b``, weight-gradient ``w``,
    an overlapped forward + full backward pair ``fb``. A full backward costs ``b + w``. No comm."""

    def __init__(self, f: float, b: float, w: float, fb: float) -> None:
        for name, v in (("f", f), ("b", b), ("w", w), ("fb", fb)):
            if v < 0:
                raise ValueError(f"UniformCosts.{name} must be >= 0, got {v}")
        self.f, self.b, self.w, self.fb = f, b, w, fb

    def op(self, kind: str, stage: int, split: bool, stage_b: int | None) -> OpTiming:
        t = {"F": self.f, "W": self.w, "FB": self.fb}.get(kind)
        if t is None:
            t = self.b if split else self.b + self.w
        return OpTiming(t, t, 0.0, 0.0)


def two_stream(chains: Sequence[Sequence[Piece]]) -> OpTiming:
    """Greedy list schedule of independent chains on one compute and one comm stream.

    Each chain's pieces run in order; at every step the piece that can start first runs (ties: the
    earlier chain). Returns the makespan and the busy / overlapped seconds."""
    ready = [0.0] * len(chains)
    idx = [0] * len(chains)
    free = [0.0, 0.0]
    spans: list[list[tuple[float, float]]] = [[], []]
    while True:
        best, best_t = -1, 0.0
        for c, chain in enumerate(chains):
            if idx[c] < len(chain):
                t = max(ready[c], free[chain[idx[c]].stream])
                if best < 0 or t < best_t:
                    best, best_t = c, t
        if best < 0:
            break
        p = chains[best][idx[best]]
        end = best_t + p.seconds
        if p.seconds > 0:
            spans[p.stream].append((best_t, end))
        free[p.stream] = ready[best] = end
        idx[best] += 1
    dur = max(ready) if ready else 0.0
    comp = sum(e - s for s, e in spans[0])
    comm = sum(e - s for s, e in spans[1])
    return OpTiming(dur, comp, comm, _overlap(spans[1], spans[0]), tuple(spans[1]))


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted lists of disjoint intervals."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            tot += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


class StageCosts:
    """Costs from per-stage lists of ``LayerTimes`` (forward order). Cached per op signature."""

    def __init__(self, stages: Sequence[Sequence[LayerTimes]]) -> None:
        self.stages = [tuple(s) for s in stages]
        self.op = lru_cache(maxsize=None)(self._op)  # type: ignore[method-assign]

    def _op(self, kind: str, stage: int, split: bool, stage_b: int | None) -> OpTiming:
        return _stage_op(kind, self.stages[stage], split, self.stages[stage_b] if stage_b is not None else None)


@lru_cache(maxsize=65536)
def _stage_op(kind: str, stage: tuple[LayerTimes, ...], split: bool,
              stage_b: tuple[LayerTimes, ...] | None) -> OpTiming:
    """One op's timing from the layers of its stage(s); shared by every plan whose stages hold the same
    layers (the search builds many)."""
    def fwd(st: tuple[LayerTimes, ...]) -> list[Piece]:
        return [p for lt in st for p in lt.forward()]

    def bwd(st: tuple[LayerTimes, ...], with_w: bool) -> list[Piece]:
        return [p for lt in reversed(st) for p in lt.backward(with_w)]

    if kind == "F":
        return two_stream([fwd(stage)])
    if kind == "B":
        return two_stream([bwd(stage, not split)])
    if kind == "W":
        t = sum(lt.weight() for lt in stage)
        return OpTiming(t, t, 0.0, 0.0)
    assert kind == "FB"
    return two_stream([fwd(stage), bwd(stage_b, True)])


class SimResult(NamedTuple):
    """step_time: makespan (s); bubble[r] = step_time - busy time of rank r; busy[r]; compute_busy[r];
    comm[r] total comm seconds; comm_hidden[r] of those under compute; records: PhaseRecords."""

    step_time: float
    bubble: list[float]
    busy: list[float]
    compute_busy: list[float]
    comm: list[float]
    comm_hidden: list[float]
    records: list[PhaseRecord]

    @property
    def hidden_fraction(self) -> float:
        c = sum(self.comm)
        return sum(self.comm_hidden) / c if c > 0 else 1.0

    @property
    def compute_fraction(self) -> float:
        return sum(self.compute_busy) / (self.step_time * len(self.busy)) if self.step_time > 0 else 0.0


@lru_cache(maxsize=64)
def _compiled(schedule: str, num_ranks: int, num_microbatches: int) -> tuple:
    """Per rank, each op with its dependencies resolved once: (kind, chunk, split, chunk_b, f_stage,
    f_dep, f_hop, b_stage, b_dep, b_dep_is_forward, b_hop); stages as (direction, stage)."""
    lay = layout(schedule, num_ranks)
    last = lay.num_stages - 1
    out = []
    for r, order in enumerate(rank_orders(schedule, num_ranks, num_microbatches)):
        ops = []
        for op in order:
            fs = fdep = bs = bdep = None
            fhop = bhop = bdep_f = False
            if op.kind in ("F", "FB"):
                fs = lay.stage_of[(r, op.chunk)]
                if fs[1] > 0:
                    fdep = (fs[0], fs[1] - 1)
                    fhop = lay.rank_of[fdep][0] != r  # DualPipeV's turn stays on the device
            if op.kind in ("B", "FB"):
                bs = lay.stage_of[(r, op.chunk if op.kind == "B" else op.chunk_b)]
                if bs[1] == last:
                    bdep, bdep_f = bs, True
                else:
                    bdep = (bs[0], bs[1] + 1)
                    bhop = lay.rank_of[bdep][0] != r
            ops.append((op.kind, op.chunk, op.split, op.chunk_b, fs, fdep, fhop, bs, bdep, bdep_f, bhop))
        out.append(tuple(ops))
    return tuple(out)


def simulate(schedule: str, num_ranks: int, num_microbatches: int, costs: CostModel, *,
             p2p: float = 0.0, comm_records: bool = True, give_up_after: float | None = None,
             records: bool = True) -> SimResult | None:
    """Simulate one step of ``schedule`` on ``num_ranks`` pipeline ranks.

    ``num_microbatches``: micro-batches of one pipeline (both directions together for DualPipe).
    ``costs.op(kind, stage, split, stage_b)``: timing of one op (``UniformCosts`` or ``StageCosts``).
    ``p2p``: seconds from a stage's output to the next stage's input. Pure Python, no torch;
    raises ``ValueError`` for impossible schedules (see ``schedules.check_schedule``).
    ``give_up_after``: return None as soon as some rank is busy past this time (the step can only be
    longer; the search uses it to drop a layout that cannot beat the ones it has). ``records``: False
    leaves ``SimResult.records`` empty (faster)."""
    if p2p < 0:
        raise ValueError(f"p2p must be >= 0, got {p2p}")
    check_schedule(schedule, num_ranks, num_microbatches)
    prog = _compiled(schedule, num_ranks, num_microbatches)
    lay = layout(schedule, num_ranks)
    f_end: dict[tuple[int, int, int], float] = {}
    b_end: dict[tuple[int, int, int], float] = {}
    ptr = [0] * num_ranks
    t_free = [0.0] * num_ranks
    chunks = 1 + max(c for _, c in lay.stage_of)
    n_f = [[0] * chunks for _ in range(num_ranks)]
    n_b = [[0] * chunks for _ in range(num_ranks)]
    wq: list[deque] = [deque() for _ in range(num_ranks)]
    busy, comp, comm, hidden = ([0.0] * num_ranks for _ in range(4))
    out: list[PhaseRecord] = []
    timings: dict = {}

    def timing_of(kind: str, s: int, split: bool, sb: int | None) -> OpTiming:
        key = (kind, s, split, sb)
        t = timings.get(key)
        if t is None:
            t = timings[key] = costs.op(kind, s, split, sb)
        return t

    remaining = sum(len(o) for o in prog)
    while remaining:
        progress = False
        for r in range(num_ranks):
            order = prog[r]
            nf, nb = n_f[r], n_b[r]
            while ptr[r] < len(order):
                kind, chunk, split, chunk_b, fs, fdep, fhop, bs, bdep, bdep_f, bhop = order[ptr[r]]
                start = t_free[r]
                mf = mb = None
                if fs is not None:
                    mf = nf[chunk]
                    if fdep is not None:
                        t = f_end.get((fdep[0], fdep[1], mf))
                        if t is None:
                            break
                        t += p2p if fhop else 0.0
                        if t > start:
                            start = t
                if bs is not None:
                    cb = chunk if kind == "B" else chunk_b
                    mb = nb[cb]
                    t = (f_end if bdep_f else b_end).get((bdep[0], bdep[1], mb))
                    if t is None:
                        break
                    t += p2p if bhop else 0.0
                    if t > start:
                        start = t
                if kind == "W":
                    wc, wstage, wm = wq[r].popleft()
                    timing = timing_of("W", wstage, False, None)
                    rec_c, rec_m = wc, wm
                elif kind == "F":
                    timing = timing_of("F", fs[1], False, None)
                    rec_c, rec_m = chunk, mf
                elif kind == "B":
                    timing = timing_of("B", bs[1], split, None)
                    if split:
                        wq[r].append((chunk, bs[1], mb))
                    rec_c, rec_m = chunk, mb
                else:
                    timing = timing_of("FB", fs[1], False, bs[1])
                    rec_c, rec_m = chunk, mf
                end = start + timing.duration
                if mf is not None:
                    f_end[(fs[0], fs[1], mf)] = end
                    nf[chunk] += 1
                if mb is not None:
                    b_end[(bs[0], bs[1], mb)] = end
                    nb[cb] += 1
                if records:
                    if kind == "FB":
                        out.append(PhaseRecord(r, "FB", chunk, mf, start, end, mb, chunk_b))
                    else:
                        out.append(PhaseRecord(r, kind, rec_c, rec_m, start, end))
                    if comm_records:
                        out.extend(PhaseRecord(r, "COMM", rec_c, rec_m, start + a, start + b)
                                   for a, b in timing.comm_spans)
                busy[r] += timing.duration
                comp[r] += timing.compute
                comm[r] += timing.comm
                hidden[r] += timing.comm_hidden
                t_free[r] = end
                if give_up_after is not None and end > give_up_after:
                    return None
                ptr[r] += 1
                remaining -= 1
                progress = True
        assert progress, f"schedule {schedule} deadlocked at ops {ptr}"
    assert all(not q for q in wq), "weight-gradient queue not drained"
    step = max(t_free)
    return SimResult(step, [step - b for b in busy], busy, comp, comm, hidden, out)
