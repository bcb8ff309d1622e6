"""The one autograd pair of dispatch/combine (moekit.ep.autograd) on a one-rank Buffer: the backward
completes every transfer through the hook of its forward call, and FP8 rows are differentiable in x
only when dequantized (straight-through), as DeepEP's FP8 dispatch is not."""

import torch

from moekit.ep import Buffer


def _inputs(h=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, h, generator=g).requires_grad_()
    idx = torch.tensor([[0, 1], [1, -1], [0, 1], [-1, -1], [1, 0]])
    w = torch.rand(5, 2, generator=g).requires_grad_()
    return x, idx, w


def test_backward_transfers_go_through_the_forward_calls_hook():
    buf = Buffer()
    x, idx, w = _inputs()
    launched = []

    def hook(launch):
        launched.append(launch)
        launch(True).wait()  # asynchronous, then waited: the same gradients

    d = buf.dispatch(x, idx, w, 2, backward_hook=hook)
    y, _ = buf.combine(d.recv_x * d.recv_topk_weights.sum(1, keepdim=True), d.handle, backward_hook=hook)
    y.square().sum().backward()
    assert len(launched) == 2  # the combine's backward (a dispatch), then the dispatch's (a combine)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    d = buf.dispatch(x, idx, w, 2)  # default: wait_now
    y, _ = buf.combine(d.recv_x * d.recv_topk_weights.sum(1, keepdim=True), d.handle)
    y.square().sum().backward()
    assert torch.equal(x.grad, gx) and torch.equal(w.grad, gw)


def test_fp8_dispatch_is_straight_through_only_when_dequantized():
    buf = Buffer()
    x, idx, w = _inputs()
    plain = buf.dispatch(x, idx, w, 2, fp8=True)
    assert isinstance(plain.recv_x, tuple) and not plain.recv_x[0].requires_grad
    plain.recv_topk_weights.sum().backward()  # the weights stay differentiable, x does not
    assert x.grad is None and w.grad is not None
    d = buf.dispatch(x, idx, w, 2, fp8=True, dequantize=True)
    q, s = plain.recv_x
    assert d.recv_x.dtype == x.dtype and torch.equal(d.recv_x, (q.float() * s.repeat_interleave(128, 1)))
    gy = torch.randn_like(d.recv_x)
    (d.recv_x * gy).sum().backward()
    # One rank: each routed token's row comes back as it was; token 3 (no expert) was not sent.
    assert torch.equal(x.grad[[0, 1, 2, 4]], gy) and not x.grad[3].any()
