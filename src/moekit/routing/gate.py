"""The DeepSeek-V3 gate: which experts each token goes to, and with what weight.

Shape legend: T = tokens, H = hidden size, E = routed experts, K = experts per token.

The rules (DeepSeek-V3 technical report, section 2.1; the ``noaux_tc`` method of HF's model):
1. scores = sigmoid(x @ W^T) (softmax optional), computed in fp32.
2. ``e_score_correction_bias`` is added to the scores only to *choose* experts.
3. Group-limited choice: a group's score is the sum of its top-2 biased scores; a token keeps the
   ``topk_group`` best groups and takes its top-K experts among them.
4. Node-limited choice (``max_nodes_per_token`` = M): the same rule with the EP layout's nodes as the
   blocks, so that a token's experts sit on at most M nodes.
5. The weights are the *unbiased* scores of the chosen experts, normalised to sum 1 when
   ``norm_topk_prob``, times ``routed_scaling_factor``.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig


class GateOutput(NamedTuple):
    """What :class:`Gate` returns.

    topk_idx: ``[T, K]`` int64, the chosen experts (global ids), best first (by biased score).
    topk_weights: ``[T, K]`` fp32, their routing weights (differentiable w.r.t. the gate weight).
    scores: ``[T, E]`` fp32, the unbiased affinity scores of every expert (for the sequence aux loss).
    """

    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    scores: torch.Tensor


def block_mask(choice: torch.Tensor, num_blocks: int, keep: int) -> torch.Tensor:
    """Keep the ``keep`` best of ``num_blocks`` contiguous equal blocks of experts, per token.

    choice: ``[T, E]`` fp32 biased scores, ``-inf`` where an expert is already excluded.
    A block's score is the sum of its top-2 entries (top-1 for one-expert blocks).
    Returns a ``[T, E]`` bool mask of the experts in the kept blocks.
    """
    t, e = choice.shape
    size = e // num_blocks
    block_scores = choice.view(t, num_blocks, size).topk(min(2, size), dim=-1).values.sum(dim=-1)  # [T, nb]
    kept = block_scores.topk(keep, dim=-1).indices  # [T, keep]
    mask = torch.zeros(t, num_blocks, dtype=torch.bool, device=choice.device).scatter_(1, kept, True)
    return mask.repeat_interleave(size, dim=1)


def route(scores: torch.Tensor, bias: torch.Tensor | None, config: MoEConfig, num_nodes: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts and weights from scores (steps 2-5 of the module docstring).

    scores: ``[T, E]`` fp32 unbiased scores; bias: ``[E]`` or None; num_nodes: nodes the experts are
    spread over (contiguous equal blocks), for node-limited routing.
    Returns ``(topk_idx [T, K] int64, topk_weights [T, K] fp32)``. No host synchronisation.
    """
    choice = scores.detach() if bias is None else scores.detach() + bias.to(scores.dtype)
    for num_blocks, keep in config.routing_limits(num_nodes):
        # Coarse blocks first: a finer limit then sees whole blocks, excluded ones at -inf.
        choice = choice.masked_fill(~block_mask(choice, num_blocks, keep), float("-inf"))
    topk_idx = choice.topk(config.num_experts_per_tok, dim=-1).indices  # [T, K]
    weights = scores.gather(1, topk_idx)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx, weights * config.routed_scaling_factor


def _no_autocast(device_type: str):
    """A context with autocast off for ``device_type`` (a no-op context where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Gate(nn.Module):
    """The router of a DeepSeek-V3 MoE block; state-dict keys ``weight`` ``[E, H]`` and
    ``e_score_correction_bias`` ``[E]`` as in HF's model.

    ``num_nodes``: how many nodes the experts are spread over (``MoE`` sets it from the EP layout); it
    only matters with ``config.max_nodes_per_token``. The bias is a buffer, not a parameter: it is moved
    by :func:`moekit.routing.balance.update_bias`, never by the optimizer.
    """

    def __init__(self, config: MoEConfig, num_nodes: int = 1, *, device=None, dtype=None):
        super().__init__()
        if config.n_routed_experts % num_nodes != 0:
            raise ValueError(f"num_nodes ({num_nodes}) must divide n_routed_experts ({config.n_routed_experts})")
        if config.topk_method != "noaux_tc":
            raise ValueError(f"Gate implements DeepSeek-V3's topk_method 'noaux_tc', got {config.topk_method!r}")
        config.check_ep(num_nodes, 1)
        self.config = config
        self.num_nodes = num_nodes
        e, h = config.n_routed_experts, config.hidden_size
        self.weight = nn.Parameter(torch.empty(e, h, device=device, dtype=dtype))
        self.register_buffer("e_score_correction_bias", torch.zeros(e, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init of ``weight`` (the bias is left as it is)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _apply(self, fn, recurse=True):
        # Keep the bias in fp32 through model.to(bf16)/.half(): gamma-sized steps vanish in bf16.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> GateOutput:
        """x: ``[T, H]`` any float dtype. Returns :class:`GateOutput`.

        The logits, scores, bias and top-k are fp32 whatever x's dtype and whatever ``torch.autocast``
        says: autocast would run the logits' GEMM in bf16/fp16, and a few ulps of a bf16 logit are enough
        to flip a top-k choice (DeepSeek-V3's mixed-precision framework likewise keeps the MoE gating
        modules in their original precision: technical report, section 3.3.1).
        """
        if x.dim() != 2 or x.shape[1] != self.config.hidden_size:
            raise ValueError(f"Gate: x must be [T, {self.config.hidden_size}], got {list(x.shape)}")
        with _no_autocast(x.device.type):
            logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32
            scores = logits.sigmoid() if self.config.scoring_func == "sigmoid" else logits.softmax(dim=-1)
            topk_idx, topk_weights = route(scores, self.e_score_correction_bias, self.config, self.num_nodes)
        return GateOutput(topk_idx, topk_weights, scores)

    def extra_repr(self) -> str:
        c = self.config
        return (f"experts={c.n_routed_experts}, top_k={c.num_experts_per_tok}, groups={c.topk_group}/{c.n_group}, "
                f"nodes={c.max_nodes_per_token}/{self.num_nodes}, scoring={c.scoring_func}")
