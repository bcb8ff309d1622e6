"""``python -m moekit.train``: a few steps of next-token training of a transformers MoE checkpoint, experts
sharded over the ranks, with DeepSeek-V3's aux-loss-free balancing, and a loss-curve PNG.

    torchrun --nproc-per-node 4 -m moekit.train --model DIR --data corpus.txt --steps 20 --out reports/train

The ranks are data parallel over the EP group: each draws its own windows of the text, the replicated
weights' gradients are averaged over the ranks and the experts' gradients already cover every rank's tokens
(:func:`moekit.moe.sync_grads`). After each optimizer step every MoE layer's selection bias moves by gamma
against its global load (:func:`moekit.moe.update_moe_biases`; DeepSeek-V3 report, section 2.1.2): the
checkpoint's ``e_score_correction_bias`` for DeepSeek-V3/GLM-4.5, a zero-initialised one for the softmax
routers. gloo on CPU ranks, NCCL when CUDA is there. Without a tokenizer in DIR the text is read as bytes
(token id = byte value modulo the vocabulary), enough for tiny test checkpoints.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import dist as mdist
from ._util import check_positive_int
from .generate import init_distributed, load_tokenizer


class TrainResult(NamedTuple):
    """losses: the mean loss over the ranks of each step; imbalance: max/mean expert load of each step
    (over layers, the worst); tokens_per_s: tokens of all ranks per second of training; plot: the PNG path
    (rank 0; None elsewhere or without ``--out``)."""

    losses: list[float]
    imbalance: list[float]
    tokens_per_s: float
    plot: str | None


def tokenize(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """``[N]`` int64 token ids of ``text``: the tokenizer's, or the UTF-8 bytes modulo ``vocab_size``."""
    if tokenizer is not None:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64) % vocab_size


def batch_at(tokens: torch.Tensor, step: int, rank: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[batch_size, seq_len]`` windows of ``tokens`` for (step, rank): different on every rank and step."""
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than seq_len + 1 ({seq_len + 1})")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def save_plot(losses: list[float], imbalance: list[float], path: str) -> str:
    """Loss and expert-load imbalance per step, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = range(1, len(losses) + 1)
    a.plot(steps, losses, marker=".")
    a.set(xlabel="step", ylabel="loss (mean over ranks)", title="next-token loss")
    b.plot(steps, imbalance, marker=".", color="tab:orange")
    b.set(xlabel="step", ylabel="max/mean expert load", title="load imbalance (worst layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moekit.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument("--transport", default="auto")
    p.add_argument("--out", default=None, help="directory for loss.png (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> TrainResult:
    """CLI entry point (see the module docstring); returns this rank's :class:`TrainResult`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .integrations.transformers import from_pretrained
    from .moe import sync_grads, update_moe_biases

    args = parse_args(argv)
    check_positive_int("--steps", args.steps)
    device = init_distributed()
    rank, world = mdist.rank(None), mdist.world_size(None)
    model = from_pretrained(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=device,
                            transport=args.transport).train()
    with open(args.data, encoding="utf-8") as f:
        tokens = tokenize(f.read(), load_tokenizer(args.model), model.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    console = Console(stderr=True, quiet=rank != 0)
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    losses, imbalance = [], []
    start = time.perf_counter()
    with Progress(*cols, console=console, disable=rank != 0) as progress:
        task = progress.add_task("train", total=args.steps, info="")
        for step in range(args.steps):
            ids = batch_at(tokens, step, rank, args.batch_size, args.seq_len, args.seed).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync_grads(model, average=True)
            opt.step()
            upd = update_moe_biases(model)
            mean_loss = loss.detach().float().reshape(1)
            if world > 1:
                dist.all_reduce(mean_loss)
                mean_loss /= world
            losses.append(float(mean_loss))
            imbalance.append(max(upd.imbalance) if upd.imbalance else 1.0)
            tps = (step + 1) * world * ids.numel() / (time.perf_counter() - start)
            progress.update(task, advance=1, info=f"loss {losses[-1]:.4f}  {tps:,.0f} tokens/s")
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * world * args.batch_size * args.seq_len / seconds
    plot = None
    if rank == 0:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            plot = save_plot(losses, imbalance, os.path.join(args.out, "loss.png"))
        console.print(f"{args.steps} steps on {world} rank(s): loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                      f"{tokens_per_s:,.0f} tokens/s" + (f", plot {plot}" if plot else ""))
    return TrainResult(losses, imbalance, tokens_per_s, plot)


if __name__ == "__main__":
    main()
