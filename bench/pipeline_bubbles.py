"""Pipeline bubbles of 1F1B, DualPipe and DualPipeV, measured on gloo ranks with sleep-based stages.

Every stage's forward sleeps F, its backward B (of which W is the weight-gradient part, deferred to
``WeightGradStore`` when the schedule asks for it), and an overlapped F&B pair sleeps F&B. Sleeping
needs no CPU, so 8 ranks on 2 cores measure the schedules rather than the machine.

Per schedule and PP (pipeline stages; DualPipeV runs them on PP/2 ranks) it reports the bubble per
rank (step time minus that rank's busy time, from the recorded timeline) beside the formula of
DualPipe's README (deepseek-ai/DualPipe) and moekit's simulator, the peak number of micro-batch activations
held per rank beside the table, and the bubble as a ratio to 1F1B's measured in the same run. A
timeline PNG per schedule goes to ``--png-dir`` (``docs/img`` by default) for ``--png-pp``.

    .venv/bin/python bench/pipeline_bubbles.py [--pp 4 8] [--chunks 20] [--f-ms 20 --b-ms 40 --w-ms 20]
    .venv/bin/python bench/pipeline_bubbles.py --moe-only --moe-png docs/img/pipeline_moe_overlap.png
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch
import torch.nn as nn

from moekit.pipeline import (
    DualPipe,
    DualPipeV,
    OneFOneB,
    WeightGradStore,
    backward_chunk,
    gather_records,
    plot_timeline,
    set_p2p_tensor_dtype,
    set_p2p_tensor_shapes,
)
from moekit.schedule import UniformCosts, bubble_formula, simulate
from moekit.testing import spawn

ROWS, HIDDEN = 2, 8  # the tensor passed along: tiny, the sleeps are the work


class _SleepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, times):
        ctx.times = times
        if not times.get("in_fb"):
            time.sleep(times["F"])
        return x * w

    @staticmethod
    def backward(ctx, g):
        t = ctx.times
        if not t.get("in_fb"):
            time.sleep(t["B"] - t["W"])

        def weight_part():
            time.sleep(t["W"])

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_part)
        elif not t.get("in_fb"):
            weight_part()
        return g, None, None


class SleepStage(nn.Module):
    """A stage whose F, B, W and F&B take the fixed times of ``times`` (seconds)."""

    def __init__(self, times: dict):
        super().__init__()
        self.times = times
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return _SleepFn.apply(x, self.w, self.times)

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        t = module0.times
        t["in_fb"] = True  # the pair sleeps F&B as a whole, as if its two halves overlapped
        try:
            out0 = [module0(*inputs0)]
            loss0 = criterion0(*out0, *labels0) if criterion0 is not None else None
            backward_chunk(loss1, outputs1, output_grads1)
            time.sleep(t["FB"])
        finally:
            t["in_fb"] = False
        return out0, loss0


def _criterion(out, label):
    return ((out - label) ** 2).mean()


def _ping_pong(rank, rounds=50):
    """One-way p2p latency between ranks 0 and 1 (median of ``rounds`` round trips), seconds."""
    import torch.distributed as dist

    buf = torch.zeros(ROWS, HIDDEN)
    trips = []
    for _ in range(rounds):
        t = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        trips.append(time.perf_counter() - t)
    dist.barrier()
    return sorted(trips)[len(trips) // 2] / 2


def _rank(rank, world, kind, chunks, times, steps):
    torch.manual_seed(0)
    latency = _ping_pong(rank) if world > 1 else 0.0
    set_p2p_tensor_shapes([(ROWS, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    n_mod = 1 if kind == "1f1b" else 2
    mods = [SleepStage(dict(times)) for _ in range(n_mod)]
    cls = {"1f1b": OneFOneB, "dualpipe": DualPipe, "dualpipev": DualPipeV}[kind]
    pipe = cls(mods[0] if n_mod == 1 else mods, record=True)
    n_in = chunks // 2 if kind == "dualpipe" else chunks
    x = torch.randn(n_in * ROWS, HIDDEN)
    first = rank == 0 or (kind == "dualpipe" and rank == world - 1)
    last = rank == world - 1 or (kind != "1f1b" and rank == 0)
    out = []
    for _ in range(steps):
        pipe.step(*((x,) if first else ()), num_chunks=chunks, criterion=_criterion,
                  labels=(x,) if last else ())
        out.append((gather_records(pipe.records), pipe.peak_activations))
    return out, latency


def _moe_rank(rank, world, hidden, tokens, chunks, steps):
    """PP=2 x EP=2: DualPipe over MoEStages of 2 blocks, with the MoE-aware F&B hook and without it (F then
    B, same modules). Returns (the overlap records of the last hooked step, shortest hooked step s,
    shortest plain step s) on pipeline 0, None on pipeline 1."""
    import torch.distributed as dist

    from moekit import MoEConfig
    from moekit.moe import MoE
    from moekit.pipeline import MoEBlock, MoEStage

    pipes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    eps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    cfg = MoEConfig(hidden_size=hidden, moe_intermediate_size=hidden, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, n_group=1, topk_group=1)
    pp = rank % 2
    mods = []
    for chunk, stage in enumerate((pp, 1 - pp)):
        torch.manual_seed(stage)
        mods.append(MoEStage([MoEBlock(MoE(cfg, group=eps[rank % 2])) for _ in range(2)], record=True,
                             rank=pp, chunk=chunk))
    pipe = DualPipe(mods, process_group=pipes[rank // 2], record=True)
    pipe.set_p2p_tensor_shapes([(tokens, hidden)])
    pipe.set_p2p_tensor_dtype(torch.float32)
    x = torch.randn(chunks // 2 * tokens, hidden)
    best = {}
    recs = []
    # Alternate hooked and plain steps (the first of each warms up), so both see the same machine load.
    for i in range(2 * steps):
        hooked = i % 2 == 0
        pipe.overlapped_forward_backward = hooked
        for m in mods:
            m.clear_records()
        dist.barrier(pipes[rank // 2])
        t0 = time.time()
        pipe.step(x, num_chunks=chunks, criterion=_criterion, labels=(x,))
        dt = time.time() - t0
        if i >= 2:
            best[hooked] = min(best.get(hooked, dt), dt)
        if hooked:
            recs = mods[0].overlap_records + mods[1].overlap_records
            recs += [r for r in pipe.records if r.phase != "FB"]  # the F&B pairs are drawn by their pieces
    return (recs, best[True], best[False]) if rank < 2 else None


def _hidden_fraction(records, backward: bool) -> float:
    """Share of the transfers' time (forward's, or backward's) during which the other direction computed."""
    comm = [r for r in records if r.phase == "COMM" and (r.chunk_b is not None) == backward]
    other = [r for r in records if r.phase == ("F" if backward else "B")]
    total = sum(c.end - c.start for c in comm)
    covered = sum(max(0.0, min(c.end, p.end) - max(c.start, p.start)) for c in comm for p in other
                  if p.rank == c.rank)
    return covered / total if total else float("nan")


def _measure(kind, pp, chunks, times, steps):
    world = pp // 2 if kind == "dualpipev" else pp
    res = spawn(_rank, world, kind, chunks, times, steps, timeout=600)
    latency = res[0][1]
    peaks = [max(p for _, p in r[0]) for r in res]
    # The shared 2-core machine is noisy: of the steps after the first (which warms gloo up), keep the
    # one with the shortest span.
    spans = [(max(r.end for r in recs) - min(r.start for r in recs), recs) for recs, _ in res[0][0][1:]]
    span, records = min(spans, key=lambda x: x[0])
    busy = [sum(r.end - r.start for r in records if r.rank == k) for k in range(world)]
    return records, span, [span - b for b in busy], peaks, latency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--f-ms", type=float, default=20.0)
    ap.add_argument("--b-ms", type=float, default=40.0)
    ap.add_argument("--w-ms", type=float, default=20.0)
    ap.add_argument("--fb-ms", type=float, default=None, help="time of an overlapped F&B pair (default F+B)")
    ap.add_argument("--steps", type=int, default=4, help="steps per schedule; the first is warm-up")
    ap.add_argument("--png-dir", default="docs/img")
    ap.add_argument("--png-pp", type=int, default=8)
    ap.add_argument("--moe-png", default=None, help="also draw the MoE overlap timeline (PP=2 x EP=2) here")
    ap.add_argument("--moe-only", action="store_true", help="only the MoE overlap part (with --moe-png)")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    fb_ms = args.fb_ms if args.fb_ms is not None else args.f_ms + args.b_ms
    times = {"F": args.f_ms / 1e3, "B": args.b_ms / 1e3, "W": args.w_ms / 1e3, "FB": fb_ms / 1e3}
    # DeepSeek's README counts B as the full backward, of which W is the weight part.
    f, b, w = args.f_ms, args.b_ms - args.w_ms, args.w_ms
    costs = UniformCosts(f, b, w, fb_ms)
    tag = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), gloo, torch "
           f"{torch.__version__}, {datetime.date.today().isoformat()}")
    console = Console(width=170)
    console.print(f"pipeline_bubbles: {tag}; F={args.f_ms} B={args.b_ms} W={args.w_ms} F&B={fb_ms} ms, "
                  f"{args.chunks} micro-batches")
    table = Table(title="bubble per rank (ms) and activations held (micro-batches)")
    for col in ("PP", "schedule", "ranks", "formula", "simulated (max)", "p2p latency", "simulated + latency",
                "measured (max / mean)", "measured vs 1F1B", "peak act. (max)", "table", "step ms"):
        table.add_column(col, justify="right")
    os.makedirs(args.png_dir, exist_ok=True)
    for pp in ([] if args.moe_only else args.pp):
        base = None  # the max bubble of 1F1B, measured first
        for kind, name in (("1f1b", "1F1B"), ("dualpipe", "DualPipe"), ("dualpipev", "DualPipeV")):
            ranks = pp // 2 if kind == "dualpipev" else pp
            formula = bubble_formula(kind, ranks, f, b, w, fb_ms)
            sim_bubble = max(simulate(kind, ranks, args.chunks, costs, records=False).bubble)
            records, span, bubbles, peaks, latency = _measure(kind, pp, args.chunks, times, args.steps)
            lat_bubble = max(simulate(kind, ranks, args.chunks, costs, p2p=latency * 1e3, records=False).bubble)
            span_ms = span * 1e3
            base = base or max(bubbles)
            want_act = pp if kind == "1f1b" else pp + 1
            table.add_row(str(pp), name, str(ranks), f"{formula:.0f}", f"{sim_bubble:.0f}", f"{latency * 1e3:.2f}",
                          f"{lat_bubble:.0f}",
                          f"{max(bubbles) * 1e3:.0f} / {sum(bubbles) / len(bubbles) * 1e3:.0f}",
                          f"{max(bubbles) / base:.2f}x", str(max(peaks)), str(want_act), f"{span_ms:.0f}")
            if pp == args.png_pp:
                path = os.path.join(args.png_dir, f"pipeline_{kind}_pp{pp}.png")
                plot_timeline(records, path, title=f"{name}, PP={pp} ({ranks} ranks), {args.chunks} micro-batches, "
                                                   f"F={args.f_ms:g} B={args.b_ms:g} W={args.w_ms:g} ms (measured)")
                console.print(f"wrote {path}")
    if not args.moe_only:
        console.print(table)
    if args.moe_png:
        hidden, tokens, chunks = 128, 128, 8
        res = spawn(_moe_rank, 4, hidden, tokens, chunks, args.steps, timeout=600)
        records = res[0][0] + res[1][0]
        t = Table(title=f"MoE-aware F&B, DualPipe PP=2 x EP=2 gloo ranks, 2 MoE blocks per stage, hidden {hidden}, "
                        f"8 experts, {tokens} tokens x {chunks} micro-batches ({tag})")
        for col in ("rank", "plain F then B: step ms", "MoE F&B hook: step ms", "hook vs plain",
                    "forward transfers hidden", "backward transfers hidden"):
            t.add_column(col, justify="right")
        for k, (recs, hooked, plain) in enumerate(res[:2]):
            t.add_row(str(k), f"{plain * 1e3:.0f}", f"{hooked * 1e3:.0f}", f"{hooked / plain:.2f}x",
                      f"{_hidden_fraction(recs, False):.0%}", f"{_hidden_fraction(recs, True):.0%}")
        console.print(t)
        plot_timeline(records, args.moe_png, title="DualPipe PP=2 x EP=2, MoE stages: F&B pairs as F and B pieces; "
                      "grey: dispatch/combine in flight, forward's and backward's")
        console.print(f"wrote {args.moe_png}")


if __name__ == "__main__":
    main()
