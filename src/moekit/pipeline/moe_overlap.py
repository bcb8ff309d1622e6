"""MoE-aware ``overlapped_forward_backward``: each micro-batch's all-to-alls hide behind the other's compute.

DualPipe pairs the forward of one micro-batch with the backward of another (an "F&B" op). For
pipeline stages made of :class:`MoEBlock`\\ s (a dense part, then ``moekit.MoE``), :class:`MoEStage`
implements the hook DeepSeek's package calls for such pairs. Per MoE layer there are four transfers,
and each one runs while the other micro-batch computes:

- forward: ``Buffer.dispatch`` and ``Buffer.combine``, launched with ``async_finish=True``;
- backward: the gradient of combine (a cached ``Buffer.dispatch`` along the forward's handle) and the
  gradient of dispatch (``Buffer.combine``), also launched with ``async_finish=True``.

How: the stage's forwards run ``MoE.forward_steps_cut``, which keeps the Buffer's own autograd out of
the graph and joins it again with the link Functions below, whose backward launches the transfer
through the Buffer's public API. The backward of the paired micro-batch runs as one autograd call on
a helper thread that strictly alternates with the calling thread (a coroutine, never two at once):

    forward  | F piece |  dispatch in flight  | F piece |  combine in flight   | ...
    backward |         | B piece |   dispatch-of-grads in flight   | B piece | ...

The forward runs until it launches a transfer, then the backward runs until it launches one (or
ends), then the forward waits for its own transfer and goes on, and so on. Because the graph is the
same graph and autograd walks it in the same order, the gradients are bitwise those of a plain
forward-then-backward (and of ``moekit.MoE``'s own autograd; tested). Outside an F&B pair the links
run their transfers synchronously. On the CPU a transfer is gloo work in the background; on a GPU it
runs on the Buffer's communication stream. With ``record=True`` a stage keeps ``PhaseRecord``\\ s:
"F" forward pieces and "B" backward pieces, "COMM" from launch to completion (in the chunk of the
stage that launched it; a backward's transfers also set ``microbatch_b`` and ``chunk_b``).

Shape legend: T = tokens of a micro-batch (all leading dims flattened), H = hidden size, K = experts
per token, M = rows this rank received in the dispatch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .. import dist as mdist
from ..moe.layer import run_steps
from .timeline import PhaseRecord
from .utils import run_backward


class MoEBlock(nn.Module):
    """``h = x + dense(norm1(x)); y = h + moe(norm2(h))``: a transformer block whose attention is stood in
    for by a dense SwiGLU MLP (any ``dense`` module of ``[..., H] -> [..., H]`` may replace it).

    ``moe`` is a ``moekit.MoE`` (or anything with its ``forward_steps`` generator; without
    ``forward_steps_cut`` too, the backward's transfers are not overlapped). Input and output ``[..., H]``.
    """

    def __init__(self, moe: nn.Module, dense: nn.Module | None = None):
        super().__init__()
        h = moe.config.hidden_size
        self.norm1 = nn.LayerNorm(h)
        if dense is None:
            from ..moe.experts import MLP

            dense = MLP(h, 2 * h)
        self.dense = dense
        self.norm2 = nn.LayerNorm(h)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.dense(self.norm1(x))
        return h + self.moe(self.norm2(h))

    def forward_steps(self, x: torch.Tensor, async_finish: bool = True):
        """Generator form of ``forward`` whose MoE transfers (forward and backward) go through the links
        where :func:`_cuts` allows: yields the forward's in-flight transfers (``EventOverlap``, with
        ``async_finish``; the caller may compute, then resumes, and this waits), returns the output
        ``[..., H]``, bitwise ``forward``'s."""
        h = x + self.dense(self.norm1(x))
        z = self.norm2(h)
        cut = _cuts(self.moe, z)  # a transfer not cut keeps the Buffer's autograd: synchronous in the backward
        if cut:
            m = yield from self.moe.forward_steps_cut(z, _link, async_finish=async_finish, cut=cut)
        else:
            m = yield from self.moe.forward_steps(z, async_finish=async_finish)
        return h + m


class MoEStage(nn.Module):
    """A pipeline stage of :class:`MoEBlock`\\ s with a MoE-aware ``overlapped_forward_backward``.

    Use two of them per rank with ``DualPipe`` / ``DualPipeV``: the engine calls the hook for every F&B
    pair. ``forward(x)``: ``[..., H] -> [..., H]`` (a fresh tensor, as pipeline stages must return); its
    graph carries the links whose backward transfers an F&B pair overlaps, so every micro-batch's
    backward can be overlapped, whichever op ran its forward.

    Args:
        blocks: the stage's blocks, in order.
        record: keep ``PhaseRecord``\\ s of the overlapped pairs in ``overlap_records``.
        rank, chunk: what those records say (default: this process's rank, chunk 0). Micro-batch
            numbers count this stage's forwards since ``clear_records()`` (-1: not known, e.g. the
            backward of a loss computed by the engine).
    """

    def __init__(self, blocks: list[MoEBlock], *, record: bool = False, rank: int | None = None, chunk: int = 0):
        super().__init__()
        if not blocks:
            raise ValueError("MoEStage needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.record = record
        self.rank = mdist.rank() if rank is None else rank
        self.chunk = chunk
        self.overlap_records: list[PhaseRecord] = []
        self._n_fwd = 0

    def clear_records(self) -> None:
        self.overlap_records = []
        self._n_fwd = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_steps(self._forward_steps(x, async_finish=False))

    def _forward_steps(self, x: torch.Tensor, async_finish: bool = True):
        for blk in self.blocks:
            x = yield from blk.forward_steps(x, async_finish)
        if torch.is_grad_enabled():
            x._moekit_stage_mb = self._n_fwd  # the forward's index, for the backward's records
        self._n_fwd += 1
        return x

    @classmethod
    def overlapped_forward_backward(cls, module0: MoEStage, inputs0, criterion0, labels0,
                                    module1: MoEStage, loss1, outputs1, output_grads1):
        """DeepSeek's hook: forward ``inputs0`` through ``module0`` while running the backward of
        ``module1`` (``loss1``, or ``outputs1`` with ``output_grads1``), each in the other's transfers.

        Returns ``(outputs0, loss0)``: the list of ``module0``'s outputs and ``criterion0(*outputs0,
        *labels0)`` (``None`` without criterion). Gradients land in ``.grad`` as a plain backward's.
        """
        outputs1, output_grads1 = list(outputs1), list(output_grads1)
        top = loss1 if loss1 is not None else (outputs1[0] if len(outputs1) == 1 else None)
        mb_b = getattr(top, "_moekit_stage_mb", -1)

        def backward():
            if loss1 is not None:
                loss1.backward()
                loss1.detach_()
            elif outputs1:
                run_backward(outputs1, output_grads1)

        runner = _BackwardRunner(backward, module1, mb_b)
        mb_f = module0._n_fwd
        steps = module0._forward_steps(*inputs0)
        try:
            t = time.time()
            while True:
                try:
                    event = next(steps)
                except StopIteration as stop:
                    out0 = stop.value
                    break
                finally:
                    module0._note("F", mb_f, t)
                launched = time.time()
                runner.resume()  # the backward computes until it launches a transfer, or ends
                event.wait()
                module0._note("COMM", mb_f, launched)
                t = time.time()
            loss0 = None
            if criterion0 is not None:
                loss0 = criterion0(out0, *labels0)
                if isinstance(loss0, torch.Tensor):
                    loss0._moekit_stage_mb = mb_f
            runner.finish()  # what is left of the backward: nothing of the forward to hide behind
        except BaseException:
            runner.abort()
            raise
        return [out0], loss0

    def _note(self, phase: str, mb: int, start: float, backward: bool = False) -> None:
        # A backward's transfer says so with microbatch_b / chunk_b (the forward's leave them None).
        if self.record:
            extra = (mb, self.chunk) if backward else (None, None)
            self.overlap_records.append(PhaseRecord(self.rank, phase, self.chunk, mb, start, time.time(), *extra))


# -- the backward as a coroutine ----------------------------------------------------------------

_ACTIVE: _BackwardRunner | None = None  # the runner whose backward is running now (one per process)


class _Aborted(Exception):
    """Raised inside a paused backward whose F&B pair failed on the other side."""


class _Worker:
    """The helper thread of this process (started on first use; one is enough: pairs do not nest)."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="moekit-fb-backward", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.jobs.get()._main()


_WORKER: _Worker | None = None


def _worker() -> _Worker:
    global _WORKER
    if _WORKER is None or not _WORKER.thread.is_alive():  # (a forked child inherits no threads)
        _WORKER = _Worker()
    return _WORKER


class _BackwardRunner:
    """One micro-batch's backward on the helper thread, which runs only while the owner thread waits.

    ``resume()`` (owner) lets the backward run until a link launches a transfer and calls ``handoff()``,
    or until it ends; errors of the backward re-raise in ``resume()``. A thread rather than a generator
    because the transfers are launched from inside autograd, which cannot yield.
    """

    def __init__(self, fn: Callable[[], None], stage: MoEStage, mb: int):
        self._fn, self._stage, self._mb = fn, stage, mb
        self._owner = threading.get_ident()
        # A new thread starts with OpenMP's default team size, not the one set here (e.g. 1 per rank):
        # without this the helper's ops oversubscribe the cores.
        self._threads = torch.get_num_threads()
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._started = False
        self._abort = False
        self._error: BaseException | None = None
        self._piece = 0.0
        self.done = False

    def _main(self) -> None:
        self._go.acquire()
        try:
            if not self._abort:
                if torch.get_num_threads() != self._threads:
                    torch.set_num_threads(self._threads)
                self._piece = time.time()
                self._fn()
                self._stage._note("B", self._mb, self._piece)
        except BaseException as err:  # handed to the owner thread
            self._error = err
        finally:
            self.done = True
            self._back.release()

    def resume(self) -> None:
        global _ACTIVE
        if self.done:
            return
        if not self._started:
            self._started = True
            _worker().jobs.put(self)
        _ACTIVE = self
        self._go.release()
        self._back.acquire()
        if self.done:
            _ACTIVE = None
            if self._error is not None and not isinstance(self._error, _Aborted):
                raise self._error

    def finish(self) -> None:
        while not self.done:
            self.resume()

    def abort(self) -> None:
        self._abort = True
        try:
            self.finish()
        except BaseException:  # the owner's error is the one that propagates
            pass

    def in_backward(self) -> bool:
        """True on the threads that run this backward (the helper, or autograd's device threads)."""
        return threading.get_ident() != self._owner

    def handoff(self) -> None:
        """(Backward side) A transfer was launched: let the owner run until it resumes us."""
        self._stage._note("B", self._mb, self._piece)
        self._back.release()
        self._go.acquire()
        if self._abort:
            raise _Aborted("the F&B pair's forward failed")

    def transfer_done(self, launched: float) -> None:
        self._stage._note("COMM", self._mb, launched, backward=True)
        self._piece = time.time()


def _run_transfers(launch: Callable[[bool], list]) -> None:
    """Launch a backward transfer (``launch(async_finish)`` → events) and complete it; inside an F&B
    pair, the other micro-batch computes in between."""
    runner = _ACTIVE
    if runner is None or not runner.in_backward():
        for ev in launch(False):
            ev.wait()
        return
    launched = time.time()
    events = launch(True)
    runner.handoff()
    for ev in events:
        ev.wait()
    runner.transfer_done(launched)


# -- links: the Buffer's transfers as autograd nodes ----------------------------------------------

class _DispatchLink(torch.autograd.Function):
    """``(x [T, H], topk_weights [T, K]) → (recv_x [M, H], recv_topk_weights [M, K])``, the received
    tensors of a completed dispatch. Backward: ``Buffer.combine`` of ``grad_recv_x`` and of
    ``grad_recv_topk_weights`` masked to this rank's experts, as the Buffer's own autograd does."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, handle, recv_idx, received):
        ctx.buffer, ctx.handle, ctx.recv_idx = buffer, handle, recv_idx
        # Rows of a combine travel in the dispatched x's dtype (the handle's; our x is never an FP8 pair).
        ctx.wire_dtype, ctx.hidden = x.dtype, x.shape[1]
        ctx.linked_w = topk_weights is not None
        ctx.rows, ctx.device = received[0].shape[0], received[0].device
        return tuple(received)  # tensors made by the Buffer, not inputs: they take this node as grad_fn

    @staticmethod
    def backward(ctx, grad_x, grad_w=None):
        # Both transfers run whatever this rank needs (zeros where it needs nothing), as in the Buffer's
        # own backward: the peers' ranks may need the other gradient, and a collective must match.
        if grad_x is None:
            grad_x = torch.zeros(ctx.rows, ctx.hidden, dtype=ctx.wire_dtype, device=ctx.device)
        out: dict[str, torch.Tensor] = {}

        def launch(async_finish: bool) -> list:
            gw = None
            if ctx.linked_w:
                gw = torch.zeros_like(ctx.recv_idx, dtype=torch.float32) if grad_w is None else \
                    torch.where(ctx.recv_idx >= 0, grad_w, 0.0).float()  # [M, K]
            # One combine carries both: topk_weights' gradient travels as fp32 (each (token, k) is nonzero on
            # one rank only, so its fp32 sum is exact), as in the Buffer's own backward.
            c = ctx.buffer.combine(grad_x.contiguous(), ctx.handle, topk_weights=gw, async_finish=async_finish)
            out["x"] = c.combined_x
            if ctx.linked_w:
                out["w"] = c.combined_topk_weights
            return [c.event]

        _run_transfers(launch)
        gx = out["x"] if ctx.needs_input_grad[0] else None
        gw = out["w"] if ctx.linked_w and ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None, None


class _CombineLink(torch.autograd.Function):
    """``expert_out [M, H] → combined [T, H]``, the result of a completed combine. Backward: a cached
    ``Buffer.dispatch`` of the gradient along the forward's handle."""

    @staticmethod
    def forward(ctx, x, buffer, handle, combined):
        ctx.buffer, ctx.handle = buffer, handle
        return combined

    @staticmethod
    def backward(ctx, grad):
        out = []

        def launch(async_finish: bool) -> list:
            d = ctx.buffer.dispatch(grad.contiguous(), None, None, None, handle=ctx.handle, async_finish=async_finish)
            out.append(d.recv_x)
            return [d.event]

        _run_transfers(launch)
        return out[0], None, None, None


def _split_exact(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(No longer used by the backward, which sends the weights' gradient through ``combine(topk_weights=)``.)
    fp32 ``v [M, K]`` as ``P`` parts ``[M, P*K]`` of ``dtype`` whose fp32 sum, in order, is exactly ``v``:
    one part for fp32; for bf16 three, each the top 8 significant bits of what is left (truncated, so
    nothing rounds up to inf). Exact for 0 and for |v| >= 2^-110 (~8e-34; below it the last part would
    need bits under bf16's smallest subnormal, and rounds). inf / nan go whole."""
    if dtype == torch.float32:
        return v
    assert dtype == torch.bfloat16, dtype
    finite = torch.isfinite(v)

    def top(t):  # the bf16 that t's upper 16 bits are
        return (t.view(torch.int32) & -65536).view(torch.float32)

    hi = torch.where(finite, top(v), v)
    r = torch.where(finite, v - hi, 0.0)  # exact: the bits of v below hi's
    mid = top(r)
    lo = r - mid  # exact, at most 8 significant bits
    return torch.cat([hi.to(dtype), mid.to(dtype), lo.to(dtype)], dim=1)


def _join_exact(parts: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_split_exact`: ``[T, P*K]`` → fp32 ``[T, K]``."""
    out = parts[:, :k].float()
    for p in range(1, parts.shape[1] // k):
        out = out + parts[:, p * k:(p + 1) * k].float()
    return out.contiguous()


def _cuts(moe: nn.Module, x: torch.Tensor) -> tuple[str, ...]:
    """Which of the MoE's transfers the public Buffer API can run backward bitwise as the Buffer's own
    autograd does: the combine's gradient (a cached dispatch) not after an FP8 dispatch (that handle's
    cached dispatch is FP8, the gradient is not); the dispatch's gradient for fp32 and bf16 x (fp16 could
    be cut too now that combine carries topk_weights' gradient as fp32; not enabled yet)."""
    if not hasattr(moe, "forward_steps_cut"):
        return ()
    cut = []
    if x.dtype in (torch.float32, torch.bfloat16):
        cut.append("dispatch")
    if not getattr(getattr(moe, "config", None), "dispatch_fp8", False):
        cut.append("combine")
    return tuple(cut)


def _link(kind: str, buffer, handle, inputs: tuple, outputs: tuple, recv_topk_idx):
    """The ``link`` of ``MoE.forward_steps_cut``: puts the completed transfer back into the graph."""
    if kind == "dispatch":
        (x, w), (recv_x, recv_w) = inputs, outputs
        if recv_w is None or w is None:  # dispatched without weights: link x only
            (recv_x,) = _DispatchLink.apply(x, None, buffer, handle, recv_topk_idx, (recv_x,))
            return recv_x, recv_w
        return _DispatchLink.apply(x, w, buffer, handle, recv_topk_idx, (recv_x, recv_w))
    assert kind == "combine", kind
    return (_CombineLink.apply(inputs[0], buffer, handle, outputs[0]),)
