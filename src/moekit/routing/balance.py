"""Load balancing of DeepSeek-V3: the aux-loss-free bias update, the sequence-wise auxiliary loss, and
per-expert load statistics.

Shape legend: T = tokens, E = routed experts, K = experts per token, B = sequences, S = sequence length.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import dist as mdist


def tokens_per_expert(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count the (token, expert) pairs of each expert.

    topk_idx: ``[T, K]`` int64 global expert ids, ``-1`` = none. Returns ``[E]`` int64 on the same device.
    No host synchronisation (a scatter-add, not ``bincount``, which syncs on CUDA).
    """
    flat = topk_idx.reshape(-1)
    valid = flat >= 0
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    # -1 entries land in the spare last slot and are dropped.
    counts.scatter_add_(0, torch.where(valid, flat, num_experts), torch.ones_like(flat))
    return counts[:num_experts]


def imbalance(load: torch.Tensor) -> float:
    """max/mean of a per-expert load ``[E]`` (1.0 = perfectly balanced; 0 tokens count as balanced). Syncs."""
    load = load.double()
    mean = load.mean()
    return float(load.max() / mean) if mean > 0 else 1.0


class ExpertLoad:
    """Per-expert token counts of one MoE layer, as seen by this rank (before any all-reduce).

    ``last``: ``[E]`` of the latest forward; ``pending``: summed since the latest bias update (what
    :func:`update_bias` consumes); ``total``: summed since construction or :meth:`reset` (for users
    and EPLB, which wants a ``[layers, E]`` load). All int64, on the gate's device, no host sync.
    """

    def __init__(self, num_experts: int, device=None):
        self.num_experts = num_experts
        self.last = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.pending = torch.zeros_like(self.last)
        self.total = torch.zeros_like(self.last)

    def record(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """Count ``topk_idx`` ``[T, K]``; returns the ``[E]`` counts of this call."""
        counts = tokens_per_expert(topk_idx, self.num_experts)
        if self.pending.device != counts.device:
            self.last, self.pending, self.total = (t.to(counts.device) for t in (self.last, self.pending, self.total))
        self.last = counts
        self.pending += counts
        self.total += counts
        return counts

    def take_pending(self) -> torch.Tensor:
        """Return the pending counts and start a new period."""
        out, self.pending = self.pending, torch.zeros_like(self.pending)
        return out

    def reset(self) -> None:
        """Zero all three counters."""
        for t in (self.last, self.pending, self.total):
            t.zero_()


class BiasUpdate(NamedTuple):
    """What :func:`update_bias` did. load: ``[..., E]`` int64 global counts; imbalance: max/mean per row."""

    load: torch.Tensor
    imbalance: list[float]


@torch.no_grad()
def update_bias(biases: list[torch.Tensor], loads: list[torch.Tensor], gamma: float,
                group: dist.ProcessGroup | None = None) -> BiasUpdate:
    """The aux-loss-free update of DeepSeek-V3, for several layers in one all-reduce.

    biases: per layer ``[E]`` fp32 ``e_score_correction_bias`` (changed in place, outside autograd).
    loads: per layer ``[E]`` int64 counts of *this rank's* tokens since the previous update.
    The loads are summed over ``group`` (one all-reduce, skipped at world size 1), so every rank sees the
    same global load and applies the same change: an expert above the mean load loses ``gamma``, one below
    it gains ``gamma``, one exactly at it stays. Collective: every rank of ``group`` must call it. Syncs
    with the host (for the returned imbalance).
    """
    if len(biases) != len(loads):
        raise ValueError(f"update_bias: {len(biases)} biases but {len(loads)} loads")
    if not gamma >= 0:  # also rejects NaN: a negative gamma would push load *towards* overloaded experts
        raise ValueError(f"update_bias: gamma must be >= 0, got {gamma}")
    for i, (b, x) in enumerate(zip(biases, loads)):
        if b.dim() != 1 or tuple(x.shape) != tuple(b.shape):
            raise ValueError(f"update_bias: biases[{i}] must be [E] and loads[{i}] the same shape, got "
                             f"{list(b.shape)} and {list(x.shape)}")
    if not biases:
        return BiasUpdate(torch.zeros(0, 0, dtype=torch.int64), [])
    load = torch.stack([x.to(torch.int64) for x in loads])  # [L, E]
    if mdist.world_size(group) > 1:
        dist.all_reduce(load, group=group)
    mean = load.double().mean(dim=-1, keepdim=True)
    step = torch.sign(mean - load.double())  # +1 underloaded, -1 overloaded
    for b, s in zip(biases, step):
        b.add_(s.to(device=b.device, dtype=b.dtype), alpha=gamma)
    return BiasUpdate(load, [imbalance(x) for x in load])


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, alpha: float, seq_len: int | None = None,
                      norm: bool = True) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``alpha * mean_b sum_i f_i * P_i``.

    scores: ``[T, E]`` fp32 unbiased affinities (T = B*S); topk_idx: ``[T, K]`` chosen experts (-1 = none);
    seq_len: S (None = one sequence of T tokens). ``f_i = E / (K*S) * #{t in sequence: i chosen}``,
    ``P_i = mean_t s'_{i,t}`` with ``s'`` the scores normalised to sum 1 per token (sigmoid scores; pass
    ``norm=False`` for softmax scores). Differentiable through ``scores``; ``f`` is a constant.
    Returns a 0-dim fp32 tensor (0 for zero tokens).
    """
    if scores.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != scores.shape[0]:
        raise ValueError(f"sequence_aux_loss: scores must be [T, E] and topk_idx [T, K], got "
                         f"{list(scores.shape)} and {list(topk_idx.shape)}")
    t, e = scores.shape
    k = topk_idx.shape[1]
    if t == 0:
        return scores.sum() * 0.0
    s = t if seq_len is None else seq_len
    if t % s != 0:
        raise ValueError(f"sequence_aux_loss: seq_len ({s}) must divide the token count ({t})")
    b = t // s
    probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if norm else scores
    p = probs.view(b, s, e).mean(dim=1)  # [B, E]
    idx = topk_idx.view(b, s * k)
    counts = torch.zeros(b, e + 1, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, torch.where(idx >= 0, idx, e), torch.ones_like(idx, dtype=scores.dtype))
    f = counts[:, :e] * (e / (k * s))
    return alpha * (f * p).sum(dim=1).mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``y``; in backward, feeds a gradient of 1 into ``loss`` so it trains without being
    added to the user's loss (the layer's output keeps the HF signature)."""

    @staticmethod
    def forward(ctx, y, loss):
        ctx.loss_shape = loss.shape
        ctx.loss_meta = (loss.dtype, loss.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        dtype, device = ctx.loss_meta
        return grad_y, torch.ones(ctx.loss_shape, dtype=dtype, device=device)


def attach_aux_loss(y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Return ``y`` unchanged; backward through it also back-propagates ``loss`` (0-dim) with weight 1."""
    return _AttachAuxLoss.apply(y, loss)
