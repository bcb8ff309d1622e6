"""Expert-parallel dispatch + combine on gloo CPU ranks: moekit.Buffer against the naive dispatcher.

The naive dispatcher (``moekit.ep.naive.NaiveBuffer``) sends one row per (token, expert) pair, as
Megatron's all-to-all token dispatcher does; ``moekit.Buffer`` sends one row per (token, destination
rank). Both run in the same processes on the same routing; bytes come from each buffer's ``stats``
(summed over ranks), times are the slowest rank's, median over iterations. Ratios are to the naive one.

    .venv/bin/python bench/ep_cpu.py [--ranks 4] [--tokens 4096] [--hidden 2048] [--experts 64] [--topk 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moekit import benchtools
from moekit.ep import Buffer
from moekit.ep.naive import NaiveBuffer
from moekit.testing import spawn


def random_topk(tokens: int, experts: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform top-k: k distinct experts per token."""
    return torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices


def time_buffer(buf, x, idx, w, experts: int, iters: int, **dispatch_kw) -> dict:
    """Median (over iterations) of this rank's dispatch and combine times, and the bytes of one of each."""
    times_d, times_c = [], []
    for it in range(iters + 1):  # the first iteration warms up
        dist.barrier()
        t0 = time.perf_counter()
        out = buf.dispatch(x, idx, w, experts, **dispatch_kw)
        t1 = time.perf_counter()
        d_bytes = buf.stats.last
        recv = out.recv_x[0].float().to(x.dtype) if isinstance(out.recv_x, tuple) else out.recv_x
        dist.barrier()
        t2 = time.perf_counter()
        buf.combine(recv, out.handle)
        t3 = time.perf_counter()
        c_bytes = buf.stats.last
        if it:
            times_d.append(t1 - t0)
            times_c.append(t3 - t2)
    return {"dispatch_s": times_d, "combine_s": times_c, "dispatch": d_bytes, "combine": c_bytes,
            "rows": out.recv_x[0].shape[0] if isinstance(out.recv_x, tuple) else out.recv_x.shape[0]}


def slowest_median(per_rank: list[list[float]]) -> float:
    """Per iteration the slowest rank, then the median over iterations."""
    return statistics.median(max(vals) for vals in zip(*per_rank))


def _rank(rank, world, tokens, hidden, experts, topk, iters, seed):
    gen = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = random_topk(tokens, experts, topk, gen)
    w = torch.rand(tokens, topk, generator=gen)
    results = {
        "naive (per token, expert)": time_buffer(NaiveBuffer(), x, idx, w, experts, iters),
        "moekit.Buffer": time_buffer(Buffer(hierarchical=False), x, idx, w, experts, iters),
        "moekit.Buffer, FP8 dispatch": time_buffer(Buffer(hierarchical=False), x, idx, w, experts, iters, fp8=True),
    }
    return results


def device_tag() -> str:
    return benchtools.device_tag("1 thread/rank")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from rich.console import Console

    res = spawn(_rank, a.ranks, a.tokens, a.hidden, a.experts, a.topk, a.iters, a.seed, timeout=1800)
    names = list(res[0])
    base = names[0]

    def summary(name):
        d_bytes = sum(r[name]["dispatch"].total_bytes for r in res)
        c_bytes = sum(r[name]["combine"].total_bytes for r in res)
        remote = sum(r[name]["dispatch"].intra_node_bytes + r[name]["dispatch"].inter_node_bytes for r in res)
        return {"d_bytes": d_bytes, "c_bytes": c_bytes, "remote": remote,
                "rows": sum(r[name]["rows"] for r in res),
                "d_s": slowest_median([r[name]["dispatch_s"] for r in res]),
                "c_s": slowest_median([r[name]["combine_s"] for r in res])}

    s = {n: summary(n) for n in names}
    t = benchtools.table(f"dispatch + combine, {a.ranks} gloo ranks, T={a.tokens}/rank, H={a.hidden}, "
                         f"E={a.experts}, top-{a.topk}, bf16 ({device_tag()})",
                         ["dispatcher", "rows recv", "dispatch MB", "x naive", "to other ranks MB", "combine MB",
                          "dispatch ms", "x naive", "combine ms", "x naive"])
    b = s[base]
    for n in names:
        v = s[n]
        t.add_row(n, str(v["rows"]), f"{v['d_bytes'] / 1e6:.1f}", benchtools.ratio(v['d_bytes'], b['d_bytes']),
                  f"{v['remote'] / 1e6:.1f}", f"{v['c_bytes'] / 1e6:.1f}",
                  f"{v['d_s'] * 1e3:.0f}", benchtools.ratio(v['d_s'], b['d_s']),
                  f"{v['c_s'] * 1e3:.0f}", benchtools.ratio(v['c_s'], b['c_s']))
    Console(width=200).print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
