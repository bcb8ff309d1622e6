"""``moekit demo``: train a small DeepSeek-V3-style MoE model with expert parallelism on 4 ranks.

Without ``torchrun`` it starts 4 CPU gloo ranks on this machine (``moekit.testing.spawn``), pretending
they are 2 nodes of 2 so that intra- and inter-node traffic both show; under
``torchrun --nproc-per-node 4 -m moekit.demo`` it uses the ranks it is given (NCCL on GPUs).

The task has real structure: each sequence is written in one of a few "languages" (sparse random
Markov chains over the vocabulary), announced by its first token. The model has to learn the
transitions and which language it is reading, so the loss falls from ln(V) towards the chains' entropy.
Each step prints loss and tokens/s; the end shows loss and expert-load imbalance first/last, bytes moved,
a per-rank traffic table, a dispatch/combine check against a single-process reference, and writes a
report folder (PNG plots and ``summary.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import dist as mdist
from .config import MoEConfig

# The "tiny" preset (H=64, 16 routed + 1 shared experts, top-4 of 2/4 groups), 3 layers (1 dense + 2 MoE),
# 128 tokens, and a faster bias update than DeepSeek-V3's 0.001 for a 120-step run.
DEMO_CONFIG = dict(MoEConfig.preset("tiny", num_hidden_layers=3, vocab_size=128, bias_update_speed=0.01).to_dict())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moekit demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="optimizer steps (default 120)")
    p.add_argument("--world", type=int, default=4, help="ranks to spawn without torchrun (default 4)")
    p.add_argument("--ranks-per-node", type=int, default=2, help="node layout of the spawned ranks (default 2)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step (default 8)")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per sequence (default 48)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--gamma", type=float, default=None, help="bias update speed (default 0.01 here)")
    p.add_argument("--max-nodes-per-token", type=int, default=None,
                   help="node-limited routing: a token's experts on at most this many nodes (default off)")
    p.add_argument("--languages", type=int, default=4, help="Markov chains in the data (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--transport", default="auto", choices=["auto", "collective", "symmetric"],
                   help="how the Buffer moves rows (docs/ep.md, 'Choosing a transport'; default auto)")
    args = p.parse_args(argv)
    for name in ("steps", "world", "ranks_per_node", "batch", "seq_len", "languages"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# --- data -----------------------------------------------------------------------------------------
class MarkovLanguages:
    """``languages`` sparse Markov chains over tokens ``[languages, V)``; token ``l < languages`` tags language l.

    Each token of each language has 3 possible successors with probabilities 0.6 / 0.25 / 0.15 (entropy
    ~0.94 nats per token once the language is known). Deterministic from ``seed`` (the same on every rank).
    """

    PROBS = (0.6, 0.25, 0.15)

    def __init__(self, vocab: int, languages: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.languages = vocab, languages
        content = vocab - languages
        succ = torch.stack([torch.stack([torch.randperm(content, generator=g)[:len(self.PROBS)]
                                         for _ in range(vocab)]) for _ in range(languages)]) + languages
        self.succ = succ  # [L, V, 3] successor tokens
        self.entropy = -sum(p * math.log(p) for p in self.PROBS)

    def batch(self, b: int, s: int, g: torch.Generator) -> torch.Tensor:
        """``[b, s + 1]`` int64: tag, then a random start token, then the chain."""
        lang = torch.randint(0, self.languages, (b,), generator=g)
        out = torch.empty(b, s + 1, dtype=torch.int64)
        out[:, 0] = lang
        out[:, 1] = torch.randint(self.languages, self.vocab, (b,), generator=g)
        probs = torch.tensor(self.PROBS)
        for t in range(2, s + 1):
            pick = torch.multinomial(probs.expand(b, -1), 1, generator=g).squeeze(1)
            out[:, t] = self.succ[lang, out[:, t - 1], pick]
        return out


# --- the dispatch/combine check ------------------------------------------------------------------
def dispatch_check(buffer, rank: int, world: int, device: torch.device) -> dict:
    """One dispatch + combine of a DeepSeek-V3-shaped batch (H=7168, 256 experts, top-8 of 4/8 groups) with
    expert e computing ``(e + 1) * x``; compared with the single-process result ``sum_k w_k (e_k + 1) x``."""
    from .routing.gate import Gate

    cfg = MoEConfig.preset("deepseek-v3")
    g = torch.Generator().manual_seed(1000 + rank)
    t = 64
    x = torch.randn(t, cfg.hidden_size, generator=g).to(device)
    gate = Gate(cfg).to(device)
    with torch.no_grad():
        idx, w, _ = gate(x)
    e_loc = cfg.n_routed_experts // world
    d = buffer.dispatch(x, idx, w, cfg.n_routed_experts)
    sent = buffer.stats.last.total_bytes
    valid = d.recv_topk_idx >= 0
    factor = ((d.recv_topk_idx + rank * e_loc + 1).float() * d.recv_topk_weights * valid).sum(1, keepdim=True)
    y, _ = buffer.combine(d.recv_x * factor.to(d.recv_x.dtype), d.handle)
    ref = x * ((idx + 1).float() * w).sum(1, keepdim=True)
    err = float((y - ref).abs().max() / ref.abs().max())
    return dict(tokens=t, received=int(d.recv_x.shape[0]), dispatch_bytes=sent, max_rel_err=err)


# --- one rank --------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, opts: dict) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .ep.buffer import Buffer
    from .moe import moe_layers, sync_grads, update_moe_biases
    from .moe.model import TinyDeepSeek

    device = torch.device(opts["device"] if opts["device"] != "cuda" else f"cuda:{torch.cuda.current_device()}")
    cfg = MoEConfig(**DEMO_CONFIG).replace(max_nodes_per_token=opts["max_nodes_per_token"])
    if opts["gamma"] is not None:
        cfg = cfg.replace(bias_update_speed=opts["gamma"])
    rpn = opts["ranks_per_node"]
    buffer = Buffer(None, ranks_per_node=rpn, transport=opts.get("transport", "auto"))
    check = dispatch_check(buffer, rank, world, device)
    buffer.stats.reset()

    torch.manual_seed(opts["seed"])  # the same model on every rank (replicated weights agree)
    model = TinyDeepSeek(cfg, buffer=buffer, ranks_per_node=rpn)
    with torch.no_grad():
        # A direction shared by all token embeddings, as trained LMs' hidden states have: it skews the fresh
        # routers (some experts score high for every token), which the bias balancing then has to undo.
        model.embed_tokens.weight += torch.randn(cfg.hidden_size)
    model = model.to(device)
    data = MarkovLanguages(cfg.vocab_size, opts["languages"], opts["seed"])
    gen = torch.Generator().manual_seed(opts["seed"] * 1000 + rank + 1)  # each rank its own batches
    opt = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=0.0)
    layers = moe_layers(model)
    e_loc = cfg.n_routed_experts // world
    rows_sent = torch.zeros(world, dtype=torch.int64)

    def count_rows(_mod, _inp, out):  # rows this rank dispatches to each rank (one per token and rank)
        dest = torch.zeros(out.topk_idx.shape[0], world, dtype=torch.bool, device=out.topk_idx.device)
        dest.scatter_(1, out.topk_idx // e_loc, True)
        rows_sent.add_(dest.sum(0).cpu())

    for m in layers:
        m.gate.register_forward_hook(count_rows)

    history = dict(loss=[], imbalance=[], load=[], tokens_per_s=[], bytes=[])
    tokens_per_step = opts["batch"] * opts["seq_len"] * world
    show = rank == 0 and not opts["no_progress"]
    progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("max/mean load {task.fields[imb]:.2f}"),
                        TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(), disable=not show)
    t_start = time.perf_counter()
    with progress:
        task = progress.add_task("train", total=opts["steps"], loss=float("nan"), imb=float("nan"), tps=0.0)
        for _step in range(opts["steps"]):
            t0 = time.perf_counter()
            bytes0 = buffer.stats.total.total_bytes
            seq = data.batch(opts["batch"], opts["seq_len"], gen).to(device)
            logits = model(seq[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), seq[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync_grads(model, average=True)  # loss of the step = mean of the ranks' losses
            opt.step()
            upd = update_moe_biases(model)  # after the step, from the loads of the whole EP group
            stats = torch.tensor([loss.item(), buffer.stats.total.total_bytes - bytes0], dtype=torch.float64,
                                 device=device)  # on the device: NCCL reduces device tensors only
            dist.all_reduce(stats)
            dt = time.perf_counter() - t0
            history["loss"].append(stats[0].item() / world)
            history["bytes"].append(stats[1].item())
            history["imbalance"].append(upd.imbalance)
            history["load"].append(upd.load.tolist())
            history["tokens_per_s"].append(tokens_per_step / dt)
            progress.update(task, advance=1, loss=history["loss"][-1], imb=sum(upd.imbalance) / len(upd.imbalance),
                            tps=history["tokens_per_s"][-1])
    wall = time.perf_counter() - t_start
    tot = buffer.stats.total
    per_rank = dict(rank=rank, node=rank // rpn, tokens=opts["steps"] * opts["batch"] * opts["seq_len"] * len(layers),
                    rows_sent=int(rows_sent.sum()), rows_to_other_ranks=int(rows_sent.sum() - rows_sent[rank]),
                    self_bytes=tot.self_bytes, intra_node_bytes=tot.intra_node_bytes,
                    inter_node_bytes=tot.inter_node_bytes, check=check)
    return dict(per_rank=per_rank, history=history if rank == 0 else None, wall_s=wall,
                entropy=data.entropy, uniform_loss=math.log(cfg.vocab_size), config=cfg.to_dict())


def _spawned(rank: int, world: int, opts: dict) -> dict:
    return _rank_main(rank, world, opts)


# --- reporting -------------------------------------------------------------------------------------
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


# --- entry -----------------------------------------------------------------------------------------
def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when the dispatch check passed, the loss fell clearly and the expert-load
    imbalance shrank (mean of the last 5 steps against the first 5), else 1."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    opts = dict(vars(args))
    if _under_torchrun():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        opts.update(device="cuda" if use_cuda else "cpu", ranks_per_node=mdist.default_ranks_per_node())
        res = _rank_main(rank, world, opts)
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        ok = 0
        if rank == 0:
            ok = _finish(gathered, opts)
        dist.destroy_process_group()
        return ok
    if args.world % args.ranks_per_node != 0:
        print(f"moekit demo: --ranks-per-node ({args.ranks_per_node}) must divide --world ({args.world})",
              file=sys.stderr)
        return 2
    opts.update(device="cpu")
    from .testing import spawn

    results = spawn(_spawned, args.world, opts, ranks_per_node=args.ranks_per_node, timeout=900)
    return _finish(results, opts)


def _finish(results: list[dict], opts: dict) -> int:
    summary = summarize(results, opts)
    files = write_report(summary, Path(opts["out"]))
    print_report(summary, files)
    # The bar for the demo: the loss falls clearly *and* the bias balancing shrinks the imbalance.
    ok = (summary["dispatch_check"]["ok"] and summary["loss_last5"] < 0.7 * summary["loss_first5"]
          and summary["imbalance_last5"] < summary["imbalance_first5"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
