"""Node-aware two-stage dispatch vs the flat one vs the naive per-(token, expert) dispatcher.

8 gloo ranks pretend to be 4 nodes of 2. Routing as DeepSeek-V3's gate: E=64 experts in 4 groups
(a group = the experts of one node), a group's score = the sum of its top-2 expert scores, each token
keeps the best ``--max-nodes`` groups (node-limited routing) and picks its top-8 experts among them.
Per dispatcher: inter-node bytes (from ``stats``, summed over ranks), inter-node rows per token
(bytes / row bytes / tokens), dispatch and combine times (slowest rank, median); ratios to the naive one.
With routing limited to M nodes the two-stage path must send at most M rows per token between nodes.

    .venv/bin/python bench/ep_hierarchical.py [--tokens 2048] [--hidden 2048] [--max-nodes 2]
"""

from __future__ import annotations

import argparse

import torch

from ep_cpu import device_tag, slowest_median, time_buffer
from moekit import benchtools
from moekit.ep import Buffer
from moekit.ep.handle import dispatch_row_format
from moekit.ep.naive import NaiveBuffer
from moekit.testing import spawn


def node_limited_topk(tokens: int, experts: int, groups: int, max_groups: int, topk: int,
                      gen: torch.Generator) -> torch.Tensor:
    """DeepSeek-V3 group-limited top-k on random scores: ``[T, topk]`` int64 expert ids."""
    scores = torch.rand(tokens, experts, generator=gen)
    per_group = scores.view(tokens, groups, experts // groups)
    group_score = per_group.topk(2, dim=2).values.sum(2)  # [T, groups]
    keep = torch.zeros(tokens, groups, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(max_groups, dim=1).indices, True)
    masked = torch.where(keep.repeat_interleave(experts // groups, dim=1), scores, -1.0)
    return masked.topk(topk, dim=1).indices


def _rank(rank, world, rpn, tokens, hidden, experts, topk, max_nodes, iters, seed):
    gen = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = node_limited_topk(tokens, experts, world // rpn, max_nodes, topk, gen)
    w = torch.rand(tokens, topk, generator=gen)
    row = {}
    for name, buf in (("naive (per token, expert)", NaiveBuffer(ranks_per_node=rpn)),
                      ("flat (per token, rank)", Buffer(ranks_per_node=rpn, hierarchical=False)),
                      ("two-stage (per token, node)", Buffer(ranks_per_node=rpn))):
        r = time_buffer(buf, x, idx, w, experts, iters)
        r["row_bytes"] = dispatch_row_format(torch.bfloat16, hidden, False, topk, True).row_bytes \
            if isinstance(buf, Buffer) else hidden * 2 + 8
        row[name] = r
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--max-nodes", type=int, default=2, help="node-limited routing: M")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from rich.console import Console

    res = spawn(_rank, a.ranks, a.ranks_per_node, a.tokens, a.hidden, a.experts, a.topk, a.max_nodes, a.iters,
                a.seed, timeout=1800)
    names = list(res[0])
    total_tokens = a.tokens * a.ranks
    s = {}
    for n in names:
        inter = sum(r[n]["dispatch"].inter_node_bytes for r in res)
        s[n] = {"inter": inter, "rows_per_token": inter / res[0][n]["row_bytes"] / total_tokens,
                "c_inter": sum(r[n]["combine"].inter_node_bytes for r in res),
                "intra": sum(r[n]["dispatch"].intra_node_bytes for r in res),
                "d_s": slowest_median([r[n]["dispatch_s"] for r in res]),
                "c_s": slowest_median([r[n]["combine_s"] for r in res])}
    nodes = a.ranks // a.ranks_per_node
    t = benchtools.table(f"{nodes} nodes x {a.ranks_per_node} gloo ranks, T={a.tokens}/rank, H={a.hidden}, "
                         f"E={a.experts} in {nodes} groups, top-{a.topk} on <= {a.max_nodes} nodes, bf16 "
                         f"({device_tag()})",
                         ["dispatcher", "inter-node rows/token", "dispatch inter-node MB", "x naive", "intra-node MB",
                          "combine inter-node MB", "dispatch ms", "x naive", "combine ms", "x naive"])
    b = s[names[0]]
    for n in names:
        v = s[n]
        t.add_row(n, f"{v['rows_per_token']:.2f}", f"{v['inter'] / 1e6:.1f}", benchtools.ratio(v['inter'], b['inter']),
                  f"{v['intra'] / 1e6:.1f}", f"{v['c_inter'] / 1e6:.1f}",
                  f"{v['d_s'] * 1e3:.0f}", benchtools.ratio(v['d_s'], b['d_s']),
                  f"{v['c_s'] * 1e3:.0f}", benchtools.ratio(v['c_s'], b['c_s']))
    Console(width=200).print(t)
    two = s[names[-1]]["rows_per_token"]
    ok = two <= a.max_nodes
    print(f"two-stage inter-node rows per token: {two:.3f} (bound: <= {a.max_nodes} remote nodes) -> "
          f"{'OK' if ok else 'VIOLATED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
