"""moekit.Buffer's DeepEP normal-mode arguments on one rank: layout-driven dispatch (no topk_idx),
num_worst_tokens, combine with topk_weights and bias — against plain loop references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.ep import Buffer, WeightedCombineOutput


def _routing(t: int, k: int, e: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e, (t, k), generator=g)
    idx = torch.where(torch.rand(t, k, generator=g) < 0.3, -1, idx)
    return torch.randn(t, 16, generator=g, dtype=torch.float64).float(), idx, torch.rand(t, k, generator=g)


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 9), st.integers(1, 4), st.integers(0, 2 ** 16), st.integers(0, 5))
def test_layout_driven_dispatch_equals_topk_dispatch(t, k, seed, extra):
    buf, e = Buffer(), 4
    x, idx, w = _routing(t, k, e, seed)
    lay = buf.get_dispatch_layout(idx, e)
    by_idx = buf.dispatch(x, idx, w, e)
    by_lay = buf.dispatch(x, None, None, None, is_token_in_rank=lay.is_token_in_rank,
                          num_tokens_per_expert=lay.num_tokens_per_expert)
    assert torch.equal(by_lay.recv_x, by_idx.recv_x) and by_lay.recv_topk_idx is None
    assert by_lay.num_recv_tokens_per_expert_list == by_idx.num_recv_tokens_per_expert_list
    # Fixed-size outputs: the same rows first, then zeros / -1 / 0.
    m = by_idx.recv_x.shape[0]
    worst = buf.dispatch(x, idx, w, e, num_worst_tokens=m + extra) if m + extra else None
    if worst is not None:
        assert worst.recv_x.shape[0] == m + extra and worst.num_recv_tokens_per_expert_list == []
        assert torch.equal(worst.recv_x[:m], by_idx.recv_x) and torch.all(worst.recv_x[m:] == 0)
        assert torch.equal(worst.recv_topk_idx[:m], by_idx.recv_topk_idx) and torch.all(worst.recv_topk_idx[m:] == -1)
        # combine takes the padded rows; weights and two biases: plain sums by loops.
        b0, b1 = torch.randn(t, 16), torch.randn(t, 16)
        out = buf.combine(worst.recv_x * 3, worst.handle, topk_weights=worst.recv_topk_weights, bias=(b0, b1))
        assert isinstance(out, WeightedCombineOutput)
        for i in range(t):
            reached = 1.0 if bool((idx[i] >= 0).any()) else 0.0
            torch.testing.assert_close(out.combined_x[i], x[i] * 3 * reached + b0[i] + b1[i])
            want_w = torch.tensor([float(w[i, j]) if idx[i, j] >= 0 else 0.0 for j in range(k)])
            assert torch.equal(out.combined_topk_weights[i], want_w)


def test_worst_tokens_overflow_layout_mismatch_and_grads():
    buf, e = Buffer(), 4
    x, idx, w = _routing(6, 2, e, 1)
    lay = buf.get_dispatch_layout(idx, e)
    m = int(lay.is_token_in_rank.any(1).sum())
    with pytest.raises(ValueError, match=f"num_worst_tokens \\({m - 1}\\) is too small"):
        buf.dispatch(x, idx, w, e, num_worst_tokens=m - 1)
    with pytest.raises(ValueError, match="is_token_in_rank is not the layout of topk_idx"):
        buf.dispatch(x, idx, w, e, is_token_in_rank=~lay.is_token_in_rank)
    with pytest.raises(ValueError, match="topk_weights needs topk_idx"):
        buf.dispatch(x, None, w, None, is_token_in_rank=lay.is_token_in_rank,
                     num_tokens_per_expert=lay.num_tokens_per_expert)
    with pytest.raises(ValueError, match="bias"):
        d = buf.dispatch(x, idx, w, e)
        buf.combine(d.recv_x, d.handle, bias=torch.zeros(5, 16))
    # Gradients through padded outputs: d(sum(combine(2 * dispatch(x))))/dx = 2 per reached token.
    xg = x.clone().requires_grad_(True)
    d = buf.dispatch(xg, idx, w, e, num_worst_tokens=m + 3)
    y, _ = buf.combine(d.recv_x * 2, d.handle)
    y.sum().backward()
    assert torch.equal(xg.grad, 2 * lay.is_token_in_rank.any(1, keepdim=True).float().expand_as(x))
