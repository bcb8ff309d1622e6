"""A plain DeepSeek-V3 MoE block in float64, from a HF-named state dict: one token and one expert at a time."""

import torch
import torch.nn.functional as F

from moekit.routing.gate import route


def swiglu(x, sd, prefix):
    g = sd[f"{prefix}.gate_proj.weight"].double()
    u = sd[f"{prefix}.up_proj.weight"].double()
    d = sd[f"{prefix}.down_proj.weight"].double()
    return (F.silu(x @ g.T) * (x @ u.T)) @ d.T


def reference_experts(x, topk_idx, topk_weights, sd, prefix="experts"):
    """``sum_k w[t, k] * expert_{idx[t, k]}(x[t])`` row by row (``-1`` skipped), float64."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(topk_idx[t].tolist(), topk_weights[t].double().tolist()):
            if e >= 0:
                out[t] += w * swiglu(x[t:t + 1], sd, f"{prefix}.{e}")[0]
    return out


def reference_moe(x, sd, cfg, num_nodes=1):
    """The block's output ``[T, H]`` in float64 (routing decided in fp32 like the gate, then fixed)."""
    scores = torch.sigmoid(x.float() @ sd["gate.weight"].float().T)
    idx, w = route(scores, sd["gate.e_score_correction_bias"], cfg, num_nodes)
    y = reference_experts(x, idx, w, sd)
    if cfg.n_shared_experts:
        y = y + swiglu(x.double(), sd, "shared_experts")
    return y, idx
