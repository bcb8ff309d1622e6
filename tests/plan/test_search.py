"""The search against brute force: the same ranking as simulating every layout of its space, never a
plan that does not fit, fixed fields held, and DeepSeek-V3's own layout beaten or matched."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.plan import ClusterSpec, ParallelPlan, plan
from moekit.plan.search import default_global_batch, divisors, microbatches_for, search, space, wall

TINY = MoEConfig.preset("tiny")
FIX = {"fp8_dispatch": True, "micro_batch": 1}  # keeps the brute force to ~200 layouts


def _brute(cfg, cl, fixed, gb):
    """Simulate every layout of the space; the fitting ones, fastest first."""
    out = [plan(cfg, cl, p) for p in space(cfg, cl, fixed, global_batch=gb, seq_len=128)]
    return sorted((r for r in out if r.step.fits_memory), key=lambda r: -r.step.tokens_per_s_per_gpu), out


@pytest.mark.parametrize("nodes, per_node, hbm_mb", [(2, 4, 2.5), (1, 8, 3.0), (4, 2, 1e6)])
def test_search_matches_brute_force(nodes, per_node, hbm_mb):
    # HBM sized so that about half the layouts do not fit (the last case: all fit).
    cl = ClusterSpec(num_nodes=nodes, gpus_per_node=per_node, hbm_gb=hbm_mb / 1e3)
    fits, every = _brute(TINY, cl, FIX, 64)
    assert 0 < len(fits) <= len(every)
    res = search(TINY, cl, FIX, global_batch=64, seq_len=128, top=3, tolerance=0.0)
    want = [r.step.tokens_per_s_per_gpu for r in fits[:3]]
    assert [c.tokens_per_s_per_gpu for c in res.ranked] == pytest.approx(want, rel=1e-12)
    assert res.simulated < len(every)  # the bounds pruned something
    assert all(c.result.step.memory.fits for c in res.ranked)
    assert all(w.memory_gb > w.capacity_gb for w in res.memory_walls)
    # The exhaustive mode is the brute force itself.
    ex = search(TINY, cl, FIX, global_batch=64, seq_len=128, exhaustive=True)
    assert [c.tokens_per_s_per_gpu for c in ex.ranked] == pytest.approx([r.step.tokens_per_s_per_gpu for r in fits])


@settings(max_examples=4, deadline=None)
@given(hbm_mb=st.floats(1.2, 6.0), pp=st.sampled_from([None, 1, 2]))
def test_never_a_plan_that_does_not_fit(hbm_mb, pp):
    cl = ClusterSpec(num_nodes=2, gpus_per_node=4, hbm_gb=hbm_mb / 1e3)
    fixed = {**FIX, **({"pp": pp} if pp else {})}
    try:
        res = search(TINY, cl, fixed, global_batch=64, seq_len=128, top=4, tolerance=0.0)
    except ValueError as e:
        assert "fits" in str(e)
        assert not _brute(TINY, cl, fixed, 64)[0]
        return
    for c in res.ranked:
        assert c.result.step.memory.total <= hbm_mb * 1e6 and c.result.step.fits_memory
        assert pp is None or c.plan.pp == pp
    best = _brute(TINY, cl, fixed, 64)[0][0].step.tokens_per_s_per_gpu
    assert res.ranked[0].tokens_per_s_per_gpu == pytest.approx(best, rel=1e-12)


def test_fixed_fields_and_errors():
    cl = ClusterSpec(num_nodes=2, gpus_per_node=4)
    res = search(TINY, cl, {"schedule": "dualpipe", "ep": 4, "recompute": "full"}, global_batch=64, seq_len=128)
    assert all(c.plan.schedule == "dualpipe" and c.plan.ep == 4 and c.plan.recompute == "full" for c in res.ranked)
    assert [c.tokens_per_s_per_gpu for c in res.ranked] == sorted((c.tokens_per_s_per_gpu for c in res.ranked),
                                                                  reverse=True)
    assert wall(res.ranked[0], res.ranked[0]) == "-"
    with pytest.raises(ValueError, match="cannot fix"):
        search(TINY, cl, {"seq_len": 4}, global_batch=64)
    with pytest.raises(ValueError, match="no layout"):
        search(TINY, cl, {"ep": 3}, global_batch=64, seq_len=128)
    with pytest.raises(ValueError, match="fits"):
        search(TINY, ClusterSpec(num_nodes=2, gpus_per_node=4, hbm_gb=1e-6), global_batch=64, seq_len=128)


def test_batch_rounding_and_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12] and divisors(1) == [1]
    assert default_global_batch(2048) == 15360  # DeepSeek-V3's batch on its cluster
    assert microbatches_for("1f1b", 16, 128, 1, 15360) == 120
    assert microbatches_for("dualpipe", 16, 128, 1, 15360) == 120
    assert microbatches_for("interleaved", 16, 128, 1, 15360) == 128  # a multiple of pp, 6.7% more
    assert microbatches_for("dualpipe", 64, 128, 1, 1000) is None  # needs 128 micro-batches: 16x the batch


def test_deepseek_plan_is_matched_or_beaten():
    # On DeepSeek-V3's cluster with its PP16, the search's best is at least as fast as DeepSeek's own
    # layout (EP64, DualPipe, 20 SMs, node-limited to 4, selective recomputation), which fits.
    res = search("deepseek-v3", "h800x2048", {"pp": 16}, mtp_depth=1, top=2)
    own = plan("deepseek-v3", "h800x2048", ParallelPlan(pp=16, ep=64, schedule="dualpipe", comm_sms=20,
                                                       routing="node-limited:4", recompute="selective",
                                                       num_microbatches=120, mtp_depth=1))
    assert own.step.fits_memory
    best = res.ranked[0]
    assert best.tokens_per_s_per_gpu >= own.step.tokens_per_s_per_gpu
    assert best.result.step.fits_memory and best.plan.pp == 16


def test_cli_recommends_a_plan_that_fits_beside_deepseeks(capsys):
    # `moekit plan --model deepseek-v3 --cluster h800x2048`: a ranked list whose best fits in 80 GB, and
    # DeepSeek's own plan beside it with its ~20 comm SMs and ~1:1 compute : communication.
    from moekit.plan.cli import main

    assert main(["--model", "deepseek-v3", "--cluster", "h800x2048", "--mtp-depth", "1", "--top", "2", "--json"]) == 0
    import json

    d = json.loads(capsys.readouterr().out)
    best, own = d["ranked"][0], d["deepseek_v3_plan"]
    assert best["memory_gb"] <= 80 and d["best"]["step"]["fits_memory"]
    assert own["fits"] and own["comm_sms_used"] == 20 and 0.67 <= own["compute_to_comm"] <= 1.5
    assert (own["pp"], own["ep"], own["schedule"], own["routing"]) == (16, 64, "dualpipe", "node-limited:4")
    assert best["tokens_per_s_per_gpu"] >= own["tokens_per_s_per_gpu"]
    assert d["search"]["simulated"] < d["search"]["candidates"] / 10  # the bounds did the pruning
