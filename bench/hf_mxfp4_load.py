"""Bytes read per rank by ``from_pretrained`` of a gpt-oss MXFP4 checkpoint, on 1, 2 and 4 gloo ranks (CPU).

The checkpoint is random, written in the hub's layout by the tests' own packer
(``tests/integrations/hf_models.py``: routed experts as ``*_blocks`` + ``*_scales``, everything else bf16).
Prints, for rank 0: bytes read, the same experts' bytes in bf16 (what a dequantized checkpoint would have
made it read), resident expert bytes (dequantized, ``--dtype``), experts read / left for the others.

    PYTHONPATH=src:. .venv/bin/python bench/hf_mxfp4_load.py [--hidden 512] [--inter 512] [--experts 32]
                                                           [--layers 2] [--ranks 1 2 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moekit.testing import spawn  # noqa: E402

MiB = 2 ** 20


def run(rank, world, mx_dir, dtype):
    from moekit.integrations.transformers import from_pretrained

    s = from_pretrained(mx_dir, dtype=getattr(torch, dtype)).moekit_load_stats
    return s.bytes_read, s.expert_bytes, s.replicated_bytes, s.experts_read, s.experts_skipped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    from tests.integrations.hf_models import write_mxfp4_gpt_oss

    with tempfile.TemporaryDirectory() as root:
        mx_dir, _ = write_mxfp4_gpt_oss(root, hidden_size=args.hidden, intermediate_size=args.inter,
                                        num_local_experts=args.experts, num_hidden_layers=args.layers)
        stored = os.path.getsize(os.path.join(mx_dir, "model.safetensors"))
        h, i, e = args.hidden, args.inter, args.experts
        expert_bf16 = args.layers * e * (h * 2 * i + 2 * i + i * h + h) * 2  # all experts' weights + biases
        t = Table(title=f"gpt-oss MXFP4, H={h} I={i} E={e} layers={args.layers}, {stored / MiB:.1f} MiB of "
                        f"safetensors; rank 0")
        for c in ("ranks", "bytes read", "of which experts", "same experts in bf16", "resident experts",
                  "experts read / left"):
            t.add_column(c)
        for world in args.ranks:
            read, ex, rep, n_read, n_skip = spawn(run, world, mx_dir, args.dtype, timeout=600)[0]
            rest = _stored_bytes(mx_dir, experts=False)  # replicated tensors as stored, read by every rank
            t.add_row(str(world), f"{read / MiB:.2f} MiB", f"{(read - rest) / MiB:.2f} MiB",
                      f"{expert_bf16 / world / MiB:.2f} MiB", f"{ex / MiB:.2f} MiB", f"{n_read} / {n_skip}")
        Console().print(t)


def _stored_bytes(mx_dir: str, experts: bool) -> int:
    """Bytes of the routed-expert tensors (or of all the others) in the shard, as stored."""
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(mx_dir, "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if (".mlp.experts." in k) == experts:
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    return total


if __name__ == "__main__":
    main()
