"""Presenting a ``PlanResult``: a JSON-able dict, a ``rich`` table, PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .planner import PlanResult, ep_sweep, sm_sweep
from .search import candidate, describe, wall


def to_dict(r: PlanResult) -> dict[str, Any]:
    """Every number of the plan, in SI units (seconds, bytes), JSON-serialisable."""
    layer = None
    if r.layer is not None:
        layer = r.layer._asdict()
        layer["bytes"] = r.layer.bytes._asdict()
        layer["dispatch"] = r.layer.dispatch._asdict()
        layer["combine"] = r.layer.combine._asdict()
    return {
        "model": {"hidden_size": r.model.hidden_size, "layers": r.model.num_hidden_layers,
                  "routed_experts": r.model.n_routed_experts, "top_k": r.model.num_experts_per_tok},
        "cluster": r.cluster.to_dict(),
        "plan": {**{k: v for k, v in r.plan.__dict__.items()}, "dp": r.dp, "gpus": r.num_gpus},
        "routing": r.routing.describe(),
        "spread": r.spread._asdict() if r.spread is not None else None,
        "stages": r.stages,
        "layer": layer,
        "step": {**r.step._asdict(), "memory": r.step.memory._asdict()},
    }


def _row(c: Any, best: Any) -> dict[str, Any]:
    r = c.result
    return {**describe(c.plan), "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu, "step_time": r.step.step_time,
            "compute": c.compute, "exposed_comm": c.exposed_comm, "bubble": c.bubble, "dp_sync_optimizer": c.dp,
            "comm_sms_used": r.layer.comm_sms if r.layer else 0,
            "compute_to_comm": r.layer.compute_to_comm if r.layer else None,
            "comm_hidden": r.step.comm_hidden, "memory_gb": r.step.memory.total / 1e9,
            "model_tflops_per_gpu": r.step.model_tflops_per_gpu, "loses_by": wall(c, best)}


def search_to_dict(res: Any, best: PlanResult, reference: PlanResult | None = None) -> dict[str, Any]:
    """The search's ranked list (best first), its memory walls and counts, the best plan in full, and
    DeepSeek-V3's own plan when it applies; SI units."""
    first = res.ranked[0]
    out = {
        "search": {"candidates": res.candidates, "checked": res.checked, "simulated": res.simulated,
                   "seconds": res.seconds, "global_batch": res.global_batch},
        "ranked": [_row(c, first) for c in res.ranked],
        "memory_walls": [{**describe(w.plan), "bound_tokens_per_s_per_gpu": w.bound_tokens_per_s_per_gpu,
                          "memory_gb": w.memory_gb, "capacity_gb": w.capacity_gb} for w in res.memory_walls],
        "best": to_dict(best),
    }
    if reference is not None:
        out["deepseek_v3_plan"] = {**_row(candidate(reference), first), "fits": reference.step.fits_memory}
    return out


def render_search(res: Any, best: PlanResult, reference: PlanResult | None = None, notes: list[str] | None = None,
                  console: Any = None) -> None:
    """Print the ranked plans (and why each loses to the first), the memory walls, DeepSeek-V3's plan."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        console = Console(width=max(console.width, 150))
    cl = best.cluster
    t = Table(title=f"moekit plan: fastest layouts of {cl.num_gpus:,} GPUs ({cl.name}), global batch "
                    f"{res.global_batch:,} x {best.plan.seq_len} tokens; {res.candidates:,} layouts, "
                    f"{res.checked:,} checked, {res.simulated} simulated, {res.seconds:.1f} s")
    for col in ("#", "layout", "k", "routing / dispatch / recompute", "tok/s/GPU", "comp:comm", "hidden",
                "bubble s", "exposed s", "GB", "loses by"):
        t.add_column(col, justify="left" if col in ("layout", "routing / dispatch / recompute", "loses by")
                     else "right")
    first = res.ranked[0]
    rows = [(str(i + 1), c) for i, c in enumerate(res.ranked)]
    if reference is not None:
        rows.append(("DeepSeek", candidate(reference)))
    for tag, c in rows:
        d = _row(c, first)
        p = c.plan
        t.add_row(tag, f"PP{p.pp} EP{p.ep} DP{c.result.dp} {p.schedule} {p.micro_batch}x{p.num_microbatches}",
                  f"{d['comm_sms_used']}" + ("a" if p.comm_sms == "auto" else ""),
                  f"{p.routing or '-'} / {'FP8' if p.fp8_dispatch else 'BF16'} / {p.recompute}",
                  f"{d['tokens_per_s_per_gpu']:,.0f}",
                  f"{d['compute_to_comm']:.2f}" if d["compute_to_comm"] not in (None, float("inf")) else "-",
                  f"{d['comm_hidden']:.0%}", f"{d['bubble']:.2f}", f"{d['exposed_comm']:.2f}",
                  f"{d['memory_gb']:.1f}", d["loses_by"])
    t.caption = ("k: comm SMs (a = auto, the smallest that hides); comp:comm per MoE layer, forward; hidden: EP "
                 "comm under compute, whole step; loses by: the part of the busiest rank's step that grew most "
                 "against #1")
    console.print(t)
    if res.memory_walls:
        w = Table(title="faster on paper, but they do not fit (memory wall)")
        for col in ("PP x EP x DP", "schedule", "mb", "recompute", "bound tok/s/GPU", "memory GB"):
            w.add_column(col)
        for r in res.memory_walls:
            p = r.plan
            w.add_row(f"{p.pp} x {p.ep} x {p.dp}", p.schedule, str(p.micro_batch), p.recompute,
                      f"<= {r.bound_tokens_per_s_per_gpu:,.0f}", f"{r.memory_gb:.1f} > {r.capacity_gb:g}")
        console.print(w)
    for n in notes or []:
        console.print(f"note: {n}")


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f} ms"


def render(r: PlanResult, console: Any = None) -> None:
    """Print the plan as ``rich`` tables."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        console = Console(width=max(console.width, 110))
    p = r.plan
    t = Table(title=f"moekit plan: {r.cluster.name}, {r.num_gpus} GPUs = PP{p.pp} x DP{r.dp} (EP{p.ep}), "
                    f"{p.schedule}, routing {r.routing.describe()}", show_header=True)
    t.add_column("per MoE layer, per micro-batch, per GPU", style="bold")
    t.add_column("value", justify="right")
    if r.layer is not None:
        lr = r.layer
        t.add_row("tokens per micro-batch", str(lr.tokens))
        if r.spread is not None:
            t.add_row("destination nodes / ranks per token",
                      f"{r.spread.nodes:.2f} / {r.spread.ranks:.2f} (imbalance {r.spread.imbalance:.2f})")
        t.add_row("dispatch bytes NVLink / inter-node", f"{_si(lr.bytes.dispatch_intra, 'B')} / "
                  f"{_si(lr.bytes.dispatch_inter, 'B')}" + (" (FP8)" if p.fp8_dispatch else " (BF16)"))
        t.add_row("combine bytes NVLink / inter-node",
                  f"{_si(lr.bytes.combine_intra, 'B')} / {_si(lr.bytes.combine_inter, 'B')} (BF16)")
        t.add_row("dispatch time: link / SM-limited", f"{_ms(lr.dispatch.link)} / {_ms(lr.dispatch.sm_limited)}")
        t.add_row("combine time: link / SM-limited", f"{_ms(lr.combine.link)} / {_ms(lr.combine.sm_limited)}")
        t.add_row("attention + gate GEMMs + core, forward", _ms(lr.attention_f))
        t.add_row("shared / routed expert GEMMs, forward", f"{_ms(lr.shared_f)} / {_ms(lr.routed_f)}")
        t.add_row("memory-bound ops, forward", _ms(lr.elementwise_f))
        t.add_row("(a dense layer, forward)", _ms(lr.dense_layer_f))
        t.add_row("compute forward / backward", f"{_ms(lr.compute_f)} / {_ms(lr.compute_b)}")
        t.add_row("EP comm forward / backward", f"{_ms(lr.comm_f)} / {_ms(lr.comm_b)}")
        t.add_row("compute : comm (forward)", f"{lr.compute_to_comm:.2f} : 1")
        t.add_row("comm SMs (k) / compute SMs", f"{lr.comm_sms} / {r.cluster.sms - lr.comm_sms}"
                  + (" (auto)" if p.comm_sms == "auto" else ""))
        t.add_row("comm hidden with k SMs (F&B pair)", f"{'yes' if lr.hides else 'no'} "
                  f"({lr.pair_comm_hidden:.1%} hidden, compute busy {lr.pair_compute_busy:.1%})")
        t.add_row("smallest k that hides it", str(lr.smallest_hiding_sms) if lr.smallest_hiding_sms else "none")
    s = r.step
    t.add_section()
    t.add_row("per step", "", style="bold")
    t.add_row("micro-batches per pipeline / tokens per step", f"{s.num_microbatches} / {_si(s.tokens_per_step, '')}")
    t.add_row("layers per stage (head last)", " ".join(map(str, r.stages)))
    t.add_row("pipeline (simulated)", f"{s.pipeline:.3f} s")
    t.add_row("bubble: largest rank idle / busiest rank idle / formula",
              f"{s.bubble:.3f} s / {s.bubble_busiest:.3f} s / {s.bubble_formula:.3f} s")
    t.add_row("DP sync + optimizer", f"{s.dp_sync:.3f} s + {s.optimizer:.3f} s")
    t.add_row("step time", f"{s.step_time:.3f} s")
    t.add_row("EP comm hidden (whole step)", f"{s.comm_hidden:.1%}")
    t.add_row("compute stream busy (whole step)", f"{s.compute_busy:.1%}")
    t.add_row("MFU (of the GEMM dtype's peak) / vs BF16 peak", f"{s.mfu:.1%} / {s.mfu_bf16:.1%}")
    t.add_row("tokens/s per GPU", f"{s.tokens_per_s_per_gpu:,.0f}")
    t.add_row("GPU-hours per trillion tokens", f"{s.gpu_hours_per_trillion_tokens:,.0f}")
    m = s.memory
    t.add_row("params / weight+grad+optimizer memory per GPU",
              f"{s.params_per_gpu / 1e9:.2f} B / {s.state_memory_gb:.1f} GB")
    t.add_row(f"activations ({m.inflight_microbatches:.1f} micro-batches in flight; FP8/cached part) + EP buffers",
              f"{m.activations / 1e9:.1f} GB ({m.activations_cache / 1e9:.1f} GB) + {m.ep_buffers / 1e9:.1f} GB")
    t.add_row(f"memory on the fullest GPU ({r.plan.recompute} recomputation)",
              f"{m.total / 1e9:.1f} of {r.cluster.hbm_gb:g} GB" + ("" if m.fits else ": does not fit"))
    console.print(t)


def plot(r: PlanResult, out_dir: str | Path, *, eps: list[int] | None = None) -> list[Path]:
    """Write ``comm_vs_sms.png`` (per-layer F&B compute and comm time against comm SMs),
    ``step_vs_ep.png`` (step time against EP size) and ``timeline.png`` (the simulated schedule).
    Returns the paths written. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if r.layer is not None and r.spread is not None and r.plan.ep > 1:
        pts = sm_sweep(r.model, r.cluster, r.plan, r.spread, list(range(1, min(r.cluster.sms, 64))))
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([q.k for q in pts], [q.compute * 1e3 for q in pts], label="compute (F&B, one MoE layer)")
        ax.plot([q.k for q in pts], [q.comm * 1e3 for q in pts], label="EP comm (F&B, one MoE layer)")
        if r.layer.smallest_hiding_sms:
            ax.axvline(r.layer.smallest_hiding_sms, ls="--", c="gray", label="smallest k that hides")
        ax.set_xlabel("SMs given to communication")
        ax.set_ylabel("ms")
        ax.set_title(f"{r.cluster.name}: EP{r.plan.ep}, {r.routing.describe()}")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "comm_vs_sms.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    sweep = ep_sweep(r.model, r.cluster, r.plan, eps)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e for e, _, _ in sweep], [t for _, t, _ in sweep], marker="o", label="step time")
    bad = [(e, t) for e, t, fits in sweep if not fits]
    if bad:
        ax.scatter([e for e, _ in bad], [t for _, t in bad], marker="x", s=80, c="red", zorder=3,
                   label="weights+grads+optimizer exceed HBM")
    ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("EP size")
    ax.set_ylabel("step time (s)")
    ax.set_title(f"{r.cluster.name}: PP{r.plan.pp} {r.plan.schedule}, DP{r.dp}")
    fig.tight_layout()
    paths.append(out / "step_vs_ep.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    paths.append(out / "timeline.png")
    recs = r.sim.records
    title = f"simulated step: {r.cluster.name}, PP{r.plan.pp} {r.plan.schedule}, EP{r.plan.ep}"
    if len(recs) > 5000:  # thousands of comm bars are invisible at this scale and slow to draw
        recs = [x for x in recs if x.phase != "COMM"]
        title += " (comm not drawn)"
    plot_records(recs, paths[-1], title=title)
    return paths


def plot_records(records: list, path: str | Path, title: str | None = None) -> None:
    """Draw PhaseRecords with ``moekit.pipeline.plot_timeline`` when it exists, else a plain fallback."""
    try:  # imported here: moekit.pipeline loads the runtime, which `import moekit.plan` must not
        from ..pipeline import plot_timeline
    except ImportError:
        plot_timeline = None
    if plot_timeline is not None:
        span = max((x.end for x in records), default=0.0) - min((x.start for x in records), default=0.0)
        plot_timeline(records, path, title=title, time_unit="s" if span > 10 else "ms")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green", "FB": "tab:purple", "COMM": "tab:red"}
    ranks = max((rec.rank for rec in records), default=0) + 1
    fig, ax = plt.subplots(figsize=(12, 0.4 * ranks + 1))
    for rec in records:
        y = rec.rank + (0.3 if rec.phase == "COMM" else 0.0)
        h = 0.25 if rec.phase == "COMM" else 0.6
        ax.barh(y, rec.end - rec.start, left=rec.start, height=h, color=colors.get(rec.phase, "gray"))
    ax.set_yticks(range(ranks))
    if title:
        ax.set_title(title)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_ylabel("pipeline rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
