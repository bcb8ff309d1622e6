"""get_dispatch_layout and the FP8 wire quantizer, single process."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.ep import Buffer, get_dispatch_layout
from moekit.ep.fp8 import dequantize_1x128, quantize_1x128


def _ref_layout(idx: torch.Tensor, e: int, r: int, g: int):
    epr = e // r
    per_rank, per_node, per_expert = [0] * r, [0] * (r // g), [0] * e
    in_rank = torch.zeros(idx.shape[0], r, dtype=torch.bool)
    for t, row in enumerate(idx.tolist()):
        ranks = {v // epr for v in row if v >= 0}
        for v in row:
            if v >= 0:
                per_expert[v] += 1
        for rr in ranks:
            per_rank[rr] += 1
            in_rank[t, rr] = True
        for n in {rr // g for rr in ranks}:
            per_node[n] += 1
    return per_rank, per_node, per_expert, in_rank


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 30), k=st.integers(1, 6), epr=st.integers(1, 4), nodes=st.integers(1, 4),
       g=st.integers(1, 3), seed=st.integers(0, 1000), p_mask=st.floats(0, 1))
def test_layout_matches_reference(t, k, epr, nodes, g, seed, p_mask):
    r = nodes * g
    e = epr * r
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e, (t, k), generator=gen)
    idx = torch.where(torch.rand(t, k, generator=gen) < p_mask, -1, idx)
    lay = get_dispatch_layout(idx, e, r, g)
    per_rank, per_node, per_expert, in_rank = _ref_layout(idx, e, r, g)
    assert lay.num_tokens_per_rank.tolist() == per_rank
    assert lay.num_tokens_per_node.tolist() == per_node
    assert lay.num_tokens_per_expert.tolist() == per_expert
    assert torch.equal(lay.is_token_in_rank, in_rank)


def test_layout_bad_input_and_buffer_method():
    idx = torch.tensor([[0, 3], [-1, 1]])
    with pytest.raises(ValueError, match="num_experts \\(5\\)"):
        get_dispatch_layout(idx, 5, 2, 1)
    with pytest.raises(TypeError, match="int64"):
        get_dispatch_layout(idx.int(), 4, 2, 1)
    buf = Buffer()  # no process group: one rank
    lay = buf.get_dispatch_layout(idx, 4)
    assert lay.num_tokens_per_rank.tolist() == [2] and lay.num_tokens_per_node.tolist() == [2]
    assert lay.num_tokens_per_expert.tolist() == [1, 1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_quantizer(dtype):
    x = (torch.randn(33, 384) * torch.logspace(-3, 3, 33).unsqueeze(1)).to(dtype)
    x[0] = 0  # all-zero rows stay zero with a finite scale
    data, scales = quantize_1x128(x)
    assert data.dtype == torch.float8_e4m3fn and scales.shape == (33, 3)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # powers of two
    deq = dequantize_1x128(data, scales)
    tile_max = x.float().abs().reshape(33, 3, 128).amax(2).repeat_interleave(128, 1)
    err = (deq - x.float()).abs()
    assert bool(err.le(tile_max * 2 ** -4).all())
    assert float(err.max()) > 0  # the check above would notice a broken quantizer: it is lossy
    assert torch.equal(deq[0], torch.zeros(384))


def test_single_rank_without_weights_and_fp8_pair():
    buf = Buffer()
    x = torch.randn(5, 256)
    idx = torch.tensor([[0, 1], [-1, -1], [2, 2], [3, -1], [1, 0]])
    out = buf.dispatch(x, idx, None, 4)
    assert out.recv_topk_weights is None
    assert torch.equal(out.recv_x, x[[0, 2, 3, 4]])  # token 1 picks no expert: sent nowhere
    assert torch.equal(out.recv_topk_idx, idx[[0, 2, 3, 4]])
    assert out.num_recv_tokens_per_expert_list == [2, 2, 2, 1]  # (token, k) pairs, repeats included
    y, event = buf.combine(out.recv_x, out.handle)
    event.wait()  # a completed event: a no-op
    assert torch.equal(y[1], torch.zeros(256)) and torch.equal(y[0], x[0])
    assert buf.stats.last.self_bytes == 4 * 256 * 4 and buf.stats.last.inter_node_bytes == 0


def test_node_layout_and_its_old_name():
    """``node_layout`` is the NodeLayout of a Buffer, a MoE layer and a VirtualGroup; ``layout`` is its old
    name, read-only."""
    from moekit import MoEConfig
    from moekit.ep import VirtualGroup
    from moekit.moe import MoE

    for obj, world in ((Buffer(), 1), (MoE(MoEConfig.preset("tiny")), 1), (VirtualGroup(2, heap_bytes=1 << 16), 2)):
        assert obj.layout is obj.node_layout
        assert (obj.node_layout.world_size, obj.node_layout.ranks_per_node) == (world, world)
        with pytest.raises(AttributeError):
            obj.layout = obj.node_layout


def test_non_contiguous_inputs():
    buf = Buffer()
    x = torch.randn(64, 7).t()  # [7, 64], non-contiguous
    idx = torch.tensor([[0, 1, -1, 2, 3, 0, 1], [1, -1, -1, 0, 2, 3, 2]]).t()  # [7, 2], non-contiguous
    w = torch.rand(2, 7).t()
    assert not (x.is_contiguous() or idx.is_contiguous() or w.is_contiguous())
    out = buf.dispatch(x, idx, w, 4)
    keep = [0, 1, 3, 4, 5, 6]  # token 2 has no expert
    assert torch.equal(out.recv_x, x[keep]) and torch.equal(out.recv_topk_idx, idx[keep])
    assert torch.equal(out.recv_topk_weights, torch.where(idx[keep] >= 0, w[keep], 0.0))
    y, _ = buf.combine(out.recv_x.t().contiguous().t(), out.handle)
    assert torch.equal(y[keep], x[keep]) and torch.equal(y[2], torch.zeros(64))
