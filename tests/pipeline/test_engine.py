"""The schedule engine's checks and options: errors users see, process sub-groups, rank_mapping, timelines."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_stages import DTYPE, MB, H, Stage, TwoStage, batch, criterion, reference, two_criterion, two_reference

from moekit.pipeline import (
    DualPipe,
    DualPipeV,
    OneFOneB,
    PhaseRecord,
    gather_records,
    p2p,
    plot_timeline,
    set_p2p_tensor_dtype,
    set_p2p_tensor_shapes,
    sim_records,
    simulate,
)
from moekit.testing import spawn


def test_single_process_errors():
    with pytest.raises(ValueError, match="even number of ranks, got 1"):
        DualPipe([Stage(0), Stage(1)])
    with pytest.raises(ValueError, match=r"takes 2 nn.Module\(s\) per rank"):
        DualPipeV([Stage(0)])
    with pytest.raises(ValueError, match="permutation"):
        OneFOneB(Stage(0), rank_mapping=[1])
    pipe = DualPipeV(nn.Sequential(Stage(0), Stage(1)))
    x, y = batch(4, 0)
    with pytest.raises(ValueError, match=r"num_chunks >= 2 \* num_ranks = 2, got num_chunks=1"):
        pipe.step(x, num_chunks=1, criterion=criterion, labels=(y,))
    with pytest.raises(ValueError, match="needs criterion"):
        pipe.step(x, num_chunks=4)
    with pytest.raises(ValueError, match="cannot be split into 4"):
        pipe.step(x[:3], num_chunks=4, criterion=criterion, labels=(y[:3],))
    with pytest.raises(TypeError, match="list of shapes"):
        set_p2p_tensor_shapes((MB, H))
    with pytest.raises(TypeError, match="torch.dtype"):
        set_p2p_tensor_dtype("float32")
    # a no_grad step needs no criterion and returns the outputs alone
    with torch.no_grad():
        loss, out = pipe.step(x, num_chunks=4, return_outputs=True)
    _, ref_out, _ = reference(2, 4, 0)
    assert loss is None and torch.equal(out, ref_out)


def _two_pipes(rank, world):
    """Ranks {0,1} and {2,3} run two independent DualPipes; the second with its ranks swapped."""
    g01 = dist.new_group([0, 1])
    g23 = dist.new_group([2, 3])
    group = g01 if rank < 2 else g23
    mapping = None if rank < 2 else [1, 0]
    pp_rank = rank if rank < 2 else 3 - rank
    errors = {}

    def attempt(name, mods, **kw):
        pipe = DualPipe(mods, process_group=group, rank_mapping=mapping)
        for k, v in kw.items():
            getattr(pipe, k)(v)
        x, y = batch(4, 7)
        inp = (x.tensor_split(2)[pp_rank],)
        lab = (y.tensor_split(2)[1 - pp_rank],)
        try:
            pipe.step(*inp, num_chunks=4, criterion=criterion, labels=lab)
        except ValueError as e:
            errors[name] = str(e)

    p2p._default_shapes = p2p._default_dtype = None
    attempt("no_shapes", [Stage(0), Stage(1)])
    attempt("wrong_shape", [Stage(0), Stage(1)], set_p2p_tensor_shapes=[(MB, H + 1)], set_p2p_tensor_dtype=DTYPE)
    attempt("wrong_dtype", [Stage(0), Stage(1)], set_p2p_tensor_shapes=[(MB, H)],
            set_p2p_tensor_dtype=torch.float32)

    class ViewStage(Stage):
        def forward(self, x):
            return super().forward(x)[:, :]

    attempt("view", [ViewStage(0), ViewStage(1)], set_p2p_tensor_shapes=[(MB, H)], set_p2p_tensor_dtype=DTYPE)

    # A working run: per-instance shapes only (module defaults unset), sub-group, rank_mapping.
    mods = [Stage(pp_rank), Stage(1 - pp_rank)]
    pipe = DualPipe(mods, process_group=group, rank_mapping=mapping)
    pipe.set_p2p_tensor_shapes([(MB, H)])
    pipe.set_p2p_tensor_dtype(DTYPE)
    x, y = batch(8, 5)
    loss, _ = pipe.step(x.tensor_split(2)[pp_rank], num_chunks=8, criterion=criterion,
                        labels=(y.tensor_split(2)[1 - pp_rank],))
    gathered = gather_records([PhaseRecord(rank, "F", 0, rank, 0.0, 1.0)])
    assert [r.rank for r in gathered] == list(range(world))
    return pp_rank, errors, loss, [{n: p.grad.clone() for n, p in m.named_parameters()} for m in mods]


def test_errors_subgroups_and_rank_mapping():
    out = spawn(_two_pipes, 4, timeout=120)
    losses, _, ref_grads = reference(2, 8, 5)
    for pp_rank, errors, loss, _ in out:
        assert "set_p2p_tensor_shapes" in errors["no_shapes"]
        assert f"is shape ({MB}, {H}) of torch.float64, but p2p tensors are ({MB}, {H + 1})" in errors["wrong_shape"]
        assert "torch.float32" in errors["wrong_dtype"]
        assert "is a view" in errors["view"]
        # rank 0 of the pipe holds the losses of the inputs fed at rank 1, and the other way round
        assert torch.equal(loss, losses.tensor_split(2)[1 - pp_rank])
    for a, b in ((0, 1), (3, 2)):  # (pp rank 0, pp rank 1) in each pipe, by global rank
        for stage in (0, 1):
            ra, rb = out[a], out[b]
            held = {0: (ra[3][0], rb[3][1]), 1: (rb[3][0], ra[3][1])}[stage]
            for n, t in ref_grads[stage].items():
                torch.testing.assert_close(held[0][n] + held[1][n], t, rtol=1e-12, atol=1e-14)


def test_plot_timeline(tmp_path):
    recs = sim_records(simulate("dualpipe", 4, 10))
    assert {r.phase for r in recs} == {"F", "B", "W", "FB"}
    recs.append(PhaseRecord(0, "COMM", 0, 0, 1.0, 3.0))
    path = tmp_path / "t.png"
    plot_timeline(recs, path, title="DualPipe, 4 ranks", time_unit="s")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000
    with pytest.raises(ValueError, match="no records"):
        plot_timeline([], tmp_path / "e.png")
    with pytest.raises(ValueError, match="time_unit"):
        plot_timeline(recs, tmp_path / "e.png", time_unit="min")


def _two_tensor_rank(rank, world, cases):
    out = []
    for kind, num_chunks, rows, seed in cases:
        torch.manual_seed(seed)
        a, b, y = (torch.randn(1, num_chunks * rows, H, dtype=DTYPE) for _ in range(3))
        cls = {"dualpipe": DualPipe, "dualpipev": DualPipeV, "1f1b": OneFOneB}[kind]
        ids = {"dualpipe": [rank, world - 1 - rank], "dualpipev": [rank, 2 * world - 1 - rank], "1f1b": [rank]}[kind]
        mods = [TwoStage(i) for i in ids]
        pipe = cls(mods if len(mods) == 2 else mods[0], batch_dim=1)
        pipe.set_p2p_tensor_shapes([(1, rows, H), (1, rows, H)])
        pipe.set_p2p_tensor_dtype(DTYPE)
        inputs, labels = (), ()
        if kind == "dualpipe":
            half = [t.tensor_split(2, 1) for t in (a, b, y)]
            if rank in (0, world - 1):
                me = 0 if rank == 0 else 1
                inputs, labels = (half[0][me], half[1][me]), (half[2][1 - me],)
        else:
            if rank == 0:
                inputs = (a, b)
            if rank == (0 if kind == "dualpipev" else world - 1):
                labels = (y,)
        loss, outs = pipe.step(*inputs, num_chunks=num_chunks, criterion=two_criterion, labels=labels,
                               return_outputs=True)
        out.append(dict(loss=loss, outs=outs, ids=ids,
                        grads=[{n: p.grad.clone() for n, p in m.named_parameters()} for m in mods]))
    return out


@settings(deadline=None, max_examples=3, derandomize=True)
@given(extra=st.integers(0, 3), rows=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_two_tensors_batch_dim_1(extra, rows, seed):
    # Two p2p tensors per message, batch on dim 1, odd and even micro-batch counts; 4 ranks.
    world = 4
    cases = [("dualpipe", 2 * world + 2 * extra, rows, seed), ("1f1b", world + extra, rows, seed + 1)]
    res = spawn(_two_tensor_rank, world, cases, timeout=120)
    v_cases = [("dualpipev", 2 * 2 + extra, rows, seed + 2)]
    res_v = spawn(_two_tensor_rank, 2, v_cases, timeout=120)
    for ci, (kind, num_chunks, rows_, s) in enumerate(cases + v_cases):
        ranks = res_v if kind == "dualpipev" else res
        w = len(ranks)
        torch.manual_seed(s)
        a, b, y = (torch.randn(1, num_chunks * rows_, H, dtype=DTYPE) for _ in range(3))
        n_stages = 2 * w if kind == "dualpipev" else w
        losses, us, vs, grads = two_reference(n_stages, num_chunks, a, b, y)
        idx = ci if kind != "dualpipev" else 0
        summed = [dict() for _ in range(n_stages)]
        for rank, r in enumerate(ranks):
            r = r[idx]
            if kind == "dualpipe" and rank in (0, w - 1):
                part = 1 if rank == 0 else 0  # rank 0 ends the direction fed at rank w-1
                assert torch.equal(r["loss"], losses.tensor_split(2)[part])
                assert torch.equal(r["outs"][0], us.tensor_split(2, 1)[part])
                assert torch.equal(r["outs"][1], vs.tensor_split(2, 1)[part])
            elif (kind == "dualpipev" and rank == 0) or (kind == "1f1b" and rank == w - 1):
                assert torch.equal(r["loss"], losses)
                assert isinstance(r["outs"], tuple) and torch.equal(r["outs"][0], us) and torch.equal(r["outs"][1], vs)
            else:
                assert r["loss"] is None and r["outs"] is None
            for sid, g in zip(r["ids"], r["grads"]):
                for n, t in g.items():
                    summed[sid][n] = summed[sid][n] + t if n in summed[sid] else t
        for sid in range(n_stages):
            for n, t in grads[sid].items():
                torch.testing.assert_close(summed[sid][n], t, rtol=1e-12, atol=1e-14)


def test_zero_bubble_backwards_defer_weight_gradients_to_w(monkeypatch):
    # A "z" backward must only queue its weight gradients (WeightGradStore.put) and the schedule's W must run
    # them; the numbers alone cannot tell (a backward that computes everything at once gives the same grads).
    from moekit.pipeline import WeightGradStore
    from moekit.schedule import program

    events = []
    real_put = WeightGradStore.put.__func__

    def put(cls, func):
        def deferred():
            events.append("ran")
            func()

        events.append("put")
        real_put(cls, deferred)

    monkeypatch.setattr(WeightGradStore, "put", classmethod(put))
    mods = [Stage(0), Stage(1)]
    pipe = DualPipeV(mods)
    x, y = batch(6, 3)
    loss, _ = pipe.step(x, num_chunks=6, criterion=criterion, labels=(y,))
    ops = program("dualpipev", 0, 1, 6)
    n_zb = sum(op.kind == "B" and op.split for op in ops)
    assert n_zb > 0 and sum(op.kind == "W" for op in ops) == n_zb
    # Each deferred backward queues the two matmul weight gradients of its Stage; every one runs, in a W.
    assert events.count("put") == events.count("ran") == 2 * n_zb
    losses, _, ref = reference(2, 6, 3)
    assert torch.equal(loss, losses)
    for m, g in zip(mods, ref):
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, g[n], rtol=1e-12, atol=1e-14)
