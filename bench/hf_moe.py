"""A transformers MoE model, forward+backward: transformers' own experts (``config._experts_implementation``,
"grouped_mm" by default, its fastest here) against the same model made expert-parallel by moekit.

Rows (same weights, same tokens, the two alternating step by step in one run):
- 1 rank: HF's model vs ``expert_parallel(model)`` at world size 1 (moekit's grouped experts, no transfers);
- EP over ``--ranks`` gloo ranks: each rank runs 1/R of the batch; HF's model keeps all experts on every
  rank (data parallel), moekit's keeps E/R and exchanges tokens with ``moekit.Buffer``.
The model is a Qwen3-MoE (softmax top-k router, no shared expert) built from its config with random weights.

    .venv/bin/python bench/hf_moe.py [--hidden 1024] [--experts 64] [--topk 8] [--layers 4] [--tokens 2048]
                                     [--inter 256] [--dtype float32] [--steps 3] [--ranks 4] [--skip-ep]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from rich.console import Console

from moekit import benchtools
from moekit.testing import spawn


def build(args, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, moe_intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_experts=args.experts, num_experts_per_tok=args.topk,
                         num_attention_heads=args.hidden // 128, num_key_value_heads=max(1, args.hidden // 512),
                         head_dim=128, vocab_size=args.vocab, norm_topk_prob=True, max_position_embeddings=4096)
    cfg._experts_implementation = args.experts_impl
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).to(getattr(torch, args.dtype)).train()


def step_time(model, ids, group_sync: bool) -> float:
    if group_sync:
        dist.barrier()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if group_sync:
        dist.barrier()  # the slowest rank's step
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def run(rank, world, args):
    import copy

    from moekit.integrations.transformers import expert_parallel

    torch.set_num_threads(args.threads)
    hf = build(args)
    ep = expert_parallel(copy.deepcopy(hf))
    seq = args.tokens // args.batch
    per_rank = args.batch // world
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, seq), generator=g)[rank * per_rank:(rank + 1) * per_rank]
    times = {"hf": [], "moekit": []}
    for it in range(args.steps + 1):  # the first round warms up
        order = ("hf", "moekit") if it % 2 == 0 else ("moekit", "hf")
        for name in order:
            dt = step_time(hf if name == "hf" else ep, ids, world > 1)
            if it:
                times[name].append(dt)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=256, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4, help="sequences (tokens/batch each); divisible by --ranks")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers' config._experts_implementation")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--skip-ep", action="store_true")
    args = p.parse_args()
    rows = [("1 rank", 1)] + ([] if args.skip_ep else [(f"EP over {args.ranks} gloo ranks", args.ranks)])
    table = benchtools.table(f"transformers Qwen3-MoE fwd+bwd, H={args.hidden}, I={args.inter}, E={args.experts}, "
                             f"top-{args.topk}, {args.layers} layers, {args.tokens} tokens, {args.dtype}",
                             ["setup", f"HF {args.experts_impl} s/step", "moekit s/step", "moekit/HF (median)",
                              "per-step ratios min-max"])
    for label, world in rows:
        res = spawn(run, world, args, timeout=3600, threads=args.threads)
        # The slowest rank's time per step (the barriers make them alike).
        hf = [max(r["hf"][i] for r in res) for i in range(args.steps)]
        mk = [max(r["moekit"][i] for r in res) for i in range(args.steps)]
        ratios = [m / h for m, h in zip(mk, hf)]
        table.add_row(label, f"{statistics.median(hf):.3f}", f"{statistics.median(mk):.3f}",
                      benchtools.ratio(statistics.median(mk), statistics.median(hf)),
                      f"{min(ratios):.2f}x-{max(ratios):.2f}x")
    console = Console()
    console.print(table)
    console.print(benchtools.device_tag())


if __name__ == "__main__":
    main()
