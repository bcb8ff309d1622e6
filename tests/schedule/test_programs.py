"""Schedules as data: op lists, deadlock freedom, bubbles and activation peaks against DualPipe's table."""

from __future__ import annotations

import collections
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.pipeline import Durations
from moekit.schedule import check_schedule, program, simulate, stage_graph

check_schedule_args = functools.partial(check_schedule, ranks_arg="num_ranks", microbatches_arg="num_chunks")

CONFIGS = [("1f1b", r) for r in (1, 2, 3, 4, 8)] + [("dualpipe", r) for r in (2, 4, 6, 8)] + \
          [("dualpipev", r) for r in (1, 2, 3, 4)]


def _min_chunks(kind, ranks):
    return 1 if kind == "1f1b" else 2 * ranks


def peak_live(prog):
    live = peak = 0
    for op in prog:
        if op.kind in ("F", "FB"):
            live += 1
            peak = max(peak, live)
        if op.kind in ("B", "FB"):
            live -= 1
    return peak


@pytest.mark.parametrize("kind, ranks", CONFIGS)
def test_every_microbatch_runs_once_per_stage(kind, ranks):
    for extra in (0, 1, 2, 7):
        chunks = _min_chunks(kind, ranks) + (2 * extra if kind == "dualpipe" else extra)
        per_dir = chunks // 2 if kind == "dualpipe" else chunks
        n_mod = 1 if kind == "1f1b" else 2
        for r in range(ranks):
            ops = program(kind, r, ranks, chunks)
            f, b, w, zb = collections.Counter(), collections.Counter(), [], []
            for op in ops:
                if op.kind in ("F", "FB"):
                    f[(op.chunk, op.mb)] += 1
                if op.kind == "B":
                    b[(op.chunk, op.mb)] += 1
                    if op.split:
                        zb.append((op.chunk, op.mb))
                if op.kind == "FB":
                    b[(op.chunk_b, op.mb_b)] += 1
                if op.kind == "W":
                    w.append((op.chunk, op.mb))
            want = {(m, i): 1 for m in range(n_mod) for i in range(per_dir)}
            assert dict(f) == want and dict(b) == want
            assert w == zb  # W chunks run in the order their backwards deferred them
            for m in range(n_mod):  # each module sees its micro-batches in order
                assert [op.mb for op in ops if op.kind in ("F", "FB") and op.chunk == m] == list(range(per_dir))
        simulate(kind, ranks, chunks)  # raises on a deadlock


def test_simulate_detects_deadlock():
    def broken(kind, rank, num_ranks, num_chunks):
        ops = program(kind, rank, num_ranks, num_chunks)
        return ops[::-1] if rank == 1 else ops  # backwards before forwards

    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate("1f1b", 2, 4, programs=[broken("1f1b", r, 2, 4) for r in range(2)])


def test_stage_graphs():
    g = stage_graph("dualpipe", 4)
    assert g[(0, 0)] == (0, None, (1, 0)) and g[(3, 0)] == (0, (2, 0), None)
    assert g[(3, 1)] == (1, None, (2, 1)) and g[(0, 1)] == (1, (1, 1), None)
    v = stage_graph("dualpipev", 2)
    assert v[(1, 0)].next == (1, 1) and v[(1, 1)].prev == (1, 0) and v[(0, 1)].next is None
    with pytest.raises(ValueError, match="kind"):
        stage_graph("gpipe", 2)


def test_requirements_have_clear_errors():
    with pytest.raises(ValueError, match="even number of ranks.*got 3"):
        check_schedule_args("dualpipe", 3, 12)
    with pytest.raises(ValueError, match=r">= 2 \* num_ranks = 8.*num_chunks=6"):
        check_schedule_args("dualpipe", 4, 6)
    with pytest.raises(ValueError, match="even num_chunks"):
        check_schedule_args("dualpipe", 2, 5)
    with pytest.raises(ValueError, match=r"DualPipeV needs num_chunks >= 2 \* num_ranks = 6"):
        check_schedule_args("dualpipev", 3, 5)
    with pytest.raises(ValueError, match="num_chunks must be >= 1"):
        check_schedule_args("1f1b", 2, 0)
    check_schedule_args("dualpipev", 3, 7)  # DualPipeV takes an odd count


@pytest.mark.parametrize("kind, ranks", [("1f1b", 4), ("1f1b", 8), ("dualpipe", 4), ("dualpipe", 8),
                                         ("dualpipev", 2), ("dualpipev", 4)])
def test_activation_peaks_match_dualpipe_table(kind, ranks):
    # The DualPipe README's table: 1F1B holds PP micro-batches (on its first rank), DualPipe and DualPipeV PP+1,
    # where PP is the number of stages (2x the ranks for DualPipeV).
    peaks = [peak_live(program(kind, r, ranks, 20)) for r in range(ranks)]
    if kind == "1f1b":
        assert peaks == [ranks - r for r in range(ranks)]
    else:
        pp = 2 * ranks if kind == "dualpipev" else ranks
        assert peaks == [pp + 1] * ranks


def _bubble(kind, ranks, chunks, d):
    sim = simulate(kind, ranks, chunks, d)
    return [sim.makespan - sum(e - s for s, e in t) for t in sim.times]


@pytest.mark.parametrize("kind, ranks", [("1f1b", 4), ("1f1b", 8), ("dualpipe", 4), ("dualpipe", 8),
                                         ("dualpipev", 2), ("dualpipev", 4)])
def test_bubble_formulas_exact_at_the_readme_point(kind, ranks):
    # F=1, B=2, W=1, F&B=F+B: the README's formulas hold exactly on every rank.
    pp = 2 * ranks if kind == "dualpipev" else ranks
    want = (pp - 1) * 3 if kind == "1f1b" else (pp // 2 - 1) * (3 + 2 - 3)
    for chunks in (2 * ranks, 2 * ranks + 2, 20):
        assert _bubble(kind, ranks, chunks, Durations(1, 2, 1, 3)) == pytest.approx([want] * ranks)


@settings(deadline=None, max_examples=25)
@given(f=st.floats(0.5, 2), b_over_f=st.floats(1, 3), w_frac=st.floats(0.1, 0.5), fb_frac=st.floats(0.6, 1.0),
       ranks=st.sampled_from([2, 4, 8]), extra=st.integers(0, 3))
def test_bubble_invariants(f, b_over_f, w_frac, fb_frac, ranks, extra):
    # The README's DualPipe formula is exact only at its own point (above); away from it these hold:
    # 1F1B's bubble is exactly (PP-1)(F+B); DualPipe's does not grow with the micro-batch count and
    # stays below 1F1B's; DualPipeV on R ranks has, rank by rank, the bubble of DualPipe on 2R.
    b = f * b_over_f
    d = Durations(f, b, b * w_frac, (f + b) * fb_frac)
    chunks = 2 * ranks + 2 * extra
    one = _bubble("1f1b", ranks, chunks, d)
    assert one == pytest.approx([(ranks - 1) * (f + b)] * ranks)
    dual = _bubble("dualpipe", ranks, chunks, d)
    assert dual == pytest.approx(_bubble("dualpipe", ranks, 2 * ranks, d))
    assert max(dual) < one[0] or ranks == 2
    assert _bubble("dualpipev", ranks // 2, chunks // 2, d) == pytest.approx(dual[: ranks // 2])


def _tokens(ops):
    """``F0`` forward of module 0, ``B1`` / ``B1z`` (weight gradient deferred) backward, ``W``, ``F0B1`` an F&B pair."""
    out = []
    for op in ops:
        if op.kind == "FB":
            out.append(f"F{op.chunk}B{op.chunk_b}")
        elif op.kind == "W":
            out.append("W")
        else:
            out.append(f"{op.kind}{op.chunk}" + ("z" if op.split else ""))
    return " ".join(out)


# Written out by hand from the eight steps of DeepSeek's DualPipe for PP = 4, 8 micro-batches (half = 2,
# 4 per direction): nF0 | nF0F1 | nB1W1F1 (zero bubble) | nF0B1F1B0 (the middle rank does not overlap its
# first pair) | nB1F1B0 | nB1B0 (second half zero bubble) | nWB0 | nW. Ranks 2 and 3 mirror ranks 1 and 0
# with the modules swapped (their phase 0 is direction 1).
DUALPIPE_4x8 = [
    "F0 F0 F0 F1 B1z W F1 F0B1 F1B0 B1 F1B0 B1 B0z W B0z W",
    "F0 F1 F0 F1 F0 B1 F1B0 F0B1 F1B0 B1 B0 B1z B0z W W",
    "F1 F0 F1 F0 F1 B0 F0B1 F1B0 F0B1 B0 B1 B0z B1z W W",
    "F1 F1 F1 F0 B0z W F0 F1B0 F0B1 B0 F0B1 B0 B1z W B1z W",
]


def test_programs_follow_deepseeks_steps():
    # Pins the op order (which the numeric tests cannot see: every order gives the same losses and grads).
    assert [_tokens(program("dualpipe", r, 4, 8)) for r in range(4)] == DUALPIPE_4x8
    # DualPipeV on 2 ranks is DualPipe's first half: the turn at rank 1 plays the middle rank.
    assert [_tokens(program("dualpipev", r, 2, 4)) for r in range(2)] == DUALPIPE_4x8[:2]
    assert _tokens(program("1f1b", 0, 4, 6)) == "F0 F0 F0 F0 B0 F0 B0 F0 B0 B0 B0 B0"
    assert _tokens(program("1f1b", 3, 4, 6)) == " ".join(["F0 B0"] * 6)
