"""Pipeline schedules as per-rank orders of phases, for the planner's simulator.

Here a schedule is only *data* — for each pipeline rank the ordered list of ``Op``s it runs (taken from
``moekit.pipeline.schedules.program``, the programs the runtime executes), and where each (rank, local
chunk) sits in the model — so the simulator can time it. Three schedules:

- ``1f1b``: P ranks, stage r on rank r; warm-up ``P-1-r`` forwards, steady F/B pairs, cool-down.
  Backwards are full (input + weight gradients in one op).
- ``interleaved``: interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training
  on GPU Clusters Using Megatron-LM", SC'21, sec. 2.2): rank r holds ``V = INTERLEAVE`` chunks, stages
  ``r, r+P, ..``; micro-batches go through in groups of P, warm-up ``2(P-1-r) + (V-1)P`` forwards, then
  1F1B. Needs ``N % P == 0``. Bubble ``(P-1)(F+B)/V`` with per-stage F and B of the V-times smaller chunk.
  Its op order is built here (``moekit.pipeline`` has no interleaved runtime).
- ``dualpipe``: P ranks (P even), two directions of N/2 micro-batches each. Rank r holds stage r of
  direction 0 and stage P-1-r of direction 1; its *local* chunk 0 is the one near the start of its
  direction (stage ``min(r, P-1-r)``). Eight steps per rank (nF0, nF0F1, nB1W1F1, nF0B1F1B0, nB1F1B0,
  nB1B0, nWB0, nW); some backwards are split into B (input gradients) and a later W (weight gradients).
- ``dualpipev``: P devices, 2P stages in a V: device r holds stages r and 2P-1-r; the same eight steps
  with (P, r, N) in place of DualPipe's (P/2, min(r, P-1-r), N/2).

Analytic bubbles (the table of deepseek-ai/DualPipe's README, where B is the *full* backward ``B_in + W``):
``1F1B: (P-1)(F+B)``; ``DualPipe: (P/2-1)(F&B + B - 3W)``; ``DualPipeV on P devices:
(P-1)(F&B + B - 3W)`` (the README's PP there counts the 2P stages). The simulator reproduces them
exactly as the largest per-rank idle time when stage costs are uniform, point-to-point is free,
``F == B_in``, ``W <= F`` and ``max(F, B) <= F&B <= F + B`` (tests/plan/test_plan_schedules.py); outside that
regime the formulas are approximations (e.g. they go negative for large W).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from .._util import check_positive_int

SCHEDULES = ("1f1b", "interleaved", "dualpipe", "dualpipev")
INTERLEAVE = 2  # model chunks per rank of the interleaved 1F1B schedule (Megatron-LM's virtual pipeline)


class Op(NamedTuple):
    """One entry of a rank's order.

    kind: ``"F"`` forward; ``"B"`` backward (``split`` True: input gradients only, its W is queued;
    False: full backward); ``"W"`` the oldest queued weight-gradient; ``"FB"`` a forward of ``chunk``
    overlapped with a full backward of ``chunk_b``.
    """

    kind: str
    chunk: int
    split: bool = False
    chunk_b: int | None = None


class Layout(NamedTuple):
    """Where stages live. ``stage_of[(rank, chunk)] = (direction, stage)``; ``rank_of`` the inverse."""

    schedule: str
    num_ranks: int
    num_stages: int  # per direction
    num_directions: int
    stage_of: dict[tuple[int, int], tuple[int, int]]
    rank_of: dict[tuple[int, int], tuple[int, int]]


def check_schedule(schedule: str, num_ranks: int, num_microbatches: int) -> None:
    """Raise ``ValueError`` unless ``schedule`` can run on ``num_ranks`` ranks with that many micro-batches."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_positive_int("pp (pipeline ranks)", num_ranks)
    check_positive_int("num_microbatches", num_microbatches)
    if schedule == "dualpipe":
        if num_ranks % 2:
            raise ValueError(f"dualpipe needs an even pp, got pp={num_ranks}")
        if num_microbatches % 2 or num_microbatches < 2 * num_ranks:
            raise ValueError(f"dualpipe needs an even num_microbatches >= 2*pp ({2 * num_ranks}), "
                             f"got {num_microbatches}")
    if schedule == "interleaved" and num_microbatches % num_ranks:
        raise ValueError(f"interleaved 1F1B needs num_microbatches to be a multiple of pp ({num_ranks}), "
                         f"got {num_microbatches}")
    if schedule == "dualpipev" and num_microbatches < 2 * num_ranks:
        raise ValueError(f"dualpipev needs num_microbatches >= 2*pp ({2 * num_ranks}), got {num_microbatches}")


def layout(schedule: str, num_ranks: int) -> Layout:
    """The stage placement of ``schedule`` on ``num_ranks`` pipeline ranks."""
    p = num_ranks
    stage_of: dict[tuple[int, int], tuple[int, int]] = {}
    if schedule == "1f1b":
        for r in range(p):
            stage_of[(r, 0)] = (0, r)
        n_stages, n_dirs = p, 1
    elif schedule == "interleaved":
        for r in range(p):
            for c in range(INTERLEAVE):
                stage_of[(r, c)] = (0, c * p + r)
        n_stages, n_dirs = INTERLEAVE * p, 1
    elif schedule == "dualpipe":
        for r in range(p):
            second_half = int(r >= p // 2)
            for c in (0, 1):
                d = c ^ second_half
                stage_of[(r, c)] = (d, r if d == 0 else p - 1 - r)
        n_stages, n_dirs = p, 2
    elif schedule == "dualpipev":
        for r in range(p):
            stage_of[(r, 0)] = (0, r)
            stage_of[(r, 1)] = (0, 2 * p - 1 - r)
        n_stages, n_dirs = 2 * p, 1
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    rank_of = {v: k for k, v in stage_of.items()}
    return Layout(schedule, p, n_stages, n_dirs, stage_of, rank_of)


def rank_orders(schedule: str, num_ranks: int, num_microbatches: int) -> list[list[Op]]:
    """Per-rank op orders (see ``_rank_orders``); cached, so callers must not modify them."""
    return _rank_orders(schedule, num_ranks, num_microbatches)


@lru_cache(maxsize=64)
def _rank_orders(schedule: str, num_ranks: int, num_microbatches: int) -> list[list[Op]]:
    """Per-rank op orders. ``num_microbatches`` counts all micro-batches of one pipeline (both directions).

    These are exactly the programs that ``moekit.pipeline`` runs (``moekit.pipeline.schedules.program``),
    renamed to the planner's chunks: chunk 0 is the direction fed at the rank's own end, so in DualPipe's
    second half the runtime's module index is flipped.
    """
    check_schedule(schedule, num_ranks, num_microbatches)
    if schedule == "interleaved":
        return [_interleaved_order(r, num_ranks, num_microbatches) for r in range(num_ranks)]
    from moekit.pipeline.schedules import program

    orders = []
    for r in range(num_ranks):
        flip = int(schedule == "dualpipe" and r >= num_ranks // 2)
        orders.append([Op(op.kind, op.module ^ flip, op.zb, None if op.module_b is None else op.module_b ^ flip)
                       for op in program(schedule, r, num_ranks, num_microbatches)])
    return orders


def _interleaved_order(r: int, p: int, n: int) -> list[Op]:
    """Megatron-LM's interleaved 1F1B order for rank ``r`` (chunks in groups of ``p`` micro-batches)."""
    v = INTERLEAVE
    total = n * v
    fwd = [(k // p) % v for k in range(total)]  # chunk of the k-th forward
    bwd = [v - 1 - (k // p) % v for k in range(total)]  # chunk of the k-th backward
    warm = min(total, 2 * (p - 1 - r) + (v - 1) * p)
    out = [Op("F", c) for c in fwd[:warm]]
    for k in range(total - warm):
        out.append(Op("F", fwd[warm + k]))
        out.append(Op("B", bwd[k]))
    out += [Op("B", c) for c in bwd[total - warm:]]
    return out


def bubble_formula(schedule: str, num_ranks: int, f: float, b: float, w: float, fb: float) -> float:
    """The DualPipe README's bubble for uniform stage costs.

    ``f``, ``b``, ``w``: forward, input-gradient backward and weight-gradient times of one stage and one
    micro-batch; ``fb``: the time of an overlapped forward + full backward pair. The formulas' B is the
    full backward ``b + w``. DualPipeV's ``num_ranks`` counts devices (its stages are ``2*num_ranks``).
    """
    full = b + w
    if schedule == "1f1b":
        return (num_ranks - 1) * (f + full)
    if schedule == "interleaved":  # f, b, w of one chunk (1/V of a 1F1B stage)
        return (num_ranks - 1) * (f + full)
    if schedule == "dualpipe":
        return (num_ranks // 2 - 1) * (fb + full - 3 * w)
    if schedule == "dualpipev":
        return (num_ranks - 1) * (fb + full - 3 * w)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
