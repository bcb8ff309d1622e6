"""Pipeline schedules as data: where stages live, and the ordered ops each pipeline rank runs.

A *stage* is ``(rank, chunk)``: local model chunk ``chunk`` of pipeline rank ``rank`` (the runtime's
local module index). Micro-batches flow along a *direction*, a chain of stages. An ``Op`` is one of

- ``F``  forward of one micro-batch through one local chunk,
- ``B``  backward of one micro-batch (``split=True``: input gradients only, its weight gradients are
  deferred to a later ``W``; the runtime queues them in ``WeightGradStore``),
- ``W``  the deferred weight gradients of the oldest split backward,
- ``FB`` a forward and a full backward run as one overlapped pair.

Four schedules, all built here and shared by the runtime (``moekit.pipeline``, which runs 1F1B,
DualPipe and DualPipeV) and the planner (``moekit.plan``, which also simulates interleaved 1F1B):

- ``1f1b``: P ranks, stage r on rank r; warm-up ``P-1-r`` forwards, steady F/B pairs, cool-down.
  Backwards are full.
- ``interleaved``: interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training
  on GPU Clusters Using Megatron-LM", SC'21, sec. 2.2): rank r holds ``V = INTERLEAVE`` chunks, stages
  ``r, r+P, ..``; micro-batches go through in groups of P, warm-up ``2(P-1-r) + (V-1)P`` forwards, then
  1F1B. Needs ``N % P == 0``.
- ``dualpipe``: P ranks (P even), two directions of N/2 micro-batches each: direction 0 runs chunk 0
  of ranks 0..P-1, direction 1 chunk 1 of ranks P-1..0 (rank r holds stages r and P-1-r of the model).
- ``dualpipev``: P ranks, 2P stages in a V: down chunk 0 of ranks 0..P-1, then back up chunk 1 of
  ranks P-1..0 (rank r holds stages r and 2P-1-r; the turn at rank P-1 stays on the rank).

Nothing here imports torch: the planner runs it on machines without one.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

SCHEDULES = ("1f1b", "interleaved", "dualpipe", "dualpipev")
INTERLEAVE = 2  # model chunks per rank of the interleaved 1F1B schedule (Megatron-LM's virtual pipeline)

Stage = tuple[int, int]  # (pipeline rank, local chunk)


class Op(NamedTuple):
    """One entry of a rank's program.

    ``kind`` "F" / "B" / "W" / "FB"; ``chunk`` and ``mb``: the local chunk and micro-batch (for ``FB``
    the forward's; for ``W`` the split backward whose weight gradients it runs); ``split``: a ``B`` that
    leaves its weight gradients to a ``W``; ``chunk_b`` / ``mb_b``: the backward of an ``FB`` (a full one).
    """

    kind: str
    chunk: int
    mb: int
    split: bool = False
    chunk_b: int | None = None
    mb_b: int | None = None


class StageLinks(NamedTuple):
    """Where a stage's activations come from and go to (``None``: first / last stage of its direction)."""

    direction: int
    prev: Stage | None
    next: Stage | None


class Placement(NamedTuple):
    """Where stages live: ``stage_of[(rank, chunk)] = (direction, stage)``, ``rank_of`` the inverse;
    ``num_stages`` per direction."""

    schedule: str
    num_ranks: int
    num_stages: int
    num_directions: int
    stage_of: dict[Stage, tuple[int, int]]
    rank_of: dict[tuple[int, int], Stage]

    def links(self, rank: int, chunk: int) -> StageLinks:
        """The neighbours of stage ``(rank, chunk)`` along its direction."""
        d, s = self.stage_of[(rank, chunk)]
        return StageLinks(d, self.rank_of.get((d, s - 1)), self.rank_of.get((d, s + 1)))


def _unknown(schedule) -> ValueError:
    return ValueError(f"schedule kind must be one of {SCHEDULES}, got {schedule!r}")


@lru_cache(maxsize=256)
def placement(schedule: str, num_ranks: int) -> Placement:
    """The stage placement of ``schedule`` on ``num_ranks`` pipeline ranks (cached: do not modify it).

    Raises ``ValueError`` for an unknown schedule; the rank count is checked by ``check_schedule``.
    """
    ranks = range(num_ranks)
    if schedule == "1f1b":
        chains = [[(r, 0) for r in ranks]]
    elif schedule == "interleaved":  # chunk c of rank r is stage c * P + r
        chains = [[(r, c) for c in range(INTERLEAVE) for r in ranks]]
    elif schedule == "dualpipe":
        chains = [[(r, 0) for r in ranks], [(r, 1) for r in reversed(ranks)]]
    elif schedule == "dualpipev":
        chains = [[(r, 0) for r in ranks] + [(r, 1) for r in reversed(ranks)]]
    else:
        raise _unknown(schedule)
    stage_of = {st: (d, i) for d, chain in enumerate(chains) for i, st in enumerate(chain)}
    rank_of = {v: k for k, v in stage_of.items()}
    return Placement(schedule, num_ranks, len(chains[0]), len(chains), stage_of, rank_of)


def stage_graph(schedule: str, num_ranks: int) -> dict[Stage, StageLinks]:
    """Every stage of ``placement(schedule, num_ranks)`` with its neighbours: ``{(rank, chunk): StageLinks}``."""
    links = placement(schedule, num_ranks).links
    return {st: links(*st) for st in placement(schedule, num_ranks).stage_of}


def microbatches_per_direction(schedule: str, num_microbatches: int) -> int:
    """Micro-batches that enter each direction (DualPipe feeds half at each end)."""
    return num_microbatches // 2 if schedule == "dualpipe" else num_microbatches


def check_schedule(schedule: str, num_ranks: int, num_microbatches: int, *, ranks_arg: str = "pp",
                   microbatches_arg: str = "num_microbatches") -> None:
    """Raise ``ValueError`` unless ``schedule`` can run ``num_microbatches`` micro-batches (both directions
    together) on ``num_ranks`` pipeline ranks.

    ``ranks_arg`` / ``microbatches_arg``: the caller's names of the two counts, for the message (by
    default the planner's ``pp`` and ``num_microbatches``; the runtime's are ``num_ranks``, ``num_chunks``).
    """
    rn, mn = ranks_arg, microbatches_arg
    if schedule not in SCHEDULES:
        raise _unknown(schedule)
    for name, v in ((rn, num_ranks), (mn, num_microbatches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be >= 1 (a positive int), got {v!r}")
    if schedule == "dualpipe":
        if num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of ranks (even {rn}: rank r pairs with rank R-1-r), "
                             f"got {num_ranks}; use dualpipev (DualPipeV) for an odd count")
        if num_microbatches % 2 or num_microbatches < 2 * num_ranks:
            raise ValueError(f"DualPipe needs an even {mn} >= 2 * {rn} = {2 * num_ranks} (half enter at each "
                             f"end), got {mn}={num_microbatches}")
    elif schedule == "dualpipev":
        if num_microbatches < 2 * num_ranks:
            raise ValueError(f"DualPipeV needs {mn} >= 2 * {rn} = {2 * num_ranks}, got {mn}={num_microbatches}")
    elif schedule == "interleaved" and num_microbatches % num_ranks:
        raise ValueError(f"interleaved 1F1B needs {mn} to be a multiple of {rn} ({num_ranks}), "
                         f"got {num_microbatches}")


class _Builder:
    """Turns phase-level verbs into ``Op``s with micro-batch numbers and a FIFO of deferred W chunks."""

    def __init__(self, chunk_of_phase, num_chunks: int = 2):
        self.chunk_of_phase = chunk_of_phase
        self.f = [0] * num_chunks
        self.b = [0] * num_chunks
        self.pending_w: list[tuple[int, int]] = []
        self.ops: list[Op] = []

    def _next(self, count: list[int], phase: int) -> tuple[int, int]:
        c = self.chunk_of_phase(phase)
        count[c] += 1
        return c, count[c] - 1

    def F(self, phase: int) -> None:
        self.ops.append(Op("F", *self._next(self.f, phase)))

    def B(self, phase: int, split: bool = False) -> None:
        c, mb = self._next(self.b, phase)
        if split:
            self.pending_w.append((c, mb))
        self.ops.append(Op("B", c, mb, split))

    def W(self) -> None:
        assert self.pending_w, "schedule pops a W chunk that no split backward queued"
        self.ops.append(Op("W", *self.pending_w.pop(0)))

    def FB(self, phase_f: int, phase_b: int) -> None:
        cf, mf = self._next(self.f, phase_f)
        cb, mb = self._next(self.b, phase_b)
        self.ops.append(Op("FB", cf, mf, False, cb, mb))


def _dual_program(b: _Builder, n: int, r: int, c: int, turn: bool) -> list[Op]:
    """The bidirectional schedule of one rank, in *phases*: phase 0 is the direction fed at my end of the
    pipe, phase 1 the other one.

    ``n`` ranks per direction, my position ``r`` from my end, ``c`` micro-batches per direction;
    ``turn``: I sit where the two directions meet (its first F&B pair is not overlapped, which shortens
    the bubble). DualPipe runs it with (R/2, min(r, R-1-r), chunks/2), DualPipeV with (R, r, chunks).

    The eight steps and their lengths are those of DeepSeek's implementation (deepseek-ai/DualPipe,
    dualpipe/dualpipe.py, DualPipe.step), named there by their ops per round: ``n`` rounds of each.
    """
    edge = n - r - 1  # ranks between me and the far end of my half
    # nF0: warm-up, forwards of my own direction only, two per rank between me and the middle, while
    # the other direction's first micro-batch travels towards me.
    for _ in range(2 * edge):
        b.F(0)
    # nF0F1: both directions have arrived; forwards alternate, one of each per round.
    for _ in range(r + 1):
        b.F(0)
        b.F(1)
    # nB1W1F1: the first backwards, of phase 1 (its loss is at my end, so they reach me first), are
    # split, and their weight gradients run right after, in the wait for that direction's next forward.
    for _ in range(edge):
        b.B(1, split=True)
        b.W()
        b.F(1)
    # nF0B1F1B0, the main step: every op is an F&B pair, one per direction per round. At the turn, the
    # first pair runs as F then B, not overlapped (DeepSeek's choice, for a smaller bubble).
    for i in range(c - 2 * n + r + 1):
        if i == 0 and turn:
            b.F(0)
            b.B(1)
        else:
            b.FB(0, 1)
        b.FB(1, 0)
    # nB1F1B0: the forwards of my own direction are done; the other direction still pairs.
    for _ in range(edge):
        b.B(1)
        b.FB(1, 0)
    # nB1B0: backwards only; from the middle round on they are split, to leave their W for the tail
    # bubble. In the middle round itself the phase-1 backward is split only for an odd r (DeepSeek's
    # code switches before it for an odd r, between the two for an even one).
    mid = (r + 1) // 2
    for i in range(r + 1):
        b.B(1, split=i > mid or (i == mid and r % 2 == 1))
        b.B(0, split=i >= mid)
    # nWB0: the last backwards of my own direction come back one by one from the far end; a queued W
    # fills each wait.
    for _ in range(edge):
        b.W()
        b.B(0, split=True)
    # nW: drain the weight gradients still queued.
    for _ in range(r + 1):
        b.W()
    assert not b.pending_w
    return b.ops


def _interleaved_program(r: int, p: int, n: int) -> list[Op]:
    """Megatron-LM's interleaved 1F1B order for rank ``r`` (chunks in groups of ``p`` micro-batches)."""
    v = INTERLEAVE
    total = n * v
    fwd = [(k // p) % v for k in range(total)]  # chunk of the k-th forward
    bwd = [v - 1 - (k // p) % v for k in range(total)]  # chunk of the k-th backward
    warm = min(total, 2 * (p - 1 - r) + (v - 1) * p)
    b = _Builder(lambda chunk: chunk, v)
    for c in fwd[:warm]:
        b.F(c)
    for k in range(total - warm):
        b.F(fwd[warm + k])
        b.B(bwd[k])
    for c in bwd[total - warm:]:
        b.B(c)
    return b.ops


def program(schedule: str, rank: int, num_ranks: int, num_microbatches: int) -> list[Op]:
    """The ordered ops of pipeline rank ``rank`` (a new list; ``programs`` is the cached form).

    ``num_microbatches`` counts all micro-batches of one step (both directions together for DualPipe).
    Raises ``ValueError`` as ``check_schedule`` does.
    """
    check_schedule(schedule, num_ranks, num_microbatches)
    if schedule == "1f1b":
        b = _Builder(lambda phase: 0, 1)
        warmup = min(num_ranks - rank - 1, num_microbatches)
        for _ in range(warmup):
            b.F(0)
        for _ in range(num_microbatches - warmup):
            b.F(0)
            b.B(0)
        for _ in range(warmup):
            b.B(0)
        return b.ops
    if schedule == "interleaved":
        return _interleaved_program(rank, num_ranks, num_microbatches)
    if schedule == "dualpipe":
        half = num_ranks // 2
        second = rank >= half  # in the second half, "my end's direction" (phase 0) is direction 1
        b = _Builder(lambda phase: phase ^ int(second))
        hr = min(rank, num_ranks - 1 - rank)
        return _dual_program(b, half, hr, num_microbatches // 2, turn=hr == half - 1)
    b = _Builder(lambda phase: phase)
    return _dual_program(b, num_ranks, rank, num_microbatches, turn=rank == num_ranks - 1)


@lru_cache(maxsize=64)
def programs(schedule: str, num_ranks: int, num_microbatches: int) -> tuple[tuple[Op, ...], ...]:
    """Every rank's ``program``, cached (the planner's search asks for the same ones many times)."""
    return tuple(tuple(program(schedule, r, num_ranks, num_microbatches)) for r in range(num_ranks))
