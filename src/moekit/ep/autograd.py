"""Differentiable dispatch/combine: the gradient of a dispatch is a combine and vice versa.

The Functions wrap an already-planned exchange (``run``) so that the collective parts that are not
differentiable (validation, counts exchange, planning) stay outside autograd. Their backward passes go
through a :class:`Backward`: the Buffer's transport and traffic counters, nothing else of the Buffer.
"""

from __future__ import annotations

import torch

from .errors import OK
from .handle import DispatchHandle
from .stats import TrafficStats
from .transport import Rows, Transport
from .wire import RowFormat


class Backward:
    """The exchanges of the backward passes, over ``transport``; traffic recorded in ``stats``."""

    def __init__(self, transport: Transport, stats: TrafficStats):
        self.transport, self.stats = transport, stats

    def combine_grads(self, h: DispatchHandle, gx, gw, x_dtype):
        """Backward of dispatch: combine of ``gx`` [M, H] and ``gw`` [M, K] (either may be None).

        The row format comes from the handle alone (x in its dtype unless the dispatch was FP8, w when it had
        weights), so that ranks whose inputs need different gradients still send rows of one size.
        Returns ``(grad_x [T, H] in x_dtype or None, grad_w [T, K] float32 or None)``. Blocking.
        """
        device, m = h.send_token.device, h.num_recv_tokens
        if h.num_worst_tokens:  # the padding rows of a num_worst_tokens dispatch were never sent
            gx, gw = (g[:m] if g is not None else None for g in (gx, gw))
        spec, fields = [], {}
        want_x = gx is not None
        if not h.fp8:  # an FP8 dispatch is not differentiable in x on any rank
            gx = gx if want_x else torch.zeros(m, h.hidden, dtype=h.x_dtype, device=device)
            spec.append(("x", h.x_dtype, h.hidden))
            fields["x"] = gx.to(h.x_dtype).contiguous()
        if h.has_weights:
            k = h.topk_idx.shape[1]
            spec.append(("w", torch.float32, k))
            fields["w"] = gw.float() if gw is not None else torch.zeros(m, k, dtype=torch.float32, device=device)
        assert spec, "a dispatch with neither float x nor weights has no gradient"
        transfer = self.transport.combine("dispatch (backward)", h, Rows(RowFormat(spec), fields, OK))
        self.stats.record(transfer.traffic)
        got = transfer.wait()
        out_x = got["x"].to(x_dtype) if want_x and x_dtype is not None else None
        return out_x, (got.get("w") if gw is not None else None)

    def dispatch_grads(self, h: DispatchHandle, g: torch.Tensor) -> torch.Tensor:
        """Backward of combine: dispatch of ``g`` [T, H] along the handle's routes, in the handle's dtype.
        Returns ``[M, H]`` in g's dtype. Blocking."""
        fmt = RowFormat([("x", h.x_dtype, h.hidden)])
        transfer = self.transport.dispatch("combine (backward)", h,
                                           Rows(fmt, {"x": g.to(h.x_dtype).contiguous()}, OK))
        self.stats.record(transfer.traffic)
        return transfer.wait()["x"].to(g.dtype)


class DispatchFn(torch.autograd.Function):
    """``(x [T, H], topk_weights [T, K]) → (recv_x [M, H], recv_topk_idx [M, K], recv_topk_weights [M, K])``.

    Backward: combine of ``grad_recv_x`` and of ``grad_recv_topk_weights`` masked to the entries of
    experts on the receiving rank (each (token, k) weight lives on exactly one rank).
    """

    @staticmethod
    def forward(ctx, backward: Backward, handle, run, x, topk_weights):
        recv_x, recv_idx, recv_w = run()
        ctx.backward_ops, ctx.handle = backward, handle
        # Kept as attributes, not save_for_backward: with async_finish the tensors are filled in place
        # after this returns, which would trip the saved-tensor version check.
        ctx.recv_idx = recv_idx
        ctx.x_grad = x is not None and x.requires_grad
        ctx.w_grad = topk_weights is not None and topk_weights.requires_grad
        ctx.x_dtype = x.dtype if x is not None else None
        non_diff = [recv_idx] + ([] if ctx.x_grad else [recv_x])
        ctx.mark_non_differentiable(*[t for t in non_diff if t is not None])
        return recv_x, recv_idx, recv_w

    @staticmethod
    def backward(ctx, grad_x, grad_idx, grad_w):
        gx = grad_x if ctx.x_grad else None
        gw = None
        if ctx.w_grad and grad_w is not None:
            gw = torch.where(ctx.recv_idx >= 0, grad_w, 0.0)
        out_x, out_w = ctx.backward_ops.combine_grads(ctx.handle, gx, gw, ctx.x_dtype)
        return None, None, None, (out_x if ctx.x_grad else None), (out_w if ctx.w_grad else None)


class CombineFn(torch.autograd.Function):
    """``x [M, H] → combined_x [T, H]``; backward: a (cached) dispatch of the gradient."""

    @staticmethod
    def forward(ctx, backward: Backward, handle, run, x):
        ctx.backward_ops, ctx.handle = backward, handle
        return run()

    @staticmethod
    def backward(ctx, grad_out):
        return None, None, None, ctx.backward_ops.dispatch_grads(ctx.handle, grad_out)
