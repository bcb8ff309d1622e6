"""The gate against a plain per-token re-implementation of DeepSeek-V3's rules (same indices, same weights)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig
from moekit.routing.gate import Gate, route


def reference_route(scores, bias, cfg, num_nodes):
    """One token at a time, in float64, with python lists: the rules as written in the report."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    limits = []
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        limits.append((cfg.n_group, cfg.topk_group))
    if cfg.max_nodes_per_token is not None and 1 < num_nodes and cfg.max_nodes_per_token < num_nodes:
        limits.append((num_nodes, cfg.max_nodes_per_token))
    limits.sort()  # fewer blocks = coarser: applied first
    out_idx, out_w = [], []
    for s_row in scores.double().tolist():
        biased = [s + b for s, b in zip(s_row, bias.double().tolist())]
        allowed = set(range(e))
        for nb, keep in limits:
            size = e // nb
            block_score = []
            for blk in range(nb):
                vals = sorted((biased[i] if i in allowed else -math.inf)
                              for i in range(blk * size, (blk + 1) * size))[::-1]
                block_score.append((sum(vals[:min(2, size)]), blk))
            kept = {blk for _, blk in sorted(block_score, key=lambda v: -v[0])[:keep]}
            allowed &= {i for i in range(e) if i // size in kept}
        chosen = sorted(allowed, key=lambda i: -biased[i])[:k]
        w = [s_row[i] for i in chosen]
        if cfg.norm_topk_prob:
            total = sum(w) + 1e-20
            w = [v / total for v in w]
        out_idx.append(chosen)
        out_w.append([v * cfg.routed_scaling_factor for v in w])
    return torch.tensor(out_idx, dtype=torch.int64), torch.tensor(out_w, dtype=torch.float64)


def reference_scores(x, weight, scoring):
    """``[T, E]`` float64 affinities from the logits ``x @ W^T`` (sigmoid, or softmax over the experts)."""
    logits = x.double() @ weight.detach().double().T
    return logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)


def check_same(idx, w, ref_idx, ref_w):
    # Same experts in the same order (both best-first by biased score), same weights.
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w, rtol=2e-6, atol=1e-7)


def hf_noaux_tc(scores, bias, cfg):
    """The vectorised formulation of HF's DeepseekV3 ``noaux_tc`` gate (with -inf masking, as the official
    inference code), to make sure the per-token reference reads the rules the same way."""
    t = scores.shape[0]
    sfc = scores + bias
    group_scores = sfc.view(t, cfg.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, cfg.n_group, cfg.n_routed_experts // cfg.n_group).reshape(t, -1)
    tmp = sfc.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(tmp, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    return idx, w


def test_gate_matches_hf_formulation_on_v3_shape():
    cfg = MoEConfig.preset("deepseek-v3", hidden_size=256)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.e_score_correction_bias.normal_(0, 0.05)
    x = torch.randn(64, 256)
    out = gate(x)
    scores = torch.sigmoid(x @ gate.weight.detach().T)
    hf_idx, hf_w = hf_noaux_tc(scores, gate.e_score_correction_bias, cfg)
    order = hf_idx.sort(dim=1)
    mine = out.topk_idx.sort(dim=1)
    assert torch.equal(order.values, mine.values)
    torch.testing.assert_close(out.topk_weights.gather(1, mine.indices), hf_w.gather(1, order.indices))
    ref_idx, ref_w = reference_route(out.scores, gate.e_score_correction_bias, cfg, 1)
    check_same(out.topk_idx, out.topk_weights, ref_idx, ref_w)
    torch.testing.assert_close(out.scores, scores)


@settings(deadline=None, max_examples=60)
@given(
    shape=st.sampled_from([
        # (E, n_group, topk_group, K, num_nodes, max_nodes)
        (16, 4, 2, 4, 1, None), (16, 1, 1, 3, 1, None), (16, 4, 4, 8, 1, None),
        (32, 4, 3, 6, 8, 3),    # nodes (4 experts) inside groups (8): groups first
        (32, 8, 3, 6, 4, 2),    # groups (4) inside nodes (8): nodes first
        (16, 4, 2, 4, 4, 1),    # nodes == groups: the tighter limit
        (16, 1, 1, 4, 8, 2),    # node-limited only, 2 experts per node
        (8, 1, 1, 2, 8, 2),     # one expert per node (top-1 block score)
    ]),
    t=st.integers(0, 40), scoring=st.sampled_from(["sigmoid", "softmax"]), norm=st.booleans(),
    bias_scale=st.sampled_from([0.0, 0.01, 1.0]), seed=st.integers(0, 2**16),
)
def test_gate_matches_reference(shape, t, scoring, norm, bias_scale, seed):
    e, ng, tg, k, nodes, m = shape
    cfg = MoEConfig(hidden_size=32, n_routed_experts=e, n_group=ng, topk_group=tg, num_experts_per_tok=k,
                    scoring_func=scoring, norm_topk_prob=norm, routed_scaling_factor=1.7, max_nodes_per_token=m)
    gen = torch.Generator().manual_seed(seed)
    gate = Gate(cfg, num_nodes=nodes)
    with torch.no_grad():
        # Logits ~N(0, 4): sigmoid never saturates to exactly 1.0 in fp32 (ties would make the order arbitrary).
        gate.weight.copy_(torch.randn(e, 32, generator=gen) * (2 / 32 ** 0.5))
        gate.e_score_correction_bias.copy_(torch.randn(e, generator=gen) * bias_scale)
    x = torch.randn(t, 32, generator=gen)
    out = gate(x)
    assert out.topk_idx.shape == (t, k) and out.topk_idx.dtype == torch.int64
    assert out.topk_weights.dtype == torch.float32
    # The scoring step, from the logits in float64 (routing below is checked on the gate's own fp32 scores:
    # re-deriving it from other scores would make near-ties flip).
    torch.testing.assert_close(out.scores.double(), reference_scores(x, gate.weight, scoring), rtol=1e-5, atol=1e-6)
    ref_idx, ref_w = reference_route(out.scores, gate.e_score_correction_bias, cfg, nodes)
    check_same(out.topk_idx, out.topk_weights, ref_idx.view(t, k), ref_w.view(t, k))
    if t:
        # The limits hold: at most topk_group groups and max_nodes_per_token nodes per token, no repeats.
        groups = out.topk_idx // (e // ng)
        assert max(len(set(r)) for r in groups.tolist()) <= tg
        if m is not None:
            assert max(len(set(r)) for r in (out.topk_idx // (e // nodes)).tolist()) <= m
        assert all(len(set(r)) == k for r in out.topk_idx.tolist())


def test_bias_only_chooses():
    cfg = MoEConfig(hidden_size=16, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                    routed_scaling_factor=2.5)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.e_score_correction_bias[5] = 10.0  # expert 5 always chosen ...
    x = torch.randn(10, 16)
    out = gate(x)
    assert (out.topk_idx[:, 0] == 5).all()
    # ... with its unbiased score as weight, normalised over the two chosen, times the scale.
    s = out.scores.gather(1, out.topk_idx)
    torch.testing.assert_close(out.topk_weights, s / s.sum(-1, keepdim=True) * 2.5)


def test_weights_are_differentiable_like_a_plain_gather():
    cfg = MoEConfig.preset("tiny")
    gate = Gate(cfg)
    x = torch.randn(12, cfg.hidden_size, requires_grad=True)
    out = gate(x)
    g = torch.randn_like(out.topk_weights)
    (out.topk_weights * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = gate.weight.detach().clone().requires_grad_()
    s = torch.sigmoid(x2 @ w2.T).gather(1, out.topk_idx)
    ((s / s.sum(-1, keepdim=True) * cfg.routed_scaling_factor) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(gate.weight.grad, w2.grad)
    assert gate.e_score_correction_bias.grad is None and not gate.e_score_correction_bias.requires_grad


def test_route_without_bias_and_state_dict_names():
    cfg = MoEConfig.preset("tiny")
    gate = Gate(cfg)
    assert set(gate.state_dict()) == {"weight", "e_score_correction_bias"}
    scores = torch.rand(5, cfg.n_routed_experts)
    idx, w = route(scores, None, cfg)
    ref_idx, ref_w = reference_route(scores, torch.zeros(cfg.n_routed_experts), cfg, 1)
    check_same(idx, w, ref_idx, ref_w)


def test_bad_input_and_layouts():
    cfg = MoEConfig.preset("tiny")
    with pytest.raises(ValueError, match="x must be"):
        Gate(cfg)(torch.randn(3, cfg.hidden_size + 1))
    with pytest.raises(ValueError, match="num_nodes"):
        Gate(cfg, num_nodes=3)
    with pytest.raises(ValueError, match="topk_method"):
        Gate(cfg.replace(topk_method="greedy"))
    # Groups of 4 and nodes of 8 with 12 experts would straddle: not nested.
    bad = MoEConfig(hidden_size=16, n_routed_experts=24, n_group=4, topk_group=2, num_experts_per_tok=4,
                    max_nodes_per_token=1)
    with pytest.raises(ValueError, match="max_nodes_per_token"):
        Gate(bad, num_nodes=3)
    # One node of 4 experts cannot hold 6 experts per token.
    few = MoEConfig(hidden_size=16, n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=6,
                    max_nodes_per_token=1)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Gate(few, num_nodes=4)


def test_bias_stays_fp32_in_a_bf16_model():
    cfg = MoEConfig.preset("tiny")
    gate = Gate(cfg).to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert "e_score_correction_bias" in dict(gate.named_buffers())
    out = gate(torch.randn(5, cfg.hidden_size, dtype=torch.bfloat16))
    assert out.scores.dtype == torch.float32 and out.topk_weights.dtype == torch.float32
