"""Single-process reference of dispatch/combine, computed from every rank's inputs (tests only).

Every rank of a test draws all ranks' inputs from one shared seed, so it can compare its own results
with what this plain, loop-based reference says it should receive.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Case:
    tokens: list[int]  # T of each rank
    hidden: int
    topk: int
    num_experts: int
    mode: str = "random"  # random | masked | one_expert | skew | to_rank0 | empty
    dtype: torch.dtype = torch.float32
    seed: int = 0


def make_inputs(case: Case, num_ranks: int):
    """``(xs, idxs, ws)``: per-rank x [T, H], topk_idx [T, K] int64, topk_weights [T, K] fp32."""
    g = torch.Generator().manual_seed(case.seed)
    e, k = case.num_experts, case.topk
    xs, idxs, ws = [], [], []
    for t in case.tokens:
        x = torch.randn(t, case.hidden, generator=g).to(case.dtype)
        if case.mode == "one_expert":
            idx = torch.full((t, k), -1, dtype=torch.int64)
            idx[:, 0] = e - 1
        elif case.mode == "to_rank0":  # every expert on rank 0: other ranks receive nothing
            idx = torch.randint(0, e // num_ranks, (t, k), generator=g)
        elif case.mode == "skew":  # most picks on the first two experts
            hot = torch.randint(0, 2, (t, k), generator=g)
            cold = torch.randint(0, e, (t, k), generator=g)
            idx = torch.where(torch.rand(t, k, generator=g) < 0.8, hot, cold)
        elif case.mode == "empty":
            idx = torch.full((t, k), -1, dtype=torch.int64)
        else:
            if k > e:  # distinct experts impossible: repeats allowed
                idx = torch.randint(0, e, (t, k), generator=g)
            else:
                idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else \
                    torch.empty(0, k, dtype=torch.int64)
            if case.mode == "masked":
                idx = torch.where(torch.rand(t, k, generator=g) < 0.3, -1, idx)
        xs.append(x)
        idxs.append(idx)
        ws.append(torch.rand(t, k, generator=g))
    return xs, idxs, ws


def dispatch_rows(idxs, num_experts: int, num_ranks: int, dest: int) -> list[tuple[int, int]]:
    """(source rank, token) of every row ``dest`` receives, in order."""
    epr = num_experts // num_ranks
    rows = []
    for s, idx in enumerate(idxs):
        for t in range(idx.shape[0]):
            if any(int(e) >= 0 and int(e) // epr == dest for e in idx[t]):
                rows.append((s, t))
    return rows


def ref_dispatch(xs, idxs, ws, num_experts: int, num_ranks: int, dest: int):
    """What ``dest`` receives: ``(recv_x, recv_topk_idx, recv_topk_weights, per-expert counts, rows)``.

    Differentiable in ``xs`` / ``ws`` (gathers and where's only).
    """
    epr = num_experts // num_ranks
    rows = dispatch_rows(idxs, num_experts, num_ranks, dest)
    h = xs[0].shape[1]
    k = idxs[0].shape[1]
    if not rows:
        return (xs[0].new_zeros(0, h), torch.empty(0, k, dtype=torch.int64), ws[0].new_zeros(0, k),
                [0] * epr, rows)
    rx = torch.stack([xs[s][t] for s, t in rows])
    gidx = torch.stack([idxs[s][t] for s, t in rows])
    rw = torch.stack([ws[s][t] for s, t in rows])
    local = gidx - dest * epr
    mine = (gidx >= 0) & (local >= 0) & (local < epr)
    ridx = torch.where(mine, local, -1)
    rw = torch.where(mine, rw, torch.zeros_like(rw))
    counts = [int((ridx == i).sum()) for i in range(epr)]
    return rx, ridx, rw, counts, rows


def ref_combine(zs, rows_per_dest, tokens: list[int], hidden: int):
    """Per source rank ``[T_s, H]``: the sum over destinations of the rows ``zs[d]`` that came from it."""
    outs = [zs[0].new_zeros(t, hidden) if len(zs) else torch.zeros(t, hidden) for t in tokens]
    outs = [list(o) for o in outs]  # per-token accumulation keeps the graph simple
    for d, rows in enumerate(rows_per_dest):
        for i, (s, t) in enumerate(rows):
            outs[s][t] = outs[s][t] + zs[d][i]
    return [torch.stack(o) if o else zs[0].new_zeros(0, hidden) for o in outs]


def inter_node_bytes(idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: int, rank: int,
                     row_bytes: int, per: str) -> int:
    """The documented formula: sum over tokens of (distinct remote destination nodes — or ranks, for the
    flat path — ) x row bytes."""
    epr = num_experts // num_ranks
    my_node = rank // ranks_per_node
    total = 0
    for t in range(idx.shape[0]):
        ranks = {int(e) // epr for e in idx[t] if int(e) >= 0}
        if per == "node":
            total += len({r // ranks_per_node for r in ranks} - {my_node})
        else:
            total += len({r for r in ranks if r // ranks_per_node != my_node})
    return total * row_bytes


def row_bytes(hidden: int, itemsize: int, topk: int, fp8: bool = False, weights: bool = True) -> int:
    """Documented row size: data, then FP8 scales (4-aligned), int32 ids, fp32 weights; rounded up to 8, >= 40."""
    off = hidden * itemsize
    if fp8:
        off = (off + 3) // 4 * 4 + 4 * ((hidden + 127) // 128)
    off = (off + 3) // 4 * 4 + 4 * topk
    if weights:
        off += 4 * topk
    return max(40, (off + 7) // 8 * 8)
