"""MoE-aware ``overlapped_forward_backward``: each micro-batch's all-to-alls hide behind the other's compute.

DualPipe pairs the forward of one micro-batch with the backward of another (an "F&B" op). For
pipeline stages made of :class:`MoEBlock`\\ s (a dense part, then ``moekit.MoE``), :class:`MoEStage`
implements the hook DeepSeek's package calls for such pairs. Per MoE layer there are four transfers,
and each one runs while the other micro-batch computes:

- forward: ``Buffer.dispatch`` and ``Buffer.combine``, launched with ``async_finish=True``;
- backward: the gradient of combine (a cached ``Buffer.dispatch`` along the forward's handle) and the
  gradient of dispatch (``Buffer.combine``), also launched with ``async_finish=True``.

How: the stage's forwards give each ``moekit.MoE`` an :class:`OverlapDispatcher` around its Buffer,
which passes the stage's :class:`FBCoroutine` as the ``backward_hook`` of every dispatch and combine.
The Buffer's own autograd (``moekit.ep.autograd``) keeps it in the graph; its backward launches the
transfer and hands it to that hook, which, inside an F&B pair, lets the other micro-batch run before
waiting. The backward of the paired micro-batch runs as one autograd call on a helper thread that
strictly alternates with the calling thread (a coroutine, never two at once):

    forward  | F piece |  dispatch in flight  | F piece |  combine in flight   | ...
    backward |         | B piece |   dispatch-of-grads in flight   | B piece | ...

The forward runs until it launches a transfer, then the backward runs until it launches one (or
ends), then the forward waits for its own transfer and goes on, and so on. Because the graph is the
same graph and autograd walks it in the same order, the gradients are bitwise those of a plain
forward-then-backward (tested). Outside an F&B pair the hook runs the transfers synchronously. On the
CPU a transfer is gloo work in the background; on a GPU it runs on the Buffer's communication stream.
With ``record=True`` a stage keeps ``PhaseRecord``\\ s: "F" forward pieces and "B" backward pieces,
"COMM" from launch to completion (in the chunk of the stage that launched it; a backward's transfers
also set ``microbatch_b`` and ``chunk_b``).

Shape legend: T = tokens of a micro-batch (all leading dims flattened), H = hidden size, K = experts
per token, M = rows this rank received in the dispatch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .. import dist as mdist
from ..moe.experts import MLP
from ..moe.layer import run_steps
from .timeline import PhaseRecord
from .utils import backward_chunk

if TYPE_CHECKING:  # (importing moekit.ep loads the Buffer and Triton: a stage gets its Buffer from its layers)
    from ..ep.dispatcher import BackwardHook, Dispatcher, DispatchOutput
    from ..ep.event import EventOverlap


class MoEBlock(nn.Module):
    """``h = x + dense(norm1(x)); y = h + moe(norm2(h))``: a transformer block whose attention is stood in
    for by a dense SwiGLU MLP (any ``dense`` module of ``[..., H] -> [..., H]`` may replace it).

    ``moe`` is a ``moekit.MoE`` (or anything with its ``forward_steps(x, async_finish, dispatcher=)``
    generator and ``buffer``). Input and output ``[..., H]``.
    """

    def __init__(self, moe: nn.Module, dense: nn.Module | None = None):
        super().__init__()
        h = moe.config.hidden_size
        self.norm1 = nn.LayerNorm(h)
        self.dense = MLP(h, 2 * h) if dense is None else dense
        self.norm2 = nn.LayerNorm(h)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.dense(self.norm1(x))
        return h + self.moe(self.norm2(h))

    def forward_steps(self, x: torch.Tensor, async_finish: bool = True, backward_hook: BackwardHook | None = None):
        """Generator form of ``forward``: yields the MoE's in-flight transfers (``EventOverlap``, with
        ``async_finish``; the caller may compute, then resumes, and this waits), returns the output
        ``[..., H]``, bitwise ``forward``'s. ``backward_hook``: how the backward of the MoE's transfers
        completes them (:class:`OverlapDispatcher`); None: at once, as in ``forward``."""
        h = x + self.dense(self.norm1(x))
        buffer = self.moe.buffer
        dispatcher = None if backward_hook is None or buffer is None else OverlapDispatcher(buffer, backward_hook)
        m = yield from self.moe.forward_steps(self.norm2(h), async_finish, dispatcher=dispatcher)
        return h + m


class OverlapDispatcher:
    """A ``moekit.ep.Dispatcher`` that runs every call on ``inner`` (the layer's Buffer) with
    ``backward_hook=hook``, so that the backward of each dispatch and combine completes its transfer
    through ``hook`` (an :class:`FBCoroutine`'s ``transfer``). Arguments and results are ``inner``'s."""

    def __init__(self, inner: Dispatcher, hook: BackwardHook):
        self.inner, self.hook = inner, hook

    def dispatch(self, x, topk_idx, topk_weights, num_experts, **kwargs) -> DispatchOutput:
        return self.inner.dispatch(x, topk_idx, topk_weights, num_experts, backward_hook=self.hook, **kwargs)

    def combine(self, x, handle, **kwargs):
        return self.inner.combine(x, handle, backward_hook=self.hook, **kwargs)


class MoEStage(nn.Module):
    """A pipeline stage of :class:`MoEBlock`\\ s with a MoE-aware ``overlapped_forward_backward``.

    Use two of them per rank with ``DualPipe`` / ``DualPipeV``: the engine calls the hook for every F&B
    pair. ``forward(x)``: ``[..., H] -> [..., H]`` (a fresh tensor, as pipeline stages must return); its
    graph's dispatch/combine nodes carry this stage's :class:`FBCoroutine`, whose backward transfers an
    F&B pair overlaps, so every micro-batch's backward can be overlapped, whichever op ran its forward.

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
        self._coroutine = FBCoroutine(self._note)  # runs this stage's backwards inside F&B pairs

    def clear_records(self) -> None:
        self.overlap_records = []
        self._n_fwd = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_steps(self._forward_steps(x, async_finish=False))

    def _forward_steps(self, x: torch.Tensor, async_finish: bool = True):
        for blk in self.blocks:
            x = yield from blk.forward_steps(x, async_finish, backward_hook=self._coroutine.transfer)
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

        backward_run = module1._coroutine
        backward_run.start(lambda: backward_chunk(loss1, outputs1, output_grads1), mb_b)
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
                backward_run.resume()  # the backward computes until it launches a transfer, or ends
                event.wait()
                module0._note("COMM", mb_f, launched)
                t = time.time()
            loss0 = None
            if criterion0 is not None:
                loss0 = criterion0(out0, *labels0)
                if isinstance(loss0, torch.Tensor):
                    loss0._moekit_stage_mb = mb_f
            backward_run.finish()  # what is left of the backward: nothing of the forward to hide behind
        except BaseException:
            backward_run.abort()
            raise
        return [out0], loss0

    def _note(self, phase: str, mb: int, start: float, backward: bool = False) -> None:
        # A backward's transfer says so with microbatch_b / chunk_b (the forward's leave them None).
        if self.record:
            extra = (mb, self.chunk) if backward else (None, None)
            self.overlap_records.append(PhaseRecord(self.rank, phase, self.chunk, mb, start, time.time(), *extra))


# -- the backward as a coroutine ----------------------------------------------------------------

class _Aborted(Exception):
    """Raised inside a paused backward whose F&B pair failed on the other side."""


class _HelperThread:
    """A daemon thread that runs jobs in turn. One per process is enough (F&B pairs do not nest), so the
    class holds it: :meth:`shared` starts it on first use, and again in a forked child (no threads)."""

    _shared: _HelperThread | None = None

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="moekit-fb-backward", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.jobs.get()()

    @classmethod
    def shared(cls) -> _HelperThread:
        if cls._shared is None or not cls._shared.thread.is_alive():
            cls._shared = cls()
        return cls._shared


class FBCoroutine:
    """One stage's backwards inside F&B pairs, and the ``BackwardHook`` of that stage's transfers.

    ``start(fn, mb)``, then ``resume()`` (owner thread): the backward ``fn`` runs on the helper thread,
    only while the owner waits, until one of its transfers is launched (``transfer``) or it ends; errors
    of the backward re-raise in ``resume()``. A thread rather than a generator because the transfers are
    launched from inside autograd, which cannot yield. ``note(phase, mb, start, backward)``: the stage's
    recorder ("B" pieces, "COMM" of the backward's transfers).
    """

    def __init__(self, note: Callable[..., None]):
        self._note = note
        self._live = False  # between start() and the owner seeing the backward end

    def start(self, fn: Callable[[], None], mb: int) -> None:
        assert not self._live, "an F&B pair is already running this stage's backward"
        self._fn, self._mb = fn, mb
        self._owner = threading.get_ident()
        # A new thread starts with OpenMP's default team size, not the one set here (e.g. 1 per rank):
        # without this the helper's ops oversubscribe the cores.
        self._threads = torch.get_num_threads()
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._started = self._abort = self.done = False
        self._error: BaseException | None = None
        self._piece = 0.0
        self._live = True

    def _main(self) -> None:
        self._go.acquire()
        try:
            if not self._abort:
                if torch.get_num_threads() != self._threads:
                    torch.set_num_threads(self._threads)
                self._piece = time.time()
                self._fn()
                self._note("B", self._mb, self._piece)
        except BaseException as err:  # handed to the owner thread
            self._error = err
        finally:
            self.done = True
            self._back.release()

    def resume(self) -> None:
        if self.done:
            return
        if not self._started:
            self._started = True
            _HelperThread.shared().jobs.put(self._main)
        self._go.release()
        self._back.acquire()
        if self.done:
            # Drop the backward's closure (the paired micro-batch's outputs) and error with the pair.
            self._live, self._fn = False, None
            err, self._error = self._error, None
            if err is not None and not isinstance(err, _Aborted):
                raise err

    def finish(self) -> None:
        while not self.done:
            self.resume()

    def abort(self) -> None:
        self._abort = True
        try:
            self.finish()
        except BaseException:  # the owner's error is the one that propagates
            pass

    def transfer(self, launch: Callable[[bool], EventOverlap]) -> None:
        """The ``BackwardHook``: inside this stage's backward of an F&B pair (the helper thread, or
        autograd's device threads), launch asynchronously and let the owner run until it resumes us, then
        wait; anywhere else, launch synchronously."""
        if not self._live or threading.get_ident() == self._owner:
            launch(False).wait()
            return
        launched = time.time()
        event = launch(True)
        self._note("B", self._mb, self._piece)
        self._back.release()
        self._go.acquire()
        if self._abort:
            raise _Aborted("the F&B pair's forward failed")
        event.wait()
        self._note("COMM", self._mb, launched, True)
        self._piece = time.time()
