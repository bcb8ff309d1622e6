"""Aux-loss-free bias update, sequence-wise aux loss and load statistics against plain references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.routing.balance import (
    ExpertLoad,
    attach_aux_loss,
    imbalance,
    sequence_aux_loss,
    tokens_per_expert,
    update_bias,
)
from moekit.testing import spawn


def test_tokens_per_expert_ignores_minus_one():
    idx = torch.tensor([[0, 3, -1], [3, -1, -1], [2, 0, 3]])
    assert tokens_per_expert(idx, 5).tolist() == [2, 0, 1, 3, 0]
    assert tokens_per_expert(torch.empty(0, 4, dtype=torch.int64), 3).tolist() == [0, 0, 0]
    idx = torch.randint(-1, 7, (50, 3))
    ref = torch.bincount(idx[idx >= 0], minlength=7)
    assert torch.equal(tokens_per_expert(idx, 7), ref)


def test_expert_load_periods():
    load = ExpertLoad(4)
    load.record(torch.tensor([[0, 1], [1, -1]]))
    load.record(torch.tensor([[3, 1]]))
    assert load.last.tolist() == [0, 1, 0, 1]
    assert load.take_pending().tolist() == [1, 3, 0, 1]
    assert load.pending.tolist() == [0, 0, 0, 0]
    assert load.total.tolist() == [1, 3, 0, 1]
    load.reset()
    assert load.total.tolist() == [0, 0, 0, 0]


def test_imbalance():
    assert imbalance(torch.tensor([2, 2, 2])) == 1.0
    assert imbalance(torch.tensor([4, 0, 2])) == 2.0
    assert imbalance(torch.zeros(3)) == 1.0


def test_update_bias_single_rank():
    bias = [torch.zeros(4), torch.full((4,), 0.5)]
    loads = [torch.tensor([5, 1, 3, 3]), torch.tensor([0, 0, 0, 0])]
    out = update_bias(bias, loads, gamma=0.1)
    # mean 3: expert 0 overloaded (-gamma), 1 underloaded (+gamma), 2 and 3 at the mean (unchanged).
    torch.testing.assert_close(bias[0], torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(bias[1], torch.full((4,), 0.5))
    assert out.imbalance == [5 / 3, 1.0] and out.load.tolist() == [[5, 1, 3, 3], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="biases"):
        update_bias(bias, loads[:1], 0.1)
    with pytest.raises(ValueError, match="gamma must be >= 0, got -0.1"):
        update_bias(bias, loads, -0.1)
    with pytest.raises(ValueError, match=r"loads\[1\] the same shape, got \[4\] and \[5\]"):
        update_bias(bias, [loads[0], torch.zeros(5, dtype=torch.int64)], 0.1)


def _update_bias_rank(rank, world, loads):
    bias = [torch.zeros(loads.shape[-1]), torch.zeros(loads.shape[-1])]
    out = update_bias(bias, [loads[rank], loads[rank] * 0 + rank], gamma=0.01)
    return [b.clone() for b in bias], out.load


def test_update_bias_all_reduces_identically():
    world, e = 4, 6
    loads = torch.randint(0, 9, (world, e))
    results = spawn(_update_bias_rank, world, loads)
    total = loads.sum(0)
    ref = 0.01 * torch.sign(total.double().mean() - total.double()).float()
    for biases, load in results:
        assert torch.equal(load[0], total)
        assert torch.equal(biases[0], results[0][0][0])  # bit-identical on every rank
        torch.testing.assert_close(biases[0], ref)
        torch.testing.assert_close(biases[1], torch.zeros(e))  # every expert loaded equally (sum of ranks)


def reference_seq_aux(scores, topk_idx, alpha, seq_len, norm):
    scores, total = scores.double(), 0.0
    t, e = scores.shape
    k = topk_idx.shape[1]
    nseq = t // seq_len
    for b in range(nseq):
        s = scores[b * seq_len:(b + 1) * seq_len]
        idx = topk_idx[b * seq_len:(b + 1) * seq_len]
        probs = s / s.sum(-1, keepdim=True) if norm else s
        loss = 0.0
        for i in range(e):
            f = e / (k * seq_len) * int((idx == i).sum())
            loss = loss + f * probs[:, i].mean()
        total = total + loss
    return alpha * total / nseq


@settings(deadline=None, max_examples=15)
@given(b=st.integers(1, 3), s=st.integers(1, 6), e=st.sampled_from([4, 8]), k=st.integers(1, 3),
       norm=st.booleans(), seed=st.integers(0, 1000))
def test_sequence_aux_loss_matches_reference(b, s, e, k, norm, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b * s, e, generator=gen, dtype=torch.float64)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(b * s)])
    idx[0, 0] = -1  # a masked slot counts for nobody
    a = logits.clone().requires_grad_()
    got = sequence_aux_loss(torch.sigmoid(a), idx, 0.3, s, norm)
    got.backward()
    r = logits.clone().requires_grad_()
    ref = reference_seq_aux(torch.sigmoid(r), idx, 0.3, s, norm)
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(a.grad, r.grad)


def test_sequence_aux_loss_edges():
    assert float(sequence_aux_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64), 1.0)) == 0.0
    with pytest.raises(ValueError, match="seq_len"):
        sequence_aux_loss(torch.rand(6, 4), torch.zeros(6, 2, dtype=torch.int64), 1.0, seq_len=4)
    with pytest.raises(ValueError, match=r"topk_idx \[T, K\], got \[6, 4\] and \[5, 2\]"):
        sequence_aux_loss(torch.rand(6, 4), torch.zeros(5, 2, dtype=torch.int64), 1.0)
    # Perfect balance with uniform scores gives alpha * 1 (f_i = 1, sum P_i = 1).
    e = 4
    idx = torch.tensor([[0, 1], [2, 3]])
    torch.testing.assert_close(sequence_aux_loss(torch.full((2, e), 0.5), idx, 0.1), torch.tensor(0.1))


def test_attach_aux_loss_adds_its_gradient():
    w = torch.randn(3, requires_grad=True)
    y = w * 2
    aux = (w ** 2).sum()
    out = attach_aux_loss(y, aux)
    torch.testing.assert_close(out, y)
    out.sum().backward()
    torch.testing.assert_close(w.grad, 2 + 2 * w.detach())
