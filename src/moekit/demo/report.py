"""The demo's report: the summary of all ranks' results, its plots and ``summary.json``, and the tables."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch


def _mean(values: list) -> float:
    return sum(values) / len(values)


def _window(values: list, first: bool, n: int = 5) -> float:
    return _mean(values[:n] if first else values[-n:])


def summarize(results: list[dict], opts: dict) -> dict:
    r0 = results[0]
    h = r0["history"]
    imb = [sum(v) / len(v) for v in h["imbalance"]]
    per_rank = [r["per_rank"] for r in results]
    checks = [p["check"] for p in per_rank]
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=opts["device"], world=len(results), ranks_per_node=opts["ranks_per_node"], steps=opts["steps"],
        loss_first=h["loss"][0], loss_last=h["loss"][-1],
        loss_first5=_window(h["loss"], True), loss_last5=_window(h["loss"], False),
        uniform_loss=r0["uniform_loss"], data_entropy=r0["entropy"],
        imbalance_first=imb[0], imbalance_last=imb[-1],
        imbalance_first5=_window(imb, True), imbalance_last5=_window(imb, False),
        bytes_per_step=sum(h["bytes"]) / len(h["bytes"]),
        tokens_per_s=_mean(h["tokens_per_s"][1:] or h["tokens_per_s"]),  # step 1 pays one-time costs
        wall_s=max(r["wall_s"] for r in results),
        dispatch_check=dict(max_rel_err=max(c["max_rel_err"] for c in checks), ok=all(
            c["max_rel_err"] < 1e-5 for c in checks), per_rank=checks),
        per_rank=[{k: v for k, v in p.items() if k != "check"} for p in per_rank],
        history=h, config=r0["config"],
    )


def write_report(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    h = summary["history"]
    steps = list(range(1, len(h["loss"]) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, h["loss"], label="training loss (mean over ranks)")
    ax.axhline(summary["uniform_loss"], ls=":", c="gray", label="uniform guess ln(V)")
    ax.axhline(summary["data_entropy"], ls="--", c="green", label="data entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    load = torch.tensor(h["load"], dtype=torch.float64)  # [steps, layers, E]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for layer in range(load.shape[1]):
        axes[0].plot(steps, [v[layer] for v in h["imbalance"]], label=f"MoE layer {layer + 1}")
    axes[0].axhline(1.0, ls=":", c="gray")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("expert load max/mean")
    axes[0].legend()
    share = load[:, 0] / load[:, 0].sum(-1, keepdim=True).clamp(min=1)
    im = axes[1].imshow(share.T.numpy(), aspect="auto", cmap="viridis", origin="lower",
                        extent=(0.5, len(steps) + 0.5, -0.5, load.shape[2] - 0.5))
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("expert (MoE layer 1)")
    fig.colorbar(im, ax=axes[1], label="share of tokens")
    fig.tight_layout()
    load_png = out / "expert_load.png"
    fig.savefig(load_png, dpi=120)
    plt.close(fig)

    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=1))
    return [loss_png, load_png, json_path]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.2f} GiB"


def print_report(summary: dict, files: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"moekit demo: EP={summary['world']} ({summary['world'] // summary['ranks_per_node']} nodes x "
                    f"{summary['ranks_per_node']}), {summary['steps']} steps, {summary['device']}")
    t.add_column("")
    t.add_column("first", justify="right")
    t.add_column("last", justify="right")
    t.add_row("loss (nats)", f"{summary['loss_first']:.3f}", f"{summary['loss_last']:.3f}")
    t.add_row("loss, mean of 5 steps", f"{summary['loss_first5']:.3f}", f"{summary['loss_last5']:.3f}")
    t.add_row("expert load max/mean", f"{summary['imbalance_first']:.2f}", f"{summary['imbalance_last']:.2f}")
    t.add_row("load max/mean, mean of 5 steps", f"{summary['imbalance_first5']:.2f}",
              f"{summary['imbalance_last5']:.2f}")
    t.add_row("bytes moved per step (all ranks)", "", _fmt_bytes(summary["bytes_per_step"]))
    t.add_row("tokens/s (all ranks)", "", f"{summary['tokens_per_s']:,.0f}")
    t.add_row("wall time", "", f"{summary['wall_s']:.1f} s")
    con.print(t)
    r = Table(title="per rank: rows dispatched (forward) and bytes sent (dispatch + combine, fwd + bwd)")
    for col in ("rank", "node", "tokens", "rows sent", "to others", "self MiB", "intra MiB", "inter MiB"):
        r.add_column(col, justify="right")
    for p in summary["per_rank"]:
        r.add_row(str(p["rank"]), str(p["node"]), f"{p['tokens']:,}", f"{p['rows_sent']:,}",
                  f"{p['rows_to_other_ranks']:,}", *(f"{p[k] / 2**20:,.1f}" for k in (
                      "self_bytes", "intra_node_bytes", "inter_node_bytes")))
    con.print(r)
    c = summary["dispatch_check"]
    verdict = "[green]OK[/green]" if c["ok"] else "[red]MISMATCH[/red]"
    con.print(f"dispatch/combine check (H=7168, 256 experts, top-8, 64 tokens per rank) against a single-process "
              f"reference: max relative error {c['max_rel_err']:.1e} {verdict}")
    fell = summary["loss_last5"] < 0.7 * summary["loss_first5"]
    shrank = summary["imbalance_last5"] < summary["imbalance_first5"]
    yes, no = "[green]yes[/green]", "[red]no[/red]"
    con.print(f"loss fell: {yes if fell else no} ({summary['loss_first5']:.2f} -> {summary['loss_last5']:.2f}; "
              f"data entropy {summary['data_entropy']:.2f}); imbalance shrank: {yes if shrank else no}")
    con.print("report: " + ", ".join(str(f) for f in files))
