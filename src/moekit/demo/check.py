"""The demo's self-check: one DeepSeek-V3-shaped dispatch + combine against a single-process result."""

from __future__ import annotations

import torch

from ..config import MoEConfig
from ..routing.gate import Gate


def dispatch_check(buffer, rank: int, world: int, device: torch.device) -> dict:
    """One dispatch + combine of a DeepSeek-V3-shaped batch (H=7168, 256 experts, top-8 of 4/8 groups) with
    expert e computing ``(e + 1) * x``; compared with the single-process result ``sum_k w_k (e_k + 1) x``."""
    cfg = MoEConfig.preset("deepseek-v3")
    g = torch.Generator().manual_seed(1000 + rank)
    t = 64
    x = torch.randn(t, cfg.hidden_size, generator=g).to(device)
    gate = Gate(cfg).to(device)
    with torch.no_grad():
        idx, w, _ = gate(x)
    e_loc = cfg.n_routed_experts // world
    d = buffer.dispatch(x, idx, w, cfg.n_routed_experts)
    sent = buffer.stats.last.total_bytes
    valid = d.recv_topk_idx >= 0
    factor = ((d.recv_topk_idx + rank * e_loc + 1).float() * d.recv_topk_weights * valid).sum(1, keepdim=True)
    y, _ = buffer.combine(d.recv_x * factor.to(d.recv_x.dtype), d.handle)
    ref = x * ((idx + 1).float() * w).sum(1, keepdim=True)
    err = float((y - ref).abs().max() / ref.abs().max())
    return dict(tokens=t, received=int(d.recv_x.shape[0]), dispatch_bytes=sent, max_rel_err=err)
