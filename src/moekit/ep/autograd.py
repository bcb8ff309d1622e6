"""Differentiable dispatch/combine: the gradient of a dispatch is a combine and vice versa.

The Functions wrap an already-planned exchange (``run``) so that the collective parts that are not
differentiable (validation, counts exchange, planning) stay outside autograd. Their backward passes go
through a :class:`Backward`: the Buffer's transport and traffic counters, nothing else of the Buffer.
"""

from __future__ import annotations

import torch

from .errors import OK, Code, Status
from .handle import DispatchHandle
from .stats import TrafficStats
from .transport import Rows, Transport
from .wire import RowFormat


def _check_grad(name: str, g, rows: int, width: int, device: torch.device) -> None:
    """A gradient reaching a backward exchange must be a floating ``[rows, width]`` tensor on ``device``."""
    if not isinstance(g, torch.Tensor) or g.layout != torch.strided or g.dim() != 2 \
            or tuple(g.shape) != (rows, width) or not g.is_floating_point() or g.device != device:
        got = (f"a {type(g).__name__}" if not isinstance(g, torch.Tensor) else
               f"{list(g.shape)} {g.dtype} ({g.layout}) on {g.device}")
        raise ValueError(f"the gradient of {name} must be a floating point [{rows}, {width}] strided tensor on "
                         f"{device}, got {got}")


class Backward:
    """The exchanges of the backward passes, over ``transport``; traffic recorded in ``stats``.

    Faults: any exception while a rank prepares its rows (a gradient of the wrong shape, dtype or device,
    an allocation failure) becomes its status word (``guard.status_of``); the rank still sends rows of the
    handle's size, zeros, with that status in the status row of each chunk, so every rank raises the same
    error naming the rank (with the exception's text: one more small exchange, as in ``Guard.raise_first``).
    """

    def __init__(self, transport: Transport, stats: TrafficStats, guard=None):
        self.transport, self.stats, self.guard = transport, stats, guard

    def _status_of(self, err: BaseException) -> Status:
        if self.guard is None:
            raise err
        return self.guard.status_of(err)

    def _wait(self, op: str, transfer) -> dict:
        try:
            return transfer.wait()
        except Exception as err:
            s = getattr(err, "moekit_status", None)
            if self.guard is not None and s is not None and s.code == Code.EXCEPTION:
                # Every rank raised this status: the failing rank's text follows (collective).
                self.guard.raise_first(op, [s.ints()], self.transport)
            raise

    def combine_grads(self, h: DispatchHandle, gx, gw, x_dtype):
        """Backward of dispatch: combine of ``gx`` [M, H] and ``gw`` [M, K] (either may be None).

        The row format comes from the handle alone (x in its dtype unless the dispatch was FP8, w when it had
        weights), so that ranks whose inputs need different gradients still send rows of one size.
        Returns ``(grad_x [T, H] in x_dtype or None, grad_w [T, K] float32 or None)``. Blocking.
        """
        device, m = h.send_token.device, h.num_recv_tokens
        op = "dispatch (backward)"
        want_x = gx is not None
        spec = ([] if h.fp8 else [("x", h.x_dtype, h.hidden)])  # an FP8 dispatch is not differentiable in x
        if h.has_weights:
            spec.append(("w", torch.float32, h.topk_idx.shape[1]))
        assert spec, "a dispatch with neither float x nor weights has no gradient"
        status, fields = OK, {}
        try:  # any exception while preparing this rank's rows becomes its status (see the class)
            n = max(h.num_worst_tokens, m)  # rows of recv_x
            if want_x and not h.fp8:
                _check_grad("recv_x", gx, n, h.hidden, device)
            if gw is not None:
                _check_grad("recv_topk_weights", gw, n, h.topk_idx.shape[1], device)
            if h.num_worst_tokens:  # the padding rows of a num_worst_tokens dispatch were never sent
                gx, gw = (g[:m] if g is not None else None for g in (gx, gw))
            if not h.fp8:
                gx = gx if want_x else torch.zeros(m, h.hidden, dtype=h.x_dtype, device=device)
                fields["x"] = gx.to(h.x_dtype).contiguous()
            if h.has_weights:
                k = h.topk_idx.shape[1]
                fields["w"] = gw.float() if gw is not None else torch.zeros(m, k, dtype=torch.float32, device=device)
        except Exception as err:  # noqa: BLE001 - reported on every rank from the status rows
            status = self._status_of(err)
            fields = {name: torch.zeros(m, width, dtype=dtype, device=device) for name, dtype, width in spec}
        transfer = self.transport.combine(op, h, Rows(RowFormat(spec), fields, status))
        self.stats.record(transfer.traffic)
        got = self._wait(op, transfer)
        out_x = got["x"].to(x_dtype) if want_x and x_dtype is not None else None
        return out_x, (got.get("w") if gw is not None else None)

    def dispatch_grads(self, h: DispatchHandle, g: torch.Tensor) -> torch.Tensor:
        """Backward of combine: dispatch of ``g`` [T, H] along the handle's routes, in the handle's dtype.
        Returns ``[M, H]`` in g's dtype. Blocking."""
        op = "combine (backward)"
        fmt = RowFormat([("x", h.x_dtype, h.hidden)])
        device, status = h.send_token.device, OK
        try:  # any exception while preparing this rank's rows becomes its status (see the class)
            _check_grad("combined_x", g, h.num_tokens, h.hidden, device)
            rows = g.to(h.x_dtype).contiguous()
        except Exception as err:  # noqa: BLE001 - reported on every rank from the status rows
            status = self._status_of(err)
            rows = torch.zeros(h.num_tokens, h.hidden, dtype=h.x_dtype, device=device)
        transfer = self.transport.dispatch(op, h, Rows(fmt, {"x": rows}, status))
        self.stats.record(transfer.traffic)
        return self._wait(op, transfer)["x"].to(g.dtype)


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
