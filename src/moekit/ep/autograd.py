"""Differentiable dispatch/combine: the gradient of a dispatch is a combine and vice versa.

The Functions wrap an already-planned exchange (``run``) so that the collective parts that are not
differentiable (validation, counts exchange, planning) stay outside autograd. Their backward passes
go through the dispatcher's :class:`GradExchange` (``moekit.Buffer``'s is :class:`Backward`, over its
transport; ``NaiveBuffer`` has its own), and each one completes its transfer through the
:data:`~moekit.ep.dispatcher.BackwardHook` captured from the forward call (:func:`wait_now` unless the
caller passed one): an overlapping schedule lets other work run while the backward's transfer is in
flight (``moekit.pipeline.MoEStage``, as DualPipe's F&B pairs in DeepSeek-V3 §3.2.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .dispatcher import BackwardHook
from .errors import OK, Code, Status
from .event import EventOverlap
from .handle import DispatchHandle
from .transport import Rows, Transport
from .wire import RowFormat


def wait_now(launch: Callable[[bool], EventOverlap]) -> None:
    """The default :data:`BackwardHook`: the transfer runs synchronously (nothing to overlap it with)."""
    launch(False).wait()


class GradExchange(Protocol):
    """The backward exchanges of a dispatcher, as :class:`DispatchFn` / :class:`CombineFn` call them.

    Both are collective and complete their transfer through ``hook`` (:data:`BackwardHook`) before they
    return; every rank must send rows of the same format whatever gradients it holds (zeros where none).
    """

    def combine_grads(self, handle, gx: torch.Tensor | None, gw: torch.Tensor | None, x_dtype: torch.dtype | None,
                      hook: BackwardHook) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Backward of dispatch: ``gx [M, H]`` and ``gw [M, K]`` fp32 (either may be None) summed home →
        ``(grad_x [T, H] in x_dtype or None, grad_w [T, K] fp32 or None)``. ``x_dtype`` None: the
        dispatch was not differentiable in x (an FP8 dispatch without ``dequantize``): no x rows."""

    def dispatch_grads(self, handle, g: torch.Tensor, hook: BackwardHook) -> torch.Tensor:
        """Backward of combine: ``g [T, H]`` sent along the handle's routes → ``[M, H]`` in g's dtype."""


def _check_grad(name: str, g, rows: int, width: int, device: torch.device) -> None:
    """A gradient reaching a backward exchange must be a floating ``[rows, width]`` tensor on ``device``."""
    if not isinstance(g, torch.Tensor) or g.layout != torch.strided or g.dim() != 2 \
            or tuple(g.shape) != (rows, width) or not g.is_floating_point() or g.device != device:
        got = (f"a {type(g).__name__}" if not isinstance(g, torch.Tensor) else
               f"{list(g.shape)} {g.dtype} ({g.layout}) on {g.device}")
        raise ValueError(f"the gradient of {name} must be a floating point [{rows}, {width}] strided tensor on "
                         f"{device}, got {got}")


class Backward:
    """``moekit.Buffer``'s :class:`GradExchange`: the exchanges of the backward passes over ``transport``.

    ``launch`` is the Buffer's ``_launch(start, post, async_finish, device, inputs) -> EventOverlap`` (the
    one path of every exchange: the communication stream on a GPU when asynchronous, traffic recorded).
    The received rows are copied into tensors allocated here, on the calling stream, as the forward
    calls' outputs are.

    Faults: any exception while a rank prepares its rows (a gradient of the wrong shape, dtype or device,
    an allocation failure) becomes its status word (``guard.status_of``); the rank still sends rows of the
    handle's size, zeros, with that status in the status row of each chunk, so every rank raises the same
    error naming the rank (with the exception's text: one more small exchange, as in ``Guard.raise_first``).
    """

    def __init__(self, transport: Transport, launch: Callable[..., EventOverlap], guard=None):
        self.transport, self.launch, self.guard = transport, launch, guard

    def _status_of(self, err: BaseException) -> Status:
        if self.guard is None:
            raise err
        return self.guard.status_of(err)

    def _exchange(self, op: str, hook: BackwardHook, start, post, device: torch.device, inputs) -> None:
        try:
            hook(lambda async_finish: self.launch(start, post, async_finish, device, inputs))
        except Exception as err:
            s = getattr(err, "moekit_status", None)
            if self.guard is not None and s is not None and s.code == Code.EXCEPTION:
                # Every rank raised this status: the failing rank's text follows (collective).
                self.guard.raise_first(op, [s.ints()], self.transport)
            raise

    def combine_grads(self, h: DispatchHandle, gx, gw, x_dtype, hook: BackwardHook = wait_now):
        """:meth:`GradExchange.combine_grads` as one combine of x and w rows.

        The row format comes from the handle (w when the dispatch had weights) and from whether the
        dispatch was differentiable in x (x rows in the handle's dtype unless it was FP8 without
        ``dequantize``), so that ranks whose inputs need different gradients still send rows of one size.
        """
        device, m, t = h.send_token.device, h.num_recv_tokens, h.num_tokens
        op = "dispatch (backward)"
        want_x, x_rows = gx is not None, x_dtype is not None
        assert x_rows or h.fp8, "a float dispatch always sends x rows back"
        spec = [("x", h.x_dtype, h.hidden)] if x_rows else []
        if h.has_weights:
            spec.append(("w", torch.float32, h.topk_idx.shape[1]))
        assert spec, "a dispatch with neither float x nor weights has no gradient"
        status, fields = OK, {}
        try:  # any exception while preparing this rank's rows becomes its status (see the class)
            n = max(h.num_worst_tokens, m)  # rows of recv_x
            if want_x:
                _check_grad("recv_x", gx, n, h.hidden, device)
            if gw is not None:
                _check_grad("recv_topk_weights", gw, n, h.topk_idx.shape[1], device)
            if h.num_worst_tokens:  # the padding rows of a num_worst_tokens dispatch were never sent
                gx, gw = (g[:m] if g is not None else None for g in (gx, gw))
            if x_rows:
                gx = gx if want_x else torch.zeros(m, h.hidden, dtype=h.x_dtype, device=device)
                fields["x"] = gx.to(h.x_dtype).contiguous()
            if h.has_weights:
                k = h.topk_idx.shape[1]
                fields["w"] = gw.float() if gw is not None else torch.zeros(m, k, dtype=torch.float32, device=device)
        except Exception as err:  # noqa: BLE001 - reported on every rank from the status rows
            status = self._status_of(err)
            fields = {name: torch.zeros(m, width, dtype=dtype, device=device) for name, dtype, width in spec}
        out_x = torch.empty(t, h.hidden, dtype=x_dtype, device=device) if want_x and x_rows else None
        out_w = torch.empty(t, h.topk_idx.shape[1], dtype=torch.float32, device=device) if gw is not None else None

        def post(got: dict[str, torch.Tensor]) -> None:
            if out_x is not None:
                out_x.copy_(got["x"])
            if out_w is not None:
                out_w.copy_(got["w"])

        self._exchange(op, hook, lambda cpu_async: self.transport.combine(
            op, h, Rows(RowFormat(spec), fields, status), async_op=cpu_async), post, device, list(fields.values()))
        return out_x, out_w

    def dispatch_grads(self, h: DispatchHandle, g: torch.Tensor, hook: BackwardHook = wait_now) -> torch.Tensor:
        """:meth:`GradExchange.dispatch_grads`: rows travel in the handle's dtype."""
        op = "combine (backward)"
        fmt = RowFormat([("x", h.x_dtype, h.hidden)])
        device, status = h.send_token.device, OK
        try:  # any exception while preparing this rank's rows becomes its status (see the class)
            _check_grad("combined_x", g, h.num_tokens, h.hidden, device)
            rows = g.to(h.x_dtype).contiguous()
        except Exception as err:  # noqa: BLE001 - reported on every rank from the status rows
            status = self._status_of(err)
            rows = torch.zeros(h.num_tokens, h.hidden, dtype=h.x_dtype, device=device)
        out = torch.empty(h.num_recv_tokens, h.hidden, dtype=g.dtype if isinstance(g, torch.Tensor) else h.x_dtype,
                          device=device)
        self._exchange(op, hook, lambda cpu_async: self.transport.dispatch(
            op, h, Rows(fmt, {"x": rows}, status), async_op=cpu_async), lambda got: out.copy_(got["x"]), device,
                       [rows])
        return out


class DispatchFn(torch.autograd.Function):
    """``(x [T, H], topk_weights [T, K]) → (recv_x [M, H], recv_topk_idx [M, K], recv_topk_weights [M, K])``.

    ``x`` None: not differentiable in x (an FP8 dispatch's rows); ``hook`` None: :func:`wait_now`.
    Backward: ``grads.combine_grads`` of ``grad_recv_x`` and of ``grad_recv_topk_weights`` masked to the
    entries of experts on the receiving rank (each (token, k) weight lives on exactly one rank).
    """

    @staticmethod
    def forward(ctx, grads: GradExchange, hook: BackwardHook | None, handle, run, x, topk_weights):
        recv_x, recv_idx, recv_w = run()
        ctx.grads, ctx.hook, ctx.handle = grads, hook or wait_now, handle
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
        out_x, out_w = ctx.grads.combine_grads(ctx.handle, gx, gw, ctx.x_dtype, ctx.hook)
        return None, None, None, None, (out_x if ctx.x_grad else None), (out_w if ctx.w_grad else None)


class CombineFn(torch.autograd.Function):
    """``x [M, H] → combined_x [T, H]``; backward: ``grads.dispatch_grads`` of the gradient (a cached
    dispatch), completed through ``hook`` (None: :func:`wait_now`)."""

    @staticmethod
    def forward(ctx, grads: GradExchange, hook: BackwardHook | None, handle, run, x):
        ctx.grads, ctx.hook, ctx.handle = grads, hook or wait_now, handle
        return run()

    @staticmethod
    def backward(ctx, grad_out):
        return None, None, None, None, ctx.grads.dispatch_grads(ctx.handle, grad_out, ctx.hook)
