"""Expected fan-out against Monte-Carlo sampling of the same routing model."""

import json

import numpy as np
import pytest

from moekit.plan.spread import Routing, expected_spread, parse_routing


def _sample(rng, e, k, ep, g, m=None, trials=20000, loads=None):
    """Monte Carlo: distinct nodes / ranks of a token (node-limited: m random nodes, then k of their experts)."""
    n = max(ep // g, 1)
    per_node, per_rank = e // n, e // ep
    nodes = ranks = 0
    for _ in range(trials):
        if m is not None and m < n:
            chosen = rng.choice(n, m, replace=False)
            pool = (chosen[:, None] * per_node + np.arange(per_node)).ravel()
            experts = rng.choice(pool, k, replace=False)
        else:
            experts = rng.choice(e, k, replace=False)
        nodes += len(set(experts // per_node))
        ranks += len(set(experts // per_rank))
    return nodes / trials, ranks / trials


@pytest.mark.parametrize("e, k, ep, g, m", [(256, 8, 64, 8, None), (256, 8, 64, 8, 4), (64, 6, 16, 8, 1),
                                            (32, 4, 8, 8, None), (16, 2, 32 // 2, 4, 2)])
def test_spread_matches_monte_carlo(e, k, ep, g, m):
    rng = np.random.default_rng(1)
    routing = Routing("node-limited", m) if m else Routing("uniform")
    s = expected_spread(routing, e, k, ep, g)
    nodes, ranks = _sample(rng, e, k, ep, g, m)
    # 20000 trials: std error of a mean of values in [1, k] is < 0.02.
    assert s.nodes == pytest.approx(nodes, abs=0.05)
    assert s.ranks == pytest.approx(ranks, abs=0.08)
    n = max(ep // g, 1)
    assert s.remote_nodes == pytest.approx(s.nodes * (n - 1) / n)
    assert s.nvlink_copies == pytest.approx(s.ranks * (min(ep, g) - 1) / min(ep, g))


def test_spread_edges():
    one = expected_spread(Routing("uniform"), 16, 4, 1, 8)
    assert (one.nodes, one.ranks, one.remote_nodes, one.nvlink_copies) == (1.0, 1.0, 0.0, 0.0)
    k1 = expected_spread(Routing("uniform"), 256, 1, 64, 8)
    assert k1.ranks == pytest.approx(1.0) and k1.nodes == pytest.approx(1.0)
    # All experts picked: every rank and node is hit.
    full = expected_spread(Routing("uniform"), 16, 16, 8, 4)
    assert full.ranks == pytest.approx(8) and full.nodes == pytest.approx(2)
    # Node-limited to 1 node: exactly one node.
    assert expected_spread(Routing("node-limited", 1), 256, 8, 64, 8).nodes == pytest.approx(1.0)


def test_histogram(tmp_path):
    e, k, ep, g = 64, 4, 16, 8
    flat = np.ones(e)
    s = expected_spread(Routing("histogram", loads=flat), e, k, ep, g)
    assert s.imbalance == pytest.approx(1.0)
    # Independent-choice approximation: P(rank hit) = 1 - (1 - k/E)^(E/ep).
    assert s.ranks == pytest.approx(ep * (1 - (1 - k / e) ** (e // ep)))
    skew = flat.copy()
    skew[:4] = 5.0  # rank 0 holds four hot experts
    s2 = expected_spread(Routing("histogram", loads=skew), e, k, ep, g)
    assert s2.imbalance == pytest.approx(20 / (skew.sum() / ep))
    p = tmp_path / "h.json"
    p.write_text(json.dumps([skew.tolist(), flat.tolist()]))
    r = parse_routing(f"histogram:{p}")
    np.testing.assert_allclose(r.loads, [skew, flat])
    s3 = expected_spread(r, e, k, ep, g)  # per-layer spreads, averaged
    assert s3.imbalance == pytest.approx((s2.imbalance + 1.0) / 2)
    assert s3.ranks == pytest.approx((s2.ranks + s.ranks) / 2)


@pytest.mark.parametrize("spec, match", [("random", "routing must be"), ("node-limited:x", "int M"),
                                         ("node-limited:0", "M must be"), ("histogram:/nonexistent.json", "exist")])
def test_bad_routing(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_routing(spec)


def test_bad_histograms(tmp_path):
    p = tmp_path / "neg.json"
    p.write_text("[1, -1, 2, 3]")
    with pytest.raises(ValueError, match=">= 0"):
        parse_routing(f"histogram:{p}")
    with pytest.raises(ValueError, match="histogram has 4 experts"):
        expected_spread(Routing("histogram", loads=np.ones(4)), 8, 2, 2, 8)
    with pytest.raises(ValueError, match="top-k"):
        expected_spread(Routing("node-limited", 1), 64, 16, 64, 8)


def test_default_routing_follows_model():
    assert parse_routing(None, 4) == Routing("node-limited", 4)
    assert parse_routing(None, None).kind == "uniform"
