"""The symmetric transport beside the collective one on the same job, gloo CPU ranks.

Both Buffers live in the same processes and take turns on the same inputs (A, B, A, B, ...), so machine
noise hits both alike; each iteration's time is the slowest rank's; medians and the spread (min-max)
over iterations are printed, with the symmetric/collective ratio. On the CPU the symmetric transport runs
the heap protocol with its native executor (``--num-sms`` worker threads per rank, torch copies straight
into the peers' shared-memory heaps); ``--executor triton`` runs the Triton kernels in the interpreter
instead (the protocol's cost there, not what the kernels do on a GPU: ``bench/sm_split.py``).
``--backward``: each step is dispatch + combine forward and their backward (a combine and a dispatch).

    .venv/bin/python bench/ep_transport_cpu.py [--ranks 2] [--tokens 64] [--hidden 256] [--experts 8]
        [--topk 2] [--num-sms 4] [--iters 5] [--backward] [--fp8] [--executor native|triton]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moekit import benchtools
from moekit.ep import Buffer
from moekit.testing import spawn


def _rank(rank, world, tokens, hidden, experts, topk, num_sms, iters, seed, backward=False, fp8=False,
          heap_bytes=None):
    gen = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices
    w = torch.rand(tokens, topk, generator=gen)
    bufs = {"collective": Buffer(hierarchical=False, transport="collective"),
            "symmetric": Buffer(hierarchical=False, transport="symmetric", num_sms=num_sms, heap_bytes=heap_bytes)}
    steps = ("step",) if backward else ("dispatch", "combine")
    times = {n: {s: [] for s in steps} for n in bufs}
    same = True
    for it in range(iters + 1):  # the first round warms up
        got = {}
        for name, buf in bufs.items():
            dist.barrier()
            t0 = time.perf_counter()
            if backward:  # forward and backward: dispatch, combine, combine's grad (a dispatch), dispatch's grad
                xx = x.clone().requires_grad_()
                out = buf.dispatch(xx, idx, w, experts, fp8=fp8, dequantize=fp8)
                y = buf.combine(out.recv_x, out.handle).combined_x
                y.float().square().sum().backward()
                t1 = t2 = time.perf_counter()
                res = (y.detach(), xx.grad)
            else:
                out = buf.dispatch(x, idx, w, experts, fp8=fp8)
                t1 = time.perf_counter()
                dist.barrier()
                t2 = time.perf_counter()
                rx = out.recv_x[0].float().to(torch.bfloat16) if fp8 else out.recv_x
                y = buf.combine(rx, out.handle).combined_x
                res = (rx, y)
            t3 = time.perf_counter()
            got[name] = res
            if it:
                if backward:
                    times[name]["step"].append(t3 - t0)
                else:
                    times[name]["dispatch"].append(t1 - t0)
                    times[name]["combine"].append(t3 - t2)
        same &= all(torch.equal(a, b) for a, b in zip(got["collective"], got["symmetric"]))
    return {"times": times, "same": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--num-sms", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backward", action="store_true", help="time dispatch+combine forward and backward")
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (1x128 scales)")
    p.add_argument("--heap-bytes", type=int, default=None, help="per-rank heap (default: the Buffer's)")
    p.add_argument("--executor", choices=("native", "triton"), default="native")
    a = p.parse_args(argv)
    import os

    os.environ["MOEKIT_COMM_EXECUTOR"] = a.executor
    from rich.console import Console

    res = spawn(_rank, a.ranks, a.tokens, a.hidden, a.experts, a.topk, a.num_sms, a.iters, a.seed, a.backward,
                a.fp8, a.heap_bytes, timeout=1800)
    t = benchtools.table(f"collective vs symmetric transport, {a.ranks} gloo ranks, T={a.tokens}/rank, H={a.hidden}, "
                         f"E={a.experts}, top-{a.topk}, bf16{' fp8 dispatch' if a.fp8 else ''}, "
                         f"num_sms={a.num_sms} ({a.executor}) "
                         f"({benchtools.device_tag('1 thread/rank')})",
                         ["step", "collective ms (min-max)", "symmetric ms (min-max)", "symmetric / collective"])
    for step in (("step",) if a.backward else ("dispatch", "combine")):
        per = {n: [max(v) for v in zip(*[r["times"][n][step] for r in res])] for n in ("collective", "symmetric")}
        med = {n: statistics.median(v) for n, v in per.items()}
        cell = {n: f"{med[n] * 1e3:.1f} ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})" for n, v in per.items()}
        t.add_row(step, cell["collective"], cell["symmetric"], benchtools.ratio(med["symmetric"], med["collective"]))
    Console(width=200).print(t)
    print("results bitwise equal:", all(r["same"] for r in res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
