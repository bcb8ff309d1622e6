"""The schedule model's programs and simulator, as the planner uses them, against the DualPipe README's
bubble formulas (exact in the uniform case)."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.schedule import UniformCosts, bubble_formula, simulate
from moekit.schedule import placement as _placement
from moekit.schedule import programs as rank_orders


@pytest.mark.parametrize("schedule, p, n", [("1f1b", 1, 1), ("1f1b", 4, 3), ("1f1b", 5, 12), ("dualpipe", 2, 4),
                                            ("dualpipe", 8, 20), ("dualpipev", 1, 2), ("dualpipev", 4, 10)])
def test_every_rank_runs_every_microbatch_once(schedule, p, n):
    placement = _placement(schedule, p)
    per_chunk = n // placement.num_directions
    for r, order in enumerate(rank_orders(schedule, p, n)):
        f, b, w, split = Counter(), Counter(), Counter(), Counter()
        for op in order:
            if op.kind in ("F", "FB"):
                f[op.chunk] += 1
            if op.kind == "B":
                b[op.chunk] += 1
                split[op.chunk] += op.split
            if op.kind == "FB":
                b[op.chunk_b] += 1
            if op.kind == "W":
                w[op.chunk] += 1
        chunks = [0] if schedule == "1f1b" else [0, 1]
        for c in chunks:
            assert f[c] == b[c] == per_chunk, (r, c, f, b)
        assert sum(w.values()) == sum(split.values())  # every split backward gets its W


def test_1f1b_bubble_every_rank():
    f, b, w = 1.5, 2.25, 0.75
    for p, n in [(1, 3), (2, 2), (4, 8), (7, 5)]:
        r = simulate("1f1b", p, n, UniformCosts(f, b, w, f + b + w))
        assert r.bubble == pytest.approx([bubble_formula("1f1b", p, f, b, w, 0.0)] * p, abs=1e-12)
        assert r.step_time == pytest.approx((n + p - 1) * (f + b + w))


@settings(max_examples=60, deadline=None)
@given(schedule=st.sampled_from(["dualpipe", "dualpipev"]), half=st.integers(1, 8), extra=st.integers(0, 6),
       f=st.floats(0.5, 2.0), wr=st.floats(0.05, 1.0), fbr=st.floats(0.0, 1.0))
def test_dual_bubble_matches_formula(schedule, half, extra, f, wr, fbr):
    # The regime in which the README's formula is exact: F == B_in, W <= F, max(F, B) <= F&B <= F + B
    # (B = full backward = B_in + W).
    p = 2 * half if schedule == "dualpipe" else half
    n = 2 * p + 2 * extra
    b, w = f, wr * f
    lo, hi = max(f, b + w), f + b + w
    fb = lo + fbr * (hi - lo)
    r = simulate(schedule, p, n, UniformCosts(f, b, w, fb))
    assert max(r.bubble) == pytest.approx(bubble_formula(schedule, p, f, b, w, fb), rel=1e-9, abs=1e-9)


def test_dualpipe_known_case():
    # 8 ranks, 20 micro-batches (the README's figure): F = B = W = 1, F&B = 2.5 -> 3 * (2.5 + 2 - 3) = 4.5.
    r = simulate("dualpipe", 8, 20, UniformCosts(1.0, 1.0, 1.0, 2.5))
    assert max(r.bubble) == pytest.approx(4.5)
    assert bubble_formula("dualpipe", 8, 1.0, 1.0, 1.0, 2.5) == pytest.approx(4.5)


def test_records_respect_dependencies_and_ranks():
    p, n = 4, 8
    r = simulate("dualpipe", p, n, UniformCosts(1.0, 1.0, 0.5, 2.0), p2p=0.25)
    placement = _placement("dualpipe", p)
    by_rank = {}
    f_end = {}
    for rec in r.records:
        by_rank.setdefault(rec.rank, []).append(rec)
        if rec.phase in ("F", "FB"):
            f_end[placement.stage_of[(rec.rank, rec.chunk)] + (rec.microbatch,)] = (rec.start, rec.end)
    for recs in by_rank.values():  # one op at a time per rank
        recs = sorted(recs, key=lambda x: x.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(recs, recs[1:]))
    for (d, s, m), (start, _) in f_end.items():  # a forward starts after its input arrived
        if s > 0:
            assert start >= f_end[(d, s - 1, m)][1] + 0.25 - 1e-12
    assert len([x for x in r.records if x.phase in ("F", "FB")]) == p * n


@pytest.mark.parametrize("schedule, p, n, match", [
    ("dualpipe", 3, 12, "even pp"), ("dualpipe", 4, 6, "num_microbatches"), ("dualpipev", 4, 7, "num_microbatches"),
    ("zb", 4, 8, "schedule"), ("1f1b", 0, 4, "pp"), ("1f1b", 2, 0, "num_microbatches")])
def test_bad_schedules(schedule, p, n, match):
    with pytest.raises(ValueError, match=match):
        simulate(schedule, p, n, UniformCosts(1, 1, 1, 2))


def test_uniform_costs_reject_negative():
    with pytest.raises(ValueError, match="UniformCosts.w"):
        UniformCosts(1.0, 1.0, -1.0, 2.0)
