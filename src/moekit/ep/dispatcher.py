"""The dispatch/combine signature that ``moekit.MoE`` relies on (:class:`Dispatcher`), and its results.

``moekit.Buffer`` (DeepEP V1 normal mode) and ``moekit.ep.naive.NaiveBuffer`` (the per-(token, expert)
baseline) satisfy it; so may any other object, e.g. a wrapper that changes how the backward's transfers
are completed (``moekit.pipeline.MoEStage``'s). The keyword arguments below are the ones the layer and
the wrappers pass; a dispatcher may take more.

Shape legend: T = tokens on this rank, H = hidden, K = experts per token, E = experts, R = ranks,
M = rows this rank received.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .event import EventOverlap


class DispatchOutput(NamedTuple):
    """Result of a dispatch (:meth:`moekit.Buffer.dispatch`)."""

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [M, H], or (e4m3 [M, H], fp32 scales [M, H/128])
    recv_topk_idx: torch.Tensor | None  # [M, K] int64 local expert ids, -1 for experts on other ranks
    recv_topk_weights: torch.Tensor | None  # [M, K] float32, 0 where recv_topk_idx is -1
    num_recv_tokens_per_expert_list: list[int]  # [E / R] python ints rounded up to expert_alignment ([] w/ worst)
    handle: Any  # what combine (and a cached dispatch) take back: a DispatchHandle for moekit.Buffer
    event: EventOverlap


class CombineOutput(NamedTuple):
    """Result of a combine (:meth:`moekit.Buffer.combine`)."""

    combined_x: torch.Tensor  # [T, H], dtype of the combined x
    event: EventOverlap


class WeightedCombineOutput(NamedTuple):
    """Result of a combine with ``topk_weights`` (DeepEP's order)."""

    combined_x: torch.Tensor  # [T, H], dtype of the combined x
    combined_topk_weights: torch.Tensor  # [T, K] float32: the received rows' weights summed back
    event: EventOverlap


BackwardHook = Callable[[Callable[[bool], EventOverlap]], None]
"""How the backward of a dispatch/combine completes its transfer: called as ``hook(launch)``, it must call
``launch(async_finish)`` once (which starts the transfer and returns its event) and wait for that event
before returning. ``moekit.ep.autograd.wait_now`` (the default) launches synchronously."""


@runtime_checkable
class Dispatcher(Protocol):
    """Expert-parallel dispatch/combine as ``moekit.MoE`` calls it (``isinstance`` checks the two methods).

    ``dispatch``: ``x [T, H]`` float, ``topk_idx [T, K]`` int64 (``-1`` = none), ``topk_weights [T, K]``
    float32, E → :class:`DispatchOutput`; ``num_recv_tokens_per_expert_list`` counts the received
    (token, local expert) pairs. ``fp8``: the rows may travel in FP8 (a dispatcher without FP8 ignores
    it); with ``dequantize`` too, ``recv_x`` is a float ``[M, H]`` in x's dtype, differentiable with a
    straight-through gradient (DeepSeek-V3 §3.3: FP8 dispatch, BF16 backward). ``async_finish``: return
    at once, ``event.wait()`` completes. ``backward_hook``: how this call's backward completes its
    transfer (:data:`BackwardHook`; a dispatcher without autograd ignores it).

    ``combine``: ``x [M, H]`` in dispatch order and the dispatch's handle → :class:`CombineOutput`
    (``combined_x [T, H]`` in x's dtype, the rows of each token summed), or with ``topk_weights [M, K]``
    a :class:`WeightedCombineOutput`. Differentiable: backward is a dispatch of the gradient.
    Both are collective over the dispatcher's ranks.
    """

    def dispatch(self, x, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
                 num_experts: int | None, *, fp8: bool = False, dequantize: bool = False,
                 expert_alignment: int = 1, async_finish: bool = False, handle: Any = None,
                 backward_hook: BackwardHook | None = None) -> DispatchOutput: ...

    def combine(self, x: torch.Tensor, handle: Any, *, topk_weights: torch.Tensor | None = None, bias=None,
                async_finish: bool = False, backward_hook: BackwardHook | None = None
                ) -> CombineOutput | WeightedCombineOutput: ...
