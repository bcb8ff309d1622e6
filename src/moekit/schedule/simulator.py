"""Discrete-event simulation of one step of a pipeline schedule over all its ranks.

Each rank runs its program (``ops.programs``) in order. An op starts when the rank is free and its
inputs have arrived: a forward waits for the previous stage's forward of the same micro-batch, a
backward for the next stage's backward (the last stage's, for its own forward), plus ``p2p`` seconds
where the two stages sit on different ranks. How long an op takes is the cost model's answer
(``CostModel.op``): ``UniformCosts`` (every stage the same, no communication) or the planner's
per-stage costs (``moekit.plan.cost.StageCosts``, compute and EP communication on two streams).

One run proves a schedule free of deadlock (it raises otherwise), gives every cross-rank message in
the global order in which they leave their ranks (the runtime's p2p layer posts sends and receives in
that order, see ``moekit.pipeline.p2p``), and predicts the step: per-rank busy time and bubble, and
``PhaseRecord``s for the timeline plot. Pure Python, no torch: the planner's search runs it many
times, so the programs' dependencies are resolved once per (schedule, ranks, micro-batches).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import NamedTuple, Protocol

from .ops import Op, Stage, check_schedule
from .ops import placement as _placement
from .ops import programs as _programs
from .records import PhaseRecord


class OpTiming(NamedTuple):
    """One op's internal schedule, relative to its start: ``duration``; busy seconds of ``compute``
    and ``comm``; ``comm_hidden`` seconds of comm overlapping compute; ``comm_spans`` (start, end)."""

    duration: float
    compute: float
    comm: float
    comm_hidden: float
    comm_spans: tuple[tuple[float, float], ...] = ()


class CostModel(Protocol):
    """What the simulator asks of costs: the timing of an op ``kind`` on pipeline stage ``stage`` (the
    stage's index along its direction), ``split`` for a backward without its weight gradients, and
    ``stage_b`` the backward's stage of an ``FB`` pair (else None)."""

    def op(self, kind: str, stage: int, split: bool, stage_b: int | None) -> OpTiming: ...


class UniformCosts:
    """Every stage costs the same: forward ``f``, input-gradient backward ``b``, weight-gradient ``w``,
    an overlapped forward + full backward pair ``fb`` (default ``f + b + w``: no overlap gain). A full
    backward costs ``b + w``. No communication. The defaults are unit op times (F = W = 1, full B = 2)."""

    def __init__(self, f: float = 1.0, b: float = 1.0, w: float = 1.0, fb: float | None = None) -> None:
        fb = f + b + w if fb is None else fb
        for name, v in (("f", f), ("b", b), ("w", w), ("fb", fb)):
            if v < 0:
                raise ValueError(f"UniformCosts.{name} must be >= 0, got {v}")
        self.f, self.b, self.w, self.fb = f, b, w, fb

    @classmethod
    def from_full_backward(cls, F: float = 1.0, B: float = 2.0, W: float = 1.0,
                           FB: float | None = None) -> UniformCosts:
        """The same costs given the *full* backward ``B`` (of which ``W`` is the weight part), as DeepSeek's
        README counts it; ``FB`` None: ``F + B``. This is the signature of ``moekit.pipeline.Durations``."""
        return cls(F, B - W, W, F + B if FB is None else FB)

    def op(self, kind: str, stage: int, split: bool, stage_b: int | None) -> OpTiming:
        """The ``OpTiming`` of one op (see ``CostModel``): all compute."""
        t = {"F": self.f, "W": self.w, "FB": self.fb}.get(kind)
        if t is None:
            t = self.b if split else self.b + self.w
        return OpTiming(t, t, 0.0, 0.0)


class Message(NamedTuple):
    """A p2p message: ``kind`` "F" (activations) or "B" (gradients) of micro-batch ``mb`` sent by ``src``."""

    kind: str
    src: Stage
    dst: Stage
    mb: int


@dataclasses.dataclass(eq=False)
class Simulation:
    """One simulated step. Seconds (or the units of the costs).

    step_time: the makespan; bubble[r] = step_time - busy[r]; busy[r], compute_busy[r]: op and compute
    seconds of rank r; comm[r]: its comm seconds, comm_hidden[r] of those under compute; records:
    ``PhaseRecord``s (F/B/W/FB per op, COMM per transfer); programs[r]: the ops rank r ran;
    times[r][i]: (start, end) of ``programs[r][i]``; ``sends`` (worked out on first use): every
    cross-rank message with its send time, in the global order the p2p layer follows (ties broken by
    source rank, then program position). With ``simulate(records=False)``, records, times and sends
    are empty.
    """

    step_time: float
    bubble: list[float]
    busy: list[float]
    compute_busy: list[float]
    comm: list[float]
    comm_hidden: list[float]
    records: list[PhaseRecord]
    programs: tuple[tuple[Op, ...], ...]
    times: list[list[tuple[float, float]]]
    _compiled: tuple = dataclasses.field(default=(), repr=False)  # the programs as the simulator ran them

    @functools.cached_property
    def sends(self) -> list[tuple[float, Message]]:
        """``(send time, Message)`` of every cross-rank message, in the global send order."""
        # Built after the run rather than during it: the search never asks, and the tuples cost
        # the run's garbage collector more than the sorting does.
        order = []
        for r, (ops, times) in enumerate(zip(self._compiled, self.times)):
            for i, (c, (_, end)) in enumerate(zip(ops, times)):
                for j, msg in enumerate(c.sends):
                    order.append((end, r, i, j, msg))
        order.sort(key=lambda x: x[:4])
        return [(t, msg) for t, _, _, _, msg in order]

    # ``step_time`` under the name moekit.pipeline's simulator gave it.
    makespan = property(operator.attrgetter("step_time"), doc="``step_time``: the makespan of the step.")

    @property
    def hidden_fraction(self) -> float:
        """Share of all comm seconds that ran under compute (1.0 without comm)."""
        c = sum(self.comm)
        return sum(self.comm_hidden) / c if c > 0 else 1.0

    @property
    def compute_fraction(self) -> float:
        """Share of all ranks' step time spent computing."""
        return sum(self.compute_busy) / (self.step_time * len(self.busy)) if self.step_time > 0 else 0.0


class _Compiled(NamedTuple):
    """An op with its dependencies resolved. Data keys are (kind "F" or "B", direction, stage, micro-batch):
    the forward or backward of that micro-batch through that stage."""

    kind: str
    cost: tuple  # the CostModel.op arguments (kind, stage, split, stage_b)
    deps: tuple[tuple[tuple, bool], ...]  # (key, from another rank) of the data it waits for
    outs: tuple[tuple, ...]  # keys of what it completes
    sends: tuple[Message, ...]  # what it sends to other ranks, in order
    record: tuple  # (chunk, mb, mb_b, chunk_b) of its PhaseRecord


def _compile(schedule: str, num_ranks: int, progs) -> tuple[tuple[_Compiled, ...], ...]:
    placement = _placement(schedule, num_ranks)
    out = []
    for r, prog in enumerate(progs):
        ops = []
        for op in prog:
            deps, outs, sends = [], [], []
            if op.kind in ("F", "FB"):  # waits for the previous stage's forward, feeds the next stage
                d, s = placement.stage_of[(r, op.chunk)]
                outs.append(("F", d, s, op.mb))
                prev, nxt = placement.rank_of.get((d, s - 1)), placement.rank_of.get((d, s + 1))
                if prev is not None:
                    deps.append((("F", d, s - 1, op.mb), prev[0] != r))  # DualPipeV's turn stays on the rank
                if nxt is not None and nxt[0] != r:
                    sends.append(Message("F", (r, op.chunk), nxt, op.mb))
            if op.kind in ("B", "FB"):  # waits for the next stage's backward (the last: its own forward)
                cb, mb = (op.chunk, op.mb) if op.kind == "B" else (op.chunk_b, op.mb_b)
                d, s = placement.stage_of[(r, cb)]
                outs.append(("B", d, s, mb))
                prev, nxt = placement.rank_of.get((d, s - 1)), placement.rank_of.get((d, s + 1))
                deps.append((("B", d, s + 1, mb), nxt[0] != r) if nxt is not None else (("F", d, s, mb), False))
                if prev is not None and prev[0] != r:
                    sends.append(Message("B", (r, cb), prev, mb))
            stage = placement.stage_of[(r, op.chunk)][1]
            if op.kind == "FB":
                cost = ("FB", stage, False, placement.stage_of[(r, op.chunk_b)][1])
            else:
                cost = (op.kind, stage, op.split if op.kind == "B" else False, None)
            ops.append(_Compiled(op.kind, cost, tuple(deps), tuple(outs), tuple(sends),
                                 (op.chunk, op.mb, op.mb_b, op.chunk_b)))
        out.append(tuple(ops))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _compiled(schedule: str, num_ranks: int, num_microbatches: int) -> tuple[tuple[_Compiled, ...], ...]:
    return _compile(schedule, num_ranks, _programs(schedule, num_ranks, num_microbatches))


def simulate(schedule: str, num_ranks: int, num_microbatches: int, costs: CostModel | None = None, *,
             p2p: float = 0.0, records: bool = True, comm_records: bool = True,
             give_up_after: float | None = None, programs: list | None = None,
             latency: float | None = None) -> Simulation | None:
    """Simulate one step of ``schedule`` on ``num_ranks`` pipeline ranks.

    Args:
        schedule, num_ranks, num_microbatches: as ``ops.check_schedule`` takes them (micro-batches of one
            pipeline, both directions together for DualPipe); ``ValueError`` when they cannot run.
        costs: the ``CostModel`` (default ``UniformCosts()``: unit op times).
        p2p: seconds from a stage's output to the next stage's input when they sit on different ranks
            (``latency``: the same, under the name ``moekit.pipeline``'s simulator gave it).
        records: False leaves ``records``, ``times`` and ``sends`` of the result empty (faster: the
            planner's search); ``comm_records``: False keeps the op records but not the COMM ones.
        give_up_after: return None as soon as some rank is busy past this time (the step can only be
            longer; the search uses it to drop a layout that cannot beat the ones it has).
        programs: per-rank op lists to run instead of ``ops.programs(...)`` (a custom order over the
            schedule's stages; each ``W`` names the split backward it completes).

    Returns:
        The ``Simulation``, or None when ``give_up_after`` was passed.

    Raises ``RuntimeError`` when the programs deadlock (some rank waits for data that never comes).
    """
    if latency is not None:
        p2p = latency
    if p2p < 0:
        raise ValueError(f"p2p must be >= 0, got {p2p}")
    check_schedule(schedule, num_ranks, num_microbatches)
    costs = UniformCosts() if costs is None else costs
    if programs is None:
        progs = _programs(schedule, num_ranks, num_microbatches)
        prog = _compiled(schedule, num_ranks, num_microbatches)
    else:
        progs = tuple(tuple(p) for p in programs)
        prog = _compile(schedule, num_ranks, progs)
    end_of: dict[tuple, float] = {}  # data key -> when it was computed
    ptr = [0] * num_ranks
    t_free = [0.0] * num_ranks
    busy, comp, comm, hidden = ([0.0] * num_ranks for _ in range(4))
    out: list[PhaseRecord] = []
    times: list[list[tuple[float, float]]] = [[] for _ in range(num_ranks)]
    timings: dict = {}
    remaining = sum(len(o) for o in prog)
    while remaining:
        progress = False
        for r in range(num_ranks):
            order = prog[r]
            while ptr[r] < len(order):
                c = order[ptr[r]]
                start = t_free[r]
                waiting = False
                for key, hop in c.deps:
                    t = end_of.get(key)
                    if t is None:
                        waiting = True
                        break
                    if hop:
                        t += p2p
                    if t > start:
                        start = t
                if waiting:
                    break
                timing = timings.get(c.cost)
                if timing is None:
                    timing = timings[c.cost] = costs.op(*c.cost)
                end = start + timing.duration
                for key in c.outs:
                    end_of[key] = end
                if records:
                    chunk, mb, mb_b, chunk_b = c.record
                    out.append(PhaseRecord(r, c.kind, chunk, mb, start, end, mb_b, chunk_b))
                    if comm_records and timing.comm_spans:
                        out.extend(PhaseRecord(r, "COMM", chunk, mb, start + a, start + b)
                                   for a, b in timing.comm_spans)
                    times[r].append((start, end))
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
        if not progress:
            waiting_at = {r: progs[r][ptr[r]] for r in range(num_ranks) if ptr[r] < len(prog[r])}
            raise RuntimeError(f"{schedule} schedule deadlocks: rank: the op it waits at: {waiting_at}")
    step = max(t_free)
    return Simulation(step, [step - b for b in busy], busy, comp, comm, hidden, out, progs, times, prog)


def sim_records(sim: Simulation) -> list[PhaseRecord]:
    """The op records of a simulated step (its ``records`` without the COMM ones), rank by rank, each
    rank's in program order; for ``plot_timeline``."""
    return sorted((rec for rec in sim.records if rec.phase != "COMM"), key=lambda rec: rec.rank)
