"""Deferred weight gradients, raw backward, and splitting a batch into micro-batches.

``WeightGradStore`` and ``run_backward`` keep the names and behaviour of DeepSeek's DualPipe package,
so that autograd functions written for it (which test ``WeightGradStore.enabled`` and ``put`` their
weight-gradient closure) work unchanged with moekit's schedules.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence

import torch
from torch.autograd import Variable


class WeightGradStore:
    """Where the weight-gradient ("W") half of a backward chunk waits until the schedule runs it.

    A layer's backward that supports zero-bubble scheduling checks ``WeightGradStore.enabled``: when it
    is true the layer computes only its input gradient and ``put``s a closure that later adds the
    weight gradient; otherwise it does both at once. The schedule ``flush``es the closures of one
    backward chunk as a group and ``pop``s groups first-in first-out.

    This is class-level state on purpose: user autograd functions reach it without a handle. A
    schedule's ``step`` clears it at the start and leaves it empty at the end, so one step at a time
    per process may use it (as in DeepSeek's package).
    """

    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: queue.Queue = queue.Queue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        """Keep ``func`` (no arguments; adds a weight gradient) for the current backward chunk."""
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        """Close the current backward chunk: its closures become one group in the FIFO queue."""
        cls.funcs_queue.put(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest group of closures (one "W" chunk). Raises ``RuntimeError`` if none is queued."""
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no weight-gradient chunk is queued")
        for func in cls.funcs_queue.get():
            func()

    @classmethod
    def clear(cls) -> None:
        """Drop every cached and queued closure and disable deferral."""
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = queue.Queue()


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Backpropagate ``grad_tensors`` from ``tensors`` into the leaves' ``.grad`` (accumulating).

    Unlike ``torch.autograd.backward`` it does not compare ``grad_tensors`` with the *current* shape of
    ``tensors``: the schedules free the storage of stage outputs once they are sent (the graph keeps
    the shapes it needs), so those tensors are empty by the time their backward runs. The graph is
    freed afterwards. Synchronises with the host only as ``backward`` does.
    """
    Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grad_tensors), keep_graph=False, create_graph=False,
        allow_unreachable=True, accumulate_grad=True,
    )


def backward_chunk(loss: torch.Tensor | None, outputs: Sequence[torch.Tensor],
                   output_grads: Sequence[torch.Tensor]) -> None:
    """The backward of one micro-batch through one stage, from what the engine hands an
    ``overlapped_forward_backward`` hook (``loss1, outputs1, output_grads1``).

    On the last stage ``loss`` is the micro-batch's loss: it is backpropagated and detached in place (its
    graph is freed; the engine keeps the value for ``step``'s return). Elsewhere ``loss`` is None and the
    received ``output_grads`` are backpropagated from ``outputs`` with :func:`run_backward`; with neither
    (an empty stage output) nothing runs. Gradients accumulate into the leaves' ``.grad``.
    """
    if loss is not None:
        loss.backward()
        loss.detach_()
    elif outputs:
        run_backward(outputs, output_grads)


def scatter(inputs, chunks: int, dim: int) -> list[tuple[torch.Tensor | None, ...]]:
    """Split each tensor of ``inputs`` into ``chunks`` micro-batches along ``dim`` (``tensor_split``).

    ``inputs`` is a tensor or a sequence of tensors/``None``; returns ``chunks`` tuples, the i-th
    holding the i-th slice of every input (``None`` stays ``None``); no inputs give empty tuples.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise TypeError(f"inputs must be a tensor or a sequence of tensors, got {type(inputs).__name__}")
    parts = []
    for i, x in enumerate(inputs):
        if x is None:
            parts.append([None] * chunks)
        elif isinstance(x, torch.Tensor):
            if x.dim() <= dim or x.shape[dim] < chunks:
                raise ValueError(f"input {i} of shape {tuple(x.shape)} cannot be split into {chunks} micro-batches "
                                 f"along dim {dim}")
            parts.append(list(x.tensor_split(chunks, dim=dim)))
        else:
            raise TypeError(f"input {i} must be a tensor or None, got {type(x).__name__}")
    if not parts:
        return [() for _ in range(chunks)]
    return [tuple(p[c] for p in parts) for c in range(chunks)]


def gather(micro_outputs: Sequence[Sequence[torch.Tensor]], dim: int) -> tuple[torch.Tensor, ...]:
    """Concatenate per-micro-batch output lists back into whole-batch tensors along ``dim``."""
    return tuple(torch.cat(list(parts), dim=dim) for parts in zip(*micro_outputs))
