"""Forward+backward tokens/s of the EP MoE layer on 4 gloo ranks: moekit's Buffer against the naive
per-(token, expert) dispatcher (``moekit.ep.naive.NaiveBuffer``, as Megatron's all-to-all dispatcher), in
one run, same layer, same weights, same tokens; the outputs of both are checked to agree. A third row
runs moekit's Buffer with ``dispatch_fp8`` (rows sent in FP8 as DeepSeek-V3 does; combine in fp32).

    .venv/bin/python bench/moe_cpu.py [--tokens 512] [--hidden 256] [--experts 32] [--topk 8] [--steps 10]

NaiveBuffer trains through moekit's own autograd pair (``moekit.ep.autograd``): dispatch's backward is
its combine plus a reverse all-to-all of the weight gradients; combine's backward is a forward
all-to-all of the output gradients, with the counts its handle holds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from rich.console import Console

from moekit import MoEConfig, benchtools
from moekit.benchtools import calc_diff
from moekit.ep.naive import NaiveBuffer
from moekit.moe import MoE, sync_grads
from moekit.testing import spawn

NAMES = ("naive", "moekit", "moekit-fp8")


def _rank(rank: int, world: int, opts: dict) -> dict:
    cfg = MoEConfig(hidden_size=opts["hidden"], moe_intermediate_size=opts["inter"], n_routed_experts=opts["experts"],
                    n_shared_experts=1, num_experts_per_tok=opts["topk"], n_group=8, topk_group=4,
                    seq_aux_loss_alpha=0.0)
    layers = {}
    for name in NAMES:
        torch.manual_seed(0)  # the same weights for all
        layers[name] = MoE(cfg.replace(dispatch_fp8=name == "moekit-fp8"), ranks_per_node=world,
                           buffer=NaiveBuffer() if name == "naive" else None)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(opts["tokens"], cfg.hidden_size, generator=g, requires_grad=True)
    grad = torch.randn(opts["tokens"], cfg.hidden_size, generator=g)
    out = {name: dict(times=[], cpu=[]) for name in layers}
    # The two alternate step by step, so that both see the same machine load (the CPU is shared).
    for step in range(opts["warmup"] + opts["steps"]):
        for name, moe in layers.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            y = moe(x)
            y.backward(grad)
            sync_grads(moe)
            c1 = time.process_time()  # before the barrier: this rank's own work (all its threads)
            dist.barrier()
            if step >= opts["warmup"]:
                out[name]["times"].append(time.perf_counter() - t0)
                out[name]["cpu"].append(c1 - c0)
            if step == 0:
                out[name]["y"], out[name]["gx"] = y.detach().clone(), x.grad.clone()
                moe.buffer.stats.reset()
            x.grad = None
            moe.zero_grad()
    for name, moe in layers.items():
        times, cpu = sorted(out[name].pop("times")), sorted(out[name].pop("cpu"))
        out[name]["time"], out[name]["cpu"] = times[len(times) // 2], cpu[len(cpu) // 2]
        out[name]["bytes"] = moe.buffer.stats.total.total_bytes / (opts["warmup"] + opts["steps"] - 1)
    out["max_diff"] = max(float((out["naive"]["y"] - out["moekit"]["y"]).abs().max()),
                          float((out["naive"]["gx"] - out["moekit"]["gx"]).abs().max()))
    y, gx = out["moekit-fp8"]["y"], out["moekit-fp8"]["gx"]
    out["fp8_diff"] = max(calc_diff(y, out["moekit"]["y"]), calc_diff(gx, out["moekit"]["gx"]))
    for name in layers:
        del out[name]["y"], out[name]["gx"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=128, help="moe_intermediate_size")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    opts = vars(p.parse_args())
    res = spawn(_rank, opts["world"], opts, timeout=900)
    # A step ends when the slowest rank ends: the median step time of rank 0 (barriers around each step).
    tokens = opts["tokens"] * opts["world"]
    rows = {}
    for name in NAMES:
        t = res[0][name]["time"]
        rows[name] = dict(tps=tokens / t, ms=t * 1e3, bytes=sum(r[name]["bytes"] for r in res),
                          cpu=sum(r[name]["cpu"] for r in res))
    table = benchtools.table(
        f"MoE layer forward+backward, EP={opts['world']} gloo ranks, T={opts['tokens']}/rank, H={opts['hidden']}, "
        f"I={opts['inter']}, E={opts['experts']}, top-{opts['topk']} ({benchtools.device_tag()})",
        ["dispatcher", "step ms", "tokens/s", "ratio", "CPU s/step", "CPU ratio", "bytes/step", "bytes ratio"])
    base = rows["naive"]
    for name, label in (("naive", "naive"), ("moekit", "moekit"), ("moekit-fp8", "moekit, FP8 dispatch")):
        r = rows[name]
        table.add_row(label, f"{r['ms']:.1f}", f"{r['tps']:,.0f}", benchtools.ratio(r['tps'], base['tps']),
                      f"{r['cpu']:.3f}", benchtools.ratio(r['cpu'], base['cpu']),
                      f"{r['bytes'] / 2**20:.2f} MiB", benchtools.ratio(r['bytes'], base['bytes']))
    con = Console()
    con.print(table)
    diff = max(r["max_diff"] for r in res)
    con.print("naive = one row per (token, expert), as Megatron's all-to-all dispatcher; moekit = moekit.Buffer "
              "(one row per (token, rank)); FP8 dispatch: rows sent as e4m3 + 1x128 scales, combine in fp32. "
              "Step ms: median wall time of a step (barriers around it); CPU s/step: "
              "median process CPU time of a step, summed over ranks (less sensitive to a shared machine's load); "
              "bytes/step: all ranks, dispatch + combine, forward + backward.")
    con.print(f"naive and moekit: outputs and input gradients agree within {diff:.1e} (fp32); FP8 dispatch vs "
              f"moekit: DeepGEMM's diff {max(r['fp8_diff'] for r in res):.1e} (quantized activations)")


if __name__ == "__main__":
    main()
