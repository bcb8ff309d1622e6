"""MoE-aware ``overlapped_forward_backward``: one micro-batch's all-to-all hides behind another's compute.

DualPipe pairs the forward of one micro-batch with the backward of another (an "F&B" op). For
pipeline stages made of :class:`MoEBlock`\\ s (a dense part, then ``moekit.MoE``), :class:`MoEStage`
implements the hook DeepSeek's package calls for such pairs:

- the forward runs block by block and launches each block's ``Buffer.dispatch`` and ``Buffer.combine``
  with ``async_finish=True``; while one is in flight (2 windows per block) ...
- ... the backward of the other micro-batch runs one *piece*: the MoE half or the dense half of one
  block (2 pieces per block, last block first), cut at the block boundaries that the stage kept during
  that micro-batch's forward;
- the forward waits for its transfer (``event.wait()``) only after the piece.

The result is bitwise the same as running the forward, then the backward (the ops are the same, only
their order changes). On the CPU the transfers are gloo work running in the background; on a GPU they
run on the Buffer's communication stream. With ``record=True`` a stage keeps ``PhaseRecord``\\ s of the
pieces ("F" segments, "B" pieces, and "COMM" from launch to completion) so the overlap shows up in
``plot_timeline``.

Shape legend: T = tokens of a micro-batch (all leading dims flattened), H = hidden size.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.autograd import Variable

from .. import dist as mdist
from .timeline import PhaseRecord


class MoEBlock(nn.Module):
    """``h = x + dense(norm1(x)); y = h + moe(norm2(h))``: a transformer block whose attention is stood in
    for by a dense SwiGLU MLP (any ``dense`` module of ``[..., H] -> [..., H]`` may replace it).

    ``moe`` is a ``moekit.MoE`` (or anything with its ``forward_steps`` generator). Input and output ``[..., H]``.
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

    def forward_steps(self, x: torch.Tensor):
        """Generator form of ``forward``: yields the MoE's in-flight transfers, returns ``(h, y)``."""
        h = x + self.dense(self.norm1(x))
        m = yield from self.moe.forward_steps(self.norm2(h))
        return h, h + m

    def dense_params(self) -> list[nn.Parameter]:
        return [p for m in (self.norm1, self.dense) for p in m.parameters() if p.requires_grad]

    def moe_params(self) -> list[nn.Parameter]:
        return [p for m in (self.norm2, self.moe) for p in m.parameters() if p.requires_grad]


class MoEStage(nn.Module):
    """A pipeline stage of :class:`MoEBlock`\\ s with a MoE-aware ``overlapped_forward_backward``.

    Use two of them per rank with ``DualPipe`` / ``DualPipeV``: the engine calls the hook for every F&B
    pair. ``forward(x)``: ``[..., H] -> [..., H]`` (a fresh tensor, as pipeline stages must return).

    Args:
        blocks: the stage's blocks, in order.
        record: keep ``PhaseRecord``\\ s of the overlapped pairs in ``overlap_records``.
        rank, chunk: what those records say (default: this process's rank, chunk 0). Micro-batch
            numbers count this stage's forwards since ``clear_records()`` (-1: a loss stage's backward).
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
        bounds = []
        for blk in self.blocks:
            h = x + blk.dense(blk.norm1(x))
            y = h + blk.moe(blk.norm2(h))
            bounds.append((x, h))
            x = y
        return self._keep(x, bounds)

    def _keep(self, out: torch.Tensor, bounds) -> torch.Tensor:
        # The block boundaries ride on the output tensor (the schedule hands that same object back for
        # the backward, and they go when it does); with its forward's index for the records.
        if torch.is_grad_enabled():
            out._moekit_stage_bounds = (self._n_fwd, bounds)
        self._n_fwd += 1
        return out

    # -- pieces ---------------------------------------------------------------------------------

    def _forward_steps(self, x: torch.Tensor):
        bounds = []
        for blk in self.blocks:
            h, y = yield from blk.forward_steps(x)
            bounds.append((x, h))
            x = y
        return self._keep(x, bounds)

    def _backward_pieces(self, loss, outputs, output_grads) -> tuple[int, list[Callable[[], None]]]:
        """The backward of one micro-batch as closures to run in order (last block first), and the
        micro-batch's forward index (-1 when unknown)."""
        kept = getattr(outputs[0], "_moekit_stage_bounds", None) if len(outputs) == 1 else None
        if loss is not None or kept is None:
            # The loss stage (or an unknown output): one piece, as a plain backward.
            def whole():
                if loss is not None:
                    loss.backward()
                    loss.detach_()
                else:
                    _backward(outputs, output_grads, None)
            return -1, [whole]
        mb, bounds = kept
        del outputs[0]._moekit_stage_bounds
        pieces = []
        top = [outputs[0], output_grads[0]]  # the tensor whose gradient is known, and that gradient
        for blk, (x, h) in zip(reversed(self.blocks), reversed(bounds)):
            def moe_half(blk=blk, h=h):
                _backward([top[0]], [top[1]], [h] + blk.moe_params())
                top[0], top[1] = h, h.grad
                h.grad = None

            def dense_half(blk=blk, x=x):
                stop = [x] if x.requires_grad else []
                _backward([top[0]], [top[1]], stop + blk.dense_params())
                top[0], top[1] = x, x.grad
                if x.grad_fn is not None:  # a block boundary, not the stage input: its grad is ours
                    x.grad = None

            pieces += [moe_half, dense_half]
        return mb, pieces

    @classmethod
    def overlapped_forward_backward(cls, module0: MoEStage, inputs0, criterion0, labels0,
                                    module1: MoEStage, loss1, outputs1, output_grads1):
        """DeepSeek's hook: forward ``inputs0`` through ``module0`` while running the backward of
        ``module1`` (``loss1``, or ``outputs1`` with ``output_grads1``) in the forward's transfer windows.

        Returns ``(outputs0, loss0)``: the list of ``module0``'s outputs and ``criterion0(*outputs0,
        *labels0)`` (``None`` without criterion).
        """
        mb_b, pieces = module1._backward_pieces(loss1, list(outputs1), list(output_grads1))
        mb_f = module0._n_fwd
        steps = module0._forward_steps(*inputs0)
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
            if pieces:
                t = time.time()
                pieces.pop(0)()
                module1._note("B", mb_b, t)
            event.wait()
            module0._note("COMM", mb_f, launched)
            t = time.time()
        for piece in pieces:
            t = time.time()
            piece()
            module1._note("B", mb_b, t)
        loss0 = criterion0(out0, *labels0) if criterion0 is not None else None
        return [out0], loss0

    def _note(self, phase: str, mb: int, start: float) -> None:
        if self.record:
            self.overlap_records.append(PhaseRecord(self.rank, phase, self.chunk, mb, start, time.time()))


def _backward(tensors, grads, inputs) -> None:
    # As moekit.pipeline.run_backward, optionally stopping at ``inputs`` (their .grad receives the gradient).
    Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grads), keep_graph=False, create_graph=False,
        inputs=tuple(inputs) if inputs else (), allow_unreachable=True, accumulate_grad=True)
