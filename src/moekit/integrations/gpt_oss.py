"""gpt-oss's routed experts for :class:`moekit.MoE`: a clamped SwiGLU with biases, sharded like moekit's own.

Shape legend: N = received rows, H = hidden size, I = expert intermediate size, K' = expert slots per row,
E_loc = experts on this rank, P = (row, expert) pairs that hit a local expert.

The math is transformers' ``GptOssExperts`` (models/gpt_oss/modeling_gpt_oss.py, from OpenAI's gpt-oss
reference): ``gate_up = x @ W_gu + b_gu`` with gate and up *interleaved* in the last dim (even / odd
columns), ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
``out = ((up + 1) * gate * sigmoid(alpha * gate)) @ W_d + b_d``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe.layer import MoE
from ..routing.balance import tokens_per_expert


class ClampedSwiGLUExperts(nn.Module):
    """The routed experts ``[expert_offset, expert_offset + num_local)`` of gpt-oss on this rank.

    Parameters (HF's names and layouts, this rank's slice of dim 0; all marked ``moekit_expert``):
    ``gate_up_proj`` ``[E_loc, H, 2I]``, ``gate_up_proj_bias`` ``[E_loc, 2I]``, ``down_proj`` ``[E_loc, I, H]``,
    ``down_proj_bias`` ``[E_loc, H]``. Same call as :class:`moekit.moe.RoutedExperts`.
    """

    PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    def __init__(self, num_local: int, expert_offset: int, hidden_size: int, intermediate_size: int,
                 alpha: float, limit: float, *, device=None, dtype=None):
        super().__init__()
        self.num_local, self.expert_offset, self.alpha, self.limit = num_local, expert_offset, alpha, limit
        h, i, kw = hidden_size, intermediate_size, dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, h, 2 * i, **kw))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_local, 2 * i, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_local, i, h, **kw))
        self.down_proj_bias = nn.Parameter(torch.empty(num_local, h, **kw))
        for p in self.parameters():
            p.moekit_expert = True

    def reset_parameters(self, seed: int) -> None:
        """Nothing to draw: the weights come from the model (``MoE.reset_parameters`` calls this)."""

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                counts: list[int] | None = None) -> torch.Tensor:
        """x: ``[N, H]``; topk_idx: ``[N, K']`` int64 local expert ids, -1 = not here; topk_weights ``[N, K']``
        fp32; counts: per-expert pair counts (python ints) or None (one host sync). Returns ``[N, H]`` in x's
        dtype (weighting and the per-row sum in fp32)."""
        n, k = topk_idx.shape
        if counts is None:
            counts = tokens_per_expert(topk_idx, self.num_local).tolist()
        if len(counts) != self.num_local:
            raise ValueError(f"ClampedSwiGLUExperts: counts has {len(counts)} entries, expected {self.num_local}")
        flat = topk_idx.reshape(-1)
        key = torch.where(flat >= 0, flat, self.num_local)
        order = torch.argsort(key, stable=True)[:sum(counts)]  # [P], grouped by expert
        rows = torch.div(order, k, rounding_mode="floor")
        xs = x[rows].to(self.down_proj.dtype)
        outs = []
        for e, seg in enumerate(torch.split(xs, counts)):
            gate_up = seg @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]  # [P_e, 2I]
            gate, up = gate_up[..., ::2].clamp(max=self.limit), gate_up[..., 1::2].clamp(-self.limit, self.limit)
            glu = (up + 1) * gate * torch.sigmoid(gate * self.alpha)  # [P_e, I]
            outs.append(glu @ self.down_proj[e] + self.down_proj_bias[e])
        ys = torch.cat(outs).float() * topk_weights.reshape(-1)[order].float().unsqueeze(1)
        out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, rows, ys)
        return out.to(x.dtype)


class TupleOutputMoE(MoE):
    """:class:`moekit.MoE` returning ``(hidden_states, routing weights [T, K] fp32)`` as HF's ``GptOssMLP``
    does (its decoder layer unpacks two values). The gate must be a ``LogitsRouter`` (it keeps ``last``)."""

    def forward(self, hidden_states: torch.Tensor):
        y = super().forward(hidden_states)
        return y, self.gate.last.topk_weights
