"""``python -m moekit.generate``: greedy decoding of a transformers MoE checkpoint, experts sharded over ranks.

    torchrun --nproc-per-node 4 -m moekit.generate --model DIR --prompt "Hello" --max-new-tokens 32

Every rank loads the replicated weights and its E/R experts (:func:`moekit.integrations.transformers.
from_pretrained`) and runs the same batch: the MoE layers exchange the tokens, so every rank must take every
decode step. Rank 0's next tokens are broadcast each step, so all ranks continue from the same sequence
whatever rounding the ranks see. gloo on CPU ranks, NCCL when CUDA is there. Prefill uses the normal
dispatch of :class:`moekit.Buffer`; the decode steps its low-latency dispatch/combine (capacity = the batch,
no host sync; DeepEP's decoding mode, https://github.com/deepseek-ai/DeepEP#example-use-in-inference-decoding).
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from . import dist as mdist
from ._util import check_positive_int


class GenerateResult(NamedTuple):
    """tokens: ``[B, S + N]`` int64 (prompt then the N generated tokens, on the model's device); new_tokens:
    N; seconds: wall time of the decode loop (prefill included); tokens_per_s: ``B * N / seconds``."""

    tokens: torch.Tensor
    new_tokens: int
    seconds: float
    tokens_per_s: float


def _cache_kw(model: nn.Module) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (deprecated alias until 5.40).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, group=None,
           eos_token_id: int | None = None, progress=None, low_latency: bool = True) -> GenerateResult:
    """Greedy decoding with the model's KV cache.

    model: a transformers causal LM (expert-parallel or not); input_ids: ``[B, S]`` int64, the same on every
    rank of ``group``; max_new_tokens: N >= 1. eos_token_id: stop once every row has produced it (rows that
    finished repeat it), decided from rank 0's tokens so that all ranks stop together. progress: a
    ``rich.progress.Progress`` to advance, or None. low_latency: the decode steps (after the prefill) run
    the MoE layers with ``MoE.low_latency_tokens = B`` (``Buffer.low_latency_dispatch/combine``, where the
    layer supports it); False: the normal dispatch. One host sync per step (the argmax, the broadcast).
    Returns :class:`GenerateResult`.
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"greedy: input_ids must be [B, S] int64, got {list(input_ids.shape)} {input_ids.dtype}")
    check_positive_int("greedy: max_new_tokens", max_new_tokens)
    world = mdist.world_size(group)
    src = dist.get_global_rank(group, 0) if world > 1 and group is not None else 0
    kw = _cache_kw(model)
    task = progress.add_task("decode", total=max_new_tokens) if progress is not None else None
    tokens, step_in, cache = input_ids, input_ids, None
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    from .moe import moe_layers

    layers = moe_layers(model) if low_latency else []
    start = time.perf_counter()
    n = 0
    try:
        while n < max_new_tokens:
            n += 1
            if n == 2:  # decode steps: one token per row
                for m in layers:
                    m.low_latency_tokens = input_ids.shape[0]
            tokens, step_in, cache, stop = _step(model, tokens, step_in, cache, kw, done, eos_token_id, world, src,
                                                 group)
            if task is not None:
                progress.advance(task)
            if stop:
                break
    finally:
        for m in layers:
            m.low_latency_tokens = None
    seconds = time.perf_counter() - start
    return GenerateResult(tokens, n, seconds, input_ids.shape[0] * n / max(seconds, 1e-9))


def _step(model, tokens, step_in, cache, kw, done, eos_token_id, world, src, group):
    """One greedy step; returns (tokens, next input, cache, whether every row has finished)."""
    out = model(input_ids=step_in, use_cache=True, **{kw: cache})
    cache = getattr(out, kw, None) if getattr(out, kw, None) is not None else out.past_key_values
    nxt = out.logits[:, -1].argmax(dim=-1)  # [B]
    if world > 1:
        dist.broadcast(nxt, src=src, group=group)
    if eos_token_id is not None:
        nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
        done |= nxt == eos_token_id
    tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    return tokens, nxt[:, None], cache, eos_token_id is not None and bool(done.all())


def init_distributed() -> torch.device:
    """Join the ``torchrun`` job if there is one (NCCL with CUDA, gloo otherwise) and return this rank's
    device; a process group that already exists (e.g. ``moekit.testing.spawn``'s) is used as it is."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer when ``model_dir`` has one (local files only), else None."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.exists(os.path.join(model_dir, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moekit.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch); needs a tokenizer")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="a prompt as space-separated token ids (for checkpoints without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"])
    p.add_argument("--transport", default="auto")
    return p.parse_args(argv)


def main(argv=None) -> GenerateResult:
    """CLI entry point (see the module docstring); returns the :class:`GenerateResult` of this rank."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .integrations.transformers import from_pretrained

    args = parse_args(argv)
    device = init_distributed()
    rank = mdist.rank(None)
    tok = load_tokenizer(args.model)
    if args.prompt and tok is None:
        raise ValueError(f"--prompt needs a tokenizer in {args.model!r}; pass --prompt-ids instead")
    rows = [tok(p)["input_ids"] for p in args.prompt] if tok is not None else []
    rows += [[int(t) for t in p.split()] for p in args.prompt_ids]
    if not rows:
        raise ValueError("give at least one --prompt or --prompt-ids")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"prompts of a batch must have the same length in tokens, got {[len(r) for r in rows]}")
    model = from_pretrained(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=device,
                            transport=args.transport)
    ids = torch.tensor(rows, dtype=torch.int64, device=device)
    eos = getattr(model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    console = Console(stderr=True, quiet=rank != 0)
    cols = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn())
    with Progress(*cols, console=console, disable=rank != 0) as progress:
        res = greedy(model, ids, args.max_new_tokens, eos_token_id=eos, progress=progress)
    if rank == 0:
        for row in res.tokens.tolist():
            text = tok.decode(row) if tok is not None else " ".join(map(str, row))
            print(text, flush=True)
        console.print(f"{res.new_tokens} tokens x {ids.shape[0]} rows in {res.seconds:.2f} s: "
                      f"{res.tokens_per_s:.1f} tokens/s on {mdist.world_size(None)} rank(s)")
    return res


if __name__ == "__main__":
    main()
