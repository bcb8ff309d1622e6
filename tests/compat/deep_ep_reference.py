"""Plain, loop-based references of DeepEP's documented semantics (tests only).

Every rank draws every rank's inputs from one shared seed, so it can compute what it should receive.
"""

from __future__ import annotations

import torch

from moekit.kernels import per_token_group_quant
from moekit.kernels.reference import per_token_group_dequant_ref


def inputs(seed: int, world: int, tokens: list[int], hidden: int, topk: int, num_experts: int,
           masked: float = 0.2):
    """Per rank: ``x_rand [T, H]`` bf16, ``x_rank [T, H]`` bf16 (every value = the rank: rows identify
    their source), ``topk_idx [T, K]`` int64 (distinct experts, some -1), ``topk_weights`` fp32 (random)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, t in enumerate(tokens):
        x_rand = torch.randn(t, hidden, generator=g).bfloat16()
        scores = torch.rand(t, num_experts, generator=g) + 1
        idx = torch.topk(scores, topk, dim=-1, sorted=False).indices
        idx = torch.where(torch.rand(t, topk, generator=g) < masked, -1, idx)
        w = torch.randn(t, topk, generator=g)
        out.append((x_rand, torch.full((t, hidden), float(r)).bfloat16(), idx, w))
    return out


def layout(idx: torch.Tensor, num_experts: int, world: int, ranks_per_node: int):
    """``(per rank [R], per node [N], per expert [E], is_token_in_rank [T, R])`` by loops."""
    epr = num_experts // world
    t = idx.shape[0]
    in_rank = torch.zeros(t, world, dtype=torch.bool)
    per_expert = torch.zeros(num_experts, dtype=torch.int32)
    for i in range(t):
        for e in idx[i].tolist():
            if e >= 0:
                in_rank[i, e // epr] = True
                per_expert[e] += 1
    nodes = world // ranks_per_node
    per_node = torch.tensor([int(in_rank[:, n * ranks_per_node:(n + 1) * ranks_per_node].any(1).sum())
                             for n in range(nodes)], dtype=torch.int32)
    return in_rank.sum(0).int(), per_node, per_expert, in_rank


def received(all_inputs, which: int, num_experts: int, world: int, dest: int, with_topk: bool):
    """What ``dest`` receives in DeepEP's order (source rank, then token): ``(x rows, local topk_idx, masked
    weights, rows per source, per-local-expert counts)``; ``which`` picks x_rand (0) or x_rank (1)."""
    epr = num_experts // world
    xs, ids, ws, per_src = [], [], [], []
    for inp in all_inputs:
        x, idx, w = inp[which], inp[2], inp[3]
        n = 0
        for i in range(idx.shape[0]):
            experts = idx[i].tolist()
            if any(e >= 0 and e // epr == dest for e in experts):
                n += 1
                xs.append(x[i])
                local = [e - dest * epr if e >= 0 and e // epr == dest else -1 for e in experts]
                ids.append(torch.tensor(local))
                ws.append(torch.tensor([float(w[i, k]) if local[k] >= 0 else 0.0 for k in range(len(local))]))
        per_src.append(n)
    h = all_inputs[0][0].shape[1]
    k = all_inputs[0][2].shape[1]
    rx = torch.stack(xs) if xs else torch.zeros(0, h, dtype=torch.bfloat16)
    ridx = torch.stack(ids) if ids else torch.zeros(0, k, dtype=torch.int64)
    rw = torch.stack(ws) if ws else torch.zeros(0, k)
    counts = [int((ridx == e).sum()) for e in range(epr)]
    return rx, ridx, rw, per_src, counts


def fp8_pair(x: torch.Tensor):
    """DeepEP's test input: per-1x128 e4m3 with plain amax/448 scales, scales column-major."""
    data, scales = per_token_group_quant(x, 128)
    return data, scales.T.contiguous().T


def dequant(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return per_token_group_dequant_ref(data, scales.float(), 128)
