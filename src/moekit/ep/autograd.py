"""Differentiable dispatch/combine: the gradient of a dispatch is a combine and vice versa.

The Functions wrap an already-planned exchange (``run``) so that the collective parts that are not
differentiable (validation, counts exchange, planning) stay outside autograd.
"""

from __future__ import annotations

import torch


class DispatchFn(torch.autograd.Function):
    """``(x [T, H], topk_weights [T, K]) → (recv_x [M, H], recv_topk_idx [M, K], recv_topk_weights [M, K])``.

    Backward: combine of ``grad_recv_x`` and of ``grad_recv_topk_weights`` masked to the entries of
    experts on the receiving rank (each (token, k) weight lives on exactly one rank).
    """

    @staticmethod
    def forward(ctx, buffer, handle, run, x, topk_weights):
        recv_x, recv_idx, recv_w = run()
        ctx.buffer, ctx.handle = buffer, handle
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
        out_x, out_w = ctx.buffer._combine_grads(ctx.handle, gx, gw, ctx.x_dtype)
        return None, None, None, (out_x if ctx.x_grad else None), (out_w if ctx.w_grad else None)


class CombineFn(torch.autograd.Function):
    """``x [M, H] → combined_x [T, H]``; backward: a (cached) dispatch of the gradient."""

    @staticmethod
    def forward(ctx, buffer, handle, run, x):
        ctx.buffer, ctx.handle = buffer, handle
        return run()

    @staticmethod
    def backward(ctx, grad_out):
        return None, None, None, ctx.buffer._dispatch_grads(ctx.handle, grad_out)
