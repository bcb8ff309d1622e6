"""A small DeepSeek-V3-style decoder for the demo and examples: RMSNorm, causal attention with RoPE, the
first ``first_k_dense_replace`` layers dense (SwiGLU of ``intermediate_size``), the others :class:`MoE`.

Shape legend: B = sequences, S = sequence length, H = hidden size, V = vocabulary.
Attention is plain multi-head attention (DeepSeek-V3 uses MLA; the MoE part is what this model shows).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .experts import MLP
from .layer import MoE


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[B, heads, S, D]`` (D even), rotating the two halves."""
    s, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] * inv[None]  # [S, D/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE: ``[B, S, H] -> [B, S, H]`` (SDPA kernel)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads != 0 or (hidden // heads) % 2 != 0:
            raise ValueError(f"hidden_size ({hidden}) must split into num_attention_heads ({heads}) even heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)  # [B, heads, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))`` (dense SwiGLU or :class:`MoE`)."""

    def __init__(self, config: MoEConfig, dense: bool, moe_kwargs: dict[str, Any]):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.self_attn = Attention(h, config.num_attention_heads)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.mlp = MLP(h, config.intermediate_size) if dense else MoE(config, **moe_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyDeepSeek(nn.Module):
    """Token ids ``[B, S]`` int64 -> logits ``[B, S, V]``; ``num_hidden_layers`` blocks, the first
    ``first_k_dense_replace`` dense. ``moe_kwargs`` go to every :class:`MoE` (``group``, ``buffer``,
    ``ranks_per_node``): pass one ``buffer`` to share its traffic counters between layers."""

    def __init__(self, config: MoEConfig, **moe_kwargs: Any):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i < config.first_k_dense_replace, moe_kwargs)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))
