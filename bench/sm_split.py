"""SM split: moekit's FP8 GEMM on ``S - k`` SMs beside dispatch + combine on ``k`` SMs (GPU only).

DeepSeek-V3 (report, section 3.2.2) gives 20 of the H800's 132 SMs to communication kernels that push
token rows straight into the other GPUs' receive buffers, so that the GEMMs keep running on the rest.
This script measures that trade on one GPU with 8 virtual ranks (``moekit.ep.VirtualGroup``: the eight
heaps on one device, every push a real kernel of exactly ``k`` programs):

* correctness first: the virtual ranks' dispatch/combine against a plain torch computation;
* for each k: the GEMM alone on ``S - k`` SMs (TFLOP/s), dispatch + combine alone on ``k`` SMs (GB/s of
  rows moved, all ranks together), and both at once on two streams; a device-to-device copy as the
  bandwidth baseline of the same run;
* the GB/s per SM of the communication (median over k of GB/s / k), written to ``reports/sm_split.json``
  under the key ``gbps_per_sm`` (``moekit.plan`` reads it), and a plot when matplotlib is there.

    python bench/sm_split.py [--ks 0,4,8,12,16,20,24,32] [--tokens 4096] [--hidden 7168] [--iters 5]

Exit codes: 0 measured and correct; 1 a correctness check failed; 3 no GPU (nothing measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _events(stream):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(stream)
    return a, b


def make_job(world: int, tokens: int, hidden: int, experts: int, topk: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device) for _ in range(world)]
    idxs = [torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices.to(device) for _ in range(world)]
    ws = [torch.rand(tokens, topk, generator=g).to(device) for _ in range(world)]
    return xs, idxs, ws


def check_correct(world: int, device, num_sms: int) -> bool:
    """Virtual ranks against torch: received rows in (source, token) order; combine of identity experts
    = x times the number of distinct destination ranks (exact: bf16 values summed in fp32)."""
    from moekit.ep import VirtualGroup

    e = 4 * world
    xs, idxs, ws = make_job(world, 64, 256, e, 4, device, seed=1)
    vg = VirtualGroup(world, device, num_sms=num_sms, heap_bytes=8 << 20)
    outs = vg.dispatch(xs, idxs, ws, e)
    epr = e // world
    in_rank = [torch.zeros(64, world, dtype=torch.bool, device=device).scatter_(1, i // epr, True) for i in idxs]
    ok = True
    for d, out in enumerate(outs):
        want = torch.cat([xs[s][in_rank[s][:, d]] for s in range(world)])
        ok &= torch.equal(out.recv_x, want)
    ys = vg.combine([o.recv_x for o in outs], [o.handle for o in outs])
    for s, y in enumerate(ys):
        want = (xs[s].float() * in_rank[s].sum(1, keepdim=True)).to(torch.bfloat16)
        ok &= torch.equal(y.combined_x, want)
    return bool(ok)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="0,4,8,12,16,20,24,32")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per virtual rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--gemm", default="8192,7168,2048", help="M,N,K of the FP8 GEMM")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default="reports/sm_split.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sm_split: no GPU visible to torch; nothing measured (exit 3)")
        return 3
    from moekit import benchtools, platform
    from moekit.ep import VirtualGroup
    from moekit.kernels import fp8_gemm_nt, per_block_quant, per_token_group_quant

    budget = float(os.environ.get("MOEKIT_BENCH_BUDGET_S", "120"))
    t_start = time.monotonic()
    dev = torch.device("cuda")
    sms = platform.sm_count()
    ks = [int(k) for k in a.ks.split(",")]
    if not check_correct(a.ranks, dev, 8):
        print("sm_split: virtual-rank dispatch/combine differ from the torch reference: FAILED")
        return 1
    print("sm_split: correctness (8 virtual ranks vs torch): ok")

    m, n, kk = (int(v) for v in a.gemm.split(","))
    qa = per_token_group_quant(torch.randn(m, kk, device=dev))
    qb = per_block_quant(torch.randn(n, kk, device=dev))

    def gemm(num_sms):
        return fp8_gemm_nt(qa.data, qa.scales, qb.data, qb.scales, num_sms=num_sms)

    flops = 2.0 * m * n * kk
    xs, idxs, ws = make_job(a.ranks, a.tokens, a.hidden, a.experts, a.topk, dev)
    src = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    copy_gbps = 2 * 5 * src.numel() / (time.perf_counter() - t0) / 1e9  # read + write
    heap = 2 * a.ranks * (a.tokens * a.topk + 1) * (a.hidden * 2 + 16 * a.topk) + (1 << 20)
    rows = []
    for k in ks:
        if time.monotonic() - t_start > budget:
            print(f"sm_split: budget of {budget:.0f} s spent; k >= {k} not measured")
            break
        row = {"k": k}
        gemm(sms - k if k else None)  # compile / autotune outside the timing
        torch.cuda.synchronize()
        t = []
        for _ in range(a.iters):
            e0, e1 = _events(torch.cuda.current_stream())
            gemm(sms - k if k else None)
            e1.record()
            torch.cuda.synchronize()
            t.append(e0.elapsed_time(e1) / 1e3)
        row["gemm_alone_tflops"] = flops / statistics.median(t) / 1e12
        if k:
            vg = VirtualGroup(a.ranks, dev, num_sms=k, heap_bytes=heap)
            outs = vg.dispatch(xs, idxs, ws, a.experts)  # warm-up (compiles the kernels)
            vg.combine([o.recv_x for o in outs], [o.handle for o in outs])
            torch.cuda.synchronize()
            tc, moved = [], 0
            for _ in range(a.iters):
                c0 = time.perf_counter()
                outs = vg.dispatch(xs, idxs, ws, a.experts)
                vg.combine([o.recv_x for o in outs], [o.handle for o in outs])
                torch.cuda.synchronize()
                tc.append(time.perf_counter() - c0)
            moved = sum(s.total.total_bytes for s in vg.stats) / vg.stats[0].num_calls
            row["comm_alone_gbps"] = moved / statistics.median(tc) / 1e9
            # Together: the GEMMs enqueued on one stream, the exchanges on another (the host polls flags).
            gs, cs = torch.cuda.Stream(), torch.cuda.Stream()
            torch.cuda.synchronize()
            with torch.cuda.stream(gs):
                g0, g1 = _events(gs)
                for _ in range(a.iters):
                    gemm(sms - k)
                g1.record(gs)
            c0 = time.perf_counter()
            with torch.cuda.stream(cs):
                for _ in range(a.iters):
                    outs = vg.dispatch(xs, idxs, ws, a.experts)
                    vg.combine([o.recv_x for o in outs], [o.handle for o in outs])
                cs.synchronize()
            comm_s = (time.perf_counter() - c0) / a.iters
            torch.cuda.synchronize()
            row["gemm_together_tflops"] = flops * a.iters / (g0.elapsed_time(g1) / 1e3) / 1e12
            row["comm_together_gbps"] = moved / comm_s / 1e9
        rows.append(row)
        print("sm_split:", json.dumps({kk_: (round(v, 2) if isinstance(v, float) else v) for kk_, v in row.items()}))
    per_sm = [r["comm_alone_gbps"] / r["k"] for r in rows if r.get("comm_alone_gbps")]
    full = next((r["gemm_alone_tflops"] for r in rows if r["k"] == 0), None)
    report = {"device": benchtools.device_tag(), "ranks": a.ranks, "tokens": a.tokens, "hidden": a.hidden,
              "topk": a.topk, "gemm_mnk": [m, n, kk], "device_copy_gbps": copy_gbps, "rows": rows,
              "gbps_per_sm": statistics.median(per_sm) if per_sm else None,
              "gemm_all_sms_tflops": full}
    for path in [a.json] + ([os.path.join(os.environ["OUT"], "sm_split.json")] if os.environ.get("OUT") else []):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    print(f"sm_split: device copy {copy_gbps:.0f} GB/s; GB/s per SM {report['gbps_per_sm']}; wrote {a.json}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        kx = [r["k"] for r in rows if "comm_alone_gbps" in r]
        ax.plot(kx, [r["comm_alone_gbps"] for r in rows if "comm_alone_gbps" in r], "o-", label="comm alone GB/s")
        ax.plot(kx, [r["comm_together_gbps"] for r in rows if "comm_alone_gbps" in r], "o--", label="comm + GEMM")
        ax2 = ax.twinx()
        ax2.plot([r["k"] for r in rows], [r["gemm_alone_tflops"] for r in rows], "s-", color="gray",
                 label="GEMM alone TFLOP/s")
        ax.set_xlabel("k (communication SMs)")
        ax.legend(loc="upper left")
        ax2.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(os.environ.get("OUT", "reports"), "sm_split.png"))
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
