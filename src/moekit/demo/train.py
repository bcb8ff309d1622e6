"""The demo's training loop on one rank: a 3-layer DeepSeek-V3-style model, expert-parallel over the group."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import MoEConfig
from ..ep.buffer import Buffer
from ..moe import moe_layers, sync_grads, update_moe_biases
from ..moe.model import TinyDeepSeek
from .check import dispatch_check
from .data import MarkovLanguages

# The "tiny" preset (H=64, 16 routed + 1 shared experts, top-4 of 2/4 groups), 3 layers (1 dense + 2 MoE),
# 128 tokens, and a faster bias update than DeepSeek-V3's 0.001 for a 120-step run.
DEMO_CONFIG = dict(MoEConfig.preset("tiny", num_hidden_layers=3, vocab_size=128, bias_update_speed=0.01).to_dict())


def rank_main(rank: int, world: int, opts: dict) -> dict:
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
