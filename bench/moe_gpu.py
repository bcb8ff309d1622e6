"""The MoE layer and the Buffer on one GPU: correctness of the FP8 expert path and speed beside bf16.

Run by ``bench/gpu_suite.sh`` after the FP8 kernel sections. One process, world size 1 (no
communication): what it times is the layer's own work, i.e. the gate, the Buffer's packing of rows
per destination, the experts (bf16 grouped torch path vs the Triton FP8 grouped GEMM), combine, and
the backward.

Sections (each in its own try/except):
1. Buffer dispatch+combine on CUDA tensors (T=4096, H=7168, top-8 of 256): result against the
   identity, time, and GB/s of the rows moved, beside a plain device copy of the same bytes;
2. MoE forward and forward+backward, bf16, V3 expert shape (H=7168, I=2048), 32 experts, T=4096:
   ``expert_backend="torch"`` vs ``"fp8"``; FP8 output against bf16 with DeepGEMM's measure.

Exit codes: 0 ran and checks passed; 1 a check failed or a section raised; 3 no GPU.
``MOEKIT_BENCH_DRYRUN=1`` runs tiny sizes on the CPU (plumbing only; numbers mean nothing).
Results: ``$OUT/moe_gpu.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

DRY = os.environ.get("MOEKIT_BENCH_DRYRUN", "0") == "1"


def timed_ms(torch, fn, iters: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on the GPU, the host clock in a dry run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if DRY:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def section_buffer(torch, dev: str) -> dict:
    from moekit import Buffer

    t, h, k, e = (64, 256, 8, 32) if DRY else (4096, 7168, 8, 256)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(t, h, device=dev, generator=g).to(torch.bfloat16)
    idx = torch.rand(t, e, device=dev, generator=g).topk(k, dim=1).indices
    w = torch.rand(t, k, device=dev, generator=g)
    buf = Buffer()

    def run():
        out = buf.dispatch(x, idx, w, e)
        return buf.combine(out.recv_x, out.handle).combined_x

    y = run()
    ok = bool(torch.equal(y, x))  # one rank: each token reaches one destination, so combine returns x
    ms = timed_ms(torch, run)
    moved = 2 * 2 * x.numel() * x.element_size()  # dispatch + combine, each read + written once
    dst = torch.empty_like(x)
    copy_ms = timed_ms(torch, lambda: (dst.copy_(x), dst.copy_(x)))
    return {"ok": ok, "ms": ms, "gbps": moved / ms / 1e6, "copy_gbps": moved / copy_ms / 1e6}


def section_moe(torch, dev: str) -> dict:
    from moekit import MoE, MoEConfig
    from moekit.benchtools import calc_diff

    h, i, e, t = (256, 128, 32, 64) if DRY else (7168, 2048, 32, 4096)
    dtype = torch.float32 if DRY else torch.bfloat16
    base = MoEConfig.preset("deepseek-v3", hidden_size=h, moe_intermediate_size=i, n_routed_experts=e,
                            n_group=8, topk_group=4, num_experts_per_tok=8)
    x = torch.randn(t, h, device=dev, dtype=dtype, generator=torch.Generator(device=dev).manual_seed(1))
    flops = t * base.num_experts_per_tok * 3 * 2 * h * i  # routed experts, forward

    def measure(backend: str):
        torch.manual_seed(0)  # the same weights for both backends
        moe = MoE(base.replace(expert_backend=backend), device=dev, dtype=dtype)
        xin = x.clone().requires_grad_(True)
        with torch.no_grad():
            out = moe(x).float()
        fwd = timed_ms(torch, lambda: moe(x))
        both = timed_ms(torch, lambda: moe(xin).float().square().mean().backward(), iters=5, warmup=2)
        return {"fwd_ms": fwd, "fwd_bwd_ms": both, "expert_tflops_fwd": flops / fwd / 1e9}, out

    res, outs = {}, {}
    for backend in ("torch", "fp8"):
        res[backend], outs[backend] = measure(backend)
    res["fp8_vs_bf16_diff"] = calc_diff(outs["fp8"], outs["torch"])
    res["ok"] = res["fp8_vs_bf16_diff"] < 2e-3  # quantizing both operands to e4m3
    return res


def main() -> int:
    import torch

    if not torch.cuda.is_available() and not DRY:
        print("moe_gpu: no GPU visible to torch; nothing measured. Exit code 3.")
        return 3
    from moekit import benchtools

    dev = "cpu" if DRY else "cuda"
    results: dict = {"tag": benchtools.device_tag("dry run" if DRY else "")}
    failed = False
    for name, fn in (("buffer", section_buffer), ("moe", section_moe)):
        try:
            results[name] = fn(torch, dev)
            failed |= not results[name]["ok"]
        except Exception:
            traceback.print_exc()
            results[name] = {"error": traceback.format_exc(limit=3)}
            failed = True
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "moe_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)
    from rich.console import Console

    tab = benchtools.table(f"MoE layer and Buffer on one device ({results['tag']})", ["what", "value", "baseline"])
    b, m = results.get("buffer", {}), results.get("moe", {})
    if "ms" in b:
        tab.add_row("Buffer dispatch+combine, T=4096 H=7168 top-8", f"{b['ms']:.3f} ms, {b['gbps']:.0f} GB/s",
                    f"copy {b['copy_gbps']:.0f} GB/s ({benchtools.ratio(b['gbps'], b['copy_gbps'])}); "
                    f"{'ok' if b['ok'] else 'WRONG'}")
    if "torch" in m:
        for what in ("fwd_ms", "fwd_bwd_ms"):
            tab.add_row(f"MoE {what[:-3]} FP8 experts", f"{m['fp8'][what]:.2f} ms",
                        f"bf16 {m['torch'][what]:.2f} ms ({benchtools.ratio(m['torch'][what], m['fp8'][what])} "
                        "speed-up)")
        tab.add_row("FP8 vs bf16 output (DeepGEMM diff)", f"{m['fp8_vs_bf16_diff']:.2e}",
                    "ok" if m["ok"] else "TOO LARGE")
    Console(width=150).print(tab)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
