"""Dispatch layout: which ranks, nodes and experts each token goes to. Purely local (no communication).

Shape legend: T = tokens on this rank, K = experts per token, E = experts, R = ranks, N = nodes,
G = ranks per node. Expert ``e`` lives on rank ``e // (E // R)``; rank ``r`` on node ``r // G``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..routing.balance import tokens_per_expert  # re-exported for ep/: (token, k) pairs per expert


class DispatchLayout(NamedTuple):
    """Result of :func:`get_dispatch_layout` (all on ``topk_idx.device``)."""

    num_tokens_per_rank: torch.Tensor  # [R] int64: tokens with at least one expert on the rank
    num_tokens_per_node: torch.Tensor  # [N] int64: tokens with at least one expert on the node
    num_tokens_per_expert: torch.Tensor  # [E] int64: (token, k) pairs choosing the expert
    is_token_in_rank: torch.Tensor  # [T, R] bool


def token_ranks(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """``is_token_in_rank`` [T, R] bool for a validated ``topk_idx`` [T, K] (``-1`` = no expert)."""
    t = topk_idx.shape[0]
    experts_per_rank = num_experts // num_ranks
    # Masked entries go to a spare column R that is dropped afterwards: no boolean indexing, no host sync.
    dest = torch.where(topk_idx >= 0, topk_idx // experts_per_rank, num_ranks)  # [T, K]
    hit = torch.zeros(t, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, dest, True)
    return hit[:, :num_ranks]


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                        ranks_per_node: int) -> DispatchLayout:
    """Count what a dispatch of ``topk_idx`` sends, without sending anything.

    Args:
        topk_idx: ``[T, K]`` int64 expert ids, ``-1`` for none; values in ``[-1, num_experts)``.
        num_experts: E, divisible by ``num_ranks``.
        num_ranks: R; ``ranks_per_node``: G, dividing R.

    Returns a :class:`DispatchLayout`. No host synchronisation.
    """
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx must be 2-D [num_tokens, num_topk], got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx must be int64, got {topk_idx.dtype}")
    if num_experts <= 0 or num_ranks <= 0 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of the number of ranks "
                         f"({num_ranks})")
    if ranks_per_node <= 0 or num_ranks % ranks_per_node != 0:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide the number of ranks ({num_ranks})")
    in_rank = token_ranks(topk_idx, num_experts, num_ranks)  # [T, R]
    num_nodes = num_ranks // ranks_per_node
    in_node = in_rank.view(-1, num_nodes, ranks_per_node).any(dim=2)  # [T, N]
    return DispatchLayout(
        num_tokens_per_rank=in_rank.sum(0, dtype=torch.int64),
        num_tokens_per_node=in_node.sum(0, dtype=torch.int64),
        num_tokens_per_expert=tokens_per_expert(topk_idx, num_experts),
        is_token_in_rank=in_rank,
    )
