"""Tiny pipeline stages and the single-process reference the pipeline tests compare against."""

from __future__ import annotations

import torch
import torch.nn as nn

from moekit.pipeline import WeightGradStore, backward_chunk

H = 4  # hidden size: tiny, so that 8 ranks on 2 cores stay cheap
MB = 2  # rows per micro-batch
DTYPE = torch.float64


class ZBLinearFn(torch.autograd.Function):
    """y = x @ w.T whose weight gradient can be deferred to WeightGradStore (zero-bubble W)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors

        def weight_grad():
            dw = g.flatten(0, -2).T @ x.flatten(0, -2)
            w.grad = dw if w.grad is None else w.grad + dw

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return g @ w, None


class Stage(nn.Module):
    """tanh(x W1^T) W2^T + b: two deferrable matmuls and one ordinary parameter."""

    def __init__(self, seed: int, hidden: int = H):
        super().__init__()
        g = torch.Generator().manual_seed(1000 + seed)
        self.w1 = nn.Parameter(torch.randn(2 * hidden, hidden, generator=g, dtype=DTYPE) / hidden ** 0.5)
        self.w2 = nn.Parameter(torch.randn(hidden, 2 * hidden, generator=g, dtype=DTYPE) / hidden ** 0.5)
        self.b = nn.Parameter(torch.randn(hidden, generator=g, dtype=DTYPE) * 0.1)

    def forward(self, x):
        return ZBLinearFn.apply(torch.tanh(ZBLinearFn.apply(x, self.w1)), self.w2) + self.b


class OverlapStage(Stage):
    """A Stage with DeepSeek's overlapped_forward_backward hook (plain F then B); counts its calls."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        backward_chunk(loss1, outputs1, output_grads1)
        return outputs0, loss0


def criterion(out, label):
    return ((out - label) ** 2).mean()


def batch(num_chunks: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_chunks * MB, H, generator=g, dtype=DTYPE)
    y = torch.randn(num_chunks * MB, H, generator=g, dtype=DTYPE)
    return x, y


def reference(num_stages: int, num_chunks: int, seed: int):
    """Sequential run over the same micro-batches: per-micro-batch losses, outputs, per-stage grads."""
    stages = [Stage(s) for s in range(num_stages)]
    x, y = batch(num_chunks, seed)
    losses, outs = [], []
    for xm, ym in zip(x.tensor_split(num_chunks), y.tensor_split(num_chunks)):
        h = xm
        for s in stages:
            h = s(h)
        loss = criterion(h, ym)
        loss.backward()
        losses.append(loss.detach())
        outs.append(h.detach())
    grads = [{n: p.grad.clone() for n, p in s.named_parameters()} for s in stages]
    return torch.stack(losses), torch.cat(outs), grads


class TwoStage(nn.Module):
    """Two tensors in, two out, batch on dim 1: ``(a, b) [1, rows, H]`` -> ``(Stage(a), tanh(b) * Stage(a))``."""

    def __init__(self, seed: int):
        super().__init__()
        self.inner = Stage(seed)

    def forward(self, a, b):
        u = self.inner(a)
        return u, torch.tanh(b) * u


def two_criterion(u, v, label):
    return ((u - label) ** 2).mean() + (v * label).mean()


def two_reference(num_stages: int, num_chunks: int, a, b, y):
    """Per-micro-batch losses and (u, v) outputs of the TwoStage chain, batch on dim 1."""
    stages = [TwoStage(s) for s in range(num_stages)]
    losses, us, vs = [], [], []
    for am, bm, ym in zip(a.tensor_split(num_chunks, 1), b.tensor_split(num_chunks, 1), y.tensor_split(num_chunks, 1)):
        u, v = am, bm
        for s in stages:
            u, v = s(u, v)
        loss = two_criterion(u, v, ym)
        loss.backward()
        losses.append(loss.detach())
        us.append(u.detach())
        vs.append(v.detach())
    grads = [{n: p.grad.clone() for n, p in s.named_parameters()} for s in stages]
    return torch.stack(losses), torch.cat(us, 1), torch.cat(vs, 1), grads
