"""``moekit plan``: predict a cluster's training step (a rich table, ``--json``, ``--plot DIR``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..config import PRESETS, MoEConfig
from .cluster import CLUSTER_PRESETS, ParallelPlan, load_cluster, load_file, load_plan


def _model(spec: str) -> MoEConfig:
    if spec in PRESETS:
        return MoEConfig.preset(spec)
    return MoEConfig.from_hf(load_file(spec))


def _comm_sms(v: str) -> int | str:
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--comm-sms must be an int or 'auto', got {v!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moekit plan", description=__doc__)
    ap.add_argument("--model", default="deepseek-v3", help=f"preset {sorted(PRESETS)} or a HF-style config JSON/YAML")
    ap.add_argument("--cluster", default="h800x2048", help=f"preset {sorted(CLUSTER_PRESETS)} or a YAML/JSON file")
    ap.add_argument("--plan", help="a YAML/JSON file of ParallelPlan fields (flags below override it)")
    ap.add_argument("--pp", type=int)
    ap.add_argument("--ep", type=int)
    ap.add_argument("--dp", type=int)
    ap.add_argument("--schedule", choices=["1f1b", "dualpipe", "dualpipev"])
    ap.add_argument("--comm-sms", type=_comm_sms, help="SMs for EP communication, or 'auto'")
    ap.add_argument("--fp8-dispatch", dest="fp8_dispatch", action="store_true", default=None)
    ap.add_argument("--bf16-dispatch", dest="fp8_dispatch", action="store_false")
    ap.add_argument("--gemm-dtype", choices=["fp8", "bf16"])
    ap.add_argument("--routing", help="uniform | node-limited:M | histogram:PATH")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--micro-batch", type=int, help="sequences per micro-batch")
    ap.add_argument("--global-batch", type=int, help="sequences per step")
    ap.add_argument("--num-microbatches", type=int, help="micro-batches per pipeline (instead of --global-batch)")
    ap.add_argument("--mtp-depth", type=int, help="multi-token-prediction blocks (DeepSeek-V3: 1)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ClusterSpec field, e.g. --set comm_gbps_per_sm=8")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--plot", metavar="DIR", help="write PNGs to DIR")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``moekit plan``; returns the exit status (2 for bad inputs)."""
    from .planner import plan
    from .report import plot, render, to_dict

    args = build_parser().parse_args(argv)
    try:
        model = _model(args.model)
        cluster = load_cluster(args.cluster)
        overrides = {}
        for kv in args.set:
            if "=" not in kv:
                raise ValueError(f"--set expects FIELD=VALUE, got {kv!r}")
            k, v = kv.split("=", 1)
            overrides[k] = json.loads(v) if v not in ("", "None") else None
        if overrides:
            cluster = cluster.from_dict({**cluster.to_dict(), **overrides})
        base = load_plan(args.plan) if args.plan else ParallelPlan()
        fields = {"pp": args.pp, "ep": args.ep, "dp": args.dp, "schedule": args.schedule, "comm_sms": args.comm_sms,
                  "fp8_dispatch": args.fp8_dispatch, "gemm_dtype": args.gemm_dtype, "routing": args.routing,
                  "seq_len": args.seq_len, "micro_batch": args.micro_batch, "global_batch": args.global_batch,
                  "num_microbatches": args.num_microbatches, "mtp_depth": args.mtp_depth}
        par = dataclasses.replace(base, **{k: v for k, v in fields.items() if v is not None})
        result = plan(model, cluster, par)
    except (ValueError, TypeError) as e:
        print(f"moekit plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_dict(result), indent=2, default=str))
    else:
        render(result)
    if args.plot:
        for p in plot(result, args.plot):
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
