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

The package: :mod:`.data` (the Markov "languages"), :mod:`.train` (one rank's training loop), :mod:`.check`
(the dispatch/combine self-check), :mod:`.report` (summary, plots, tables); this module parses the command
line, starts the ranks and decides the exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .. import dist as mdist
from .check import dispatch_check
from .data import MarkovLanguages
from .report import print_report, summarize, write_report
from .train import DEMO_CONFIG, rank_main

__all__ = ["DEMO_CONFIG", "MarkovLanguages", "dispatch_check", "main", "parse_args", "print_report", "rank_main",
           "summarize", "write_report"]


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
        res = rank_main(rank, world, opts)
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
    from ..testing import spawn  # lazy: the test helper is no part of the torchrun path

    results = spawn(rank_main, args.world, opts, ranks_per_node=args.ranks_per_node, timeout=900)
    return _finish(results, opts)


def _finish(results: list[dict], opts: dict) -> int:
    summary = summarize(results, opts)
    files = write_report(summary, Path(opts["out"]))
    print_report(summary, files)
    # The demo's bar: the loss falls clearly *and* the bias balancing shrinks the imbalance.
    ok = (summary["dispatch_check"]["ok"] and summary["loss_last5"] < 0.7 * summary["loss_first5"]
          and summary["imbalance_last5"] < summary["imbalance_first5"])
    return 0 if ok else 1
