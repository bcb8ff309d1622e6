"""``moekit plan``: find the fastest way to train a MoE model on a cluster, or predict one layout.

With ``--pp``, ``--ep`` and ``--schedule`` all given it predicts that layout (a table, ``--json``,
``--plot DIR``); otherwise it searches the layouts that fit, holding whatever was given, and ranks
them by tokens/s per GPU (``plan/search.py``). Every bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from ..config import PRESETS, MoEConfig
from ..schedule import SCHEDULES
from .cluster import CLUSTER_PRESETS, RECOMPUTE, ParallelPlan, load_cluster, load_file, load_plan, yaml_loader
from .planner import plan
from .report import plot, render, render_search, search_to_dict, to_dict
from .search import search
from .sms import measured_gbps_per_sm
from .trace import predict_pair, render_comparison, render_trace, summarize

# DeepSeek-V3's own layout (report sec. 3.2): shown beside the search's answer on its cluster.
DEEPSEEK_V3_PLAN = dict(pp=16, ep=64, schedule="dualpipe", comm_sms=20, routing="node-limited:4",
                        fp8_dispatch=True, recompute="selective", micro_batch=1)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _int(name: str):
    """An int flag that also takes integral exponent forms (``1e8``); NaN, inf, fractions are refused."""
    def parse(v: str) -> int:
        try:
            return int(v)
        except ValueError:
            pass
        try:
            f = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}")
        return int(f)
    return parse


def _comm_sms(v: str) -> int | str:
    if v == "auto":
        return v
    return _int("--comm-sms")(v)


def _model(spec: str) -> MoEConfig:
    if spec in PRESETS:
        return MoEConfig.preset(spec)
    d = load_file(spec, "model")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(MoEConfig)}
    for k, v in d.items():  # name the field before MoEConfig compares a str with an int
        t = kinds.get(k)
        if t in ("int", "int | None") and not (isinstance(v, int) and not isinstance(v, bool)
                                               or (v is None and t == "int | None")):
            raise TypeError(f"model {spec!r}: {k} must be an int, got {v!r}")
        if t == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise TypeError(f"model {spec!r}: {k} must be a finite number, got {v!r}")
    try:
        return MoEConfig.from_hf(d)
    except (ValueError, TypeError) as e:
        raise type(e)(f"model {spec!r}: {e}") from None


def _scalar(field: str, v: str) -> Any:
    """A ``--set`` value, read as YAML 1.2 reads a scalar (``1e-9`` is a number)."""
    import yaml

    try:
        out = yaml.load(v, Loader=yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        raise ValueError(f"--set {field}: cannot read {v!r} as a value") from None
    if isinstance(out, (dict, list)):
        raise ValueError(f"--set {field}: expected a number, got {v!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="moekit plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek-v3", help=f"preset {sorted(PRESETS)} or a HF-style config JSON/YAML")
    ap.add_argument("--cluster", default="h800x2048",
                    help=f"preset {sorted(CLUSTER_PRESETS)}, GPUxN (e.g. gb200x512), or a YAML/JSON file")
    ap.add_argument("--plan", help="a YAML/JSON file of ParallelPlan fields (flags below override it)")
    ap.add_argument("--pp", type=_int("--pp"))
    ap.add_argument("--ep", type=_int("--ep"))
    ap.add_argument("--dp", type=_int("--dp"))
    ap.add_argument("--schedule", choices=list(SCHEDULES))
    ap.add_argument("--comm-sms", type=_comm_sms, help="SMs for EP communication, or 'auto'")
    ap.add_argument("--fp8-dispatch", dest="fp8_dispatch", action="store_true", default=None)
    ap.add_argument("--bf16-dispatch", dest="fp8_dispatch", action="store_false")
    ap.add_argument("--gemm-dtype", choices=["fp8", "bf16"])
    ap.add_argument("--recompute", choices=list(RECOMPUTE))
    ap.add_argument("--routing", help="uniform | node-limited:M | histogram:PATH")
    ap.add_argument("--seq-len", type=_int("--seq-len"))
    ap.add_argument("--micro-batch", type=_int("--micro-batch"), help="sequences per micro-batch")
    ap.add_argument("--global-batch", type=_int("--global-batch"), help="sequences per step")
    ap.add_argument("--num-microbatches", type=_int("--num-microbatches"),
                    help="micro-batches per pipeline (instead of --global-batch; one layout only)")
    ap.add_argument("--mtp-depth", type=_int("--mtp-depth"), help="multi-token-prediction blocks (DeepSeek-V3: 1)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ClusterSpec field, e.g. --set comm_gbps_per_sm=8")
    ap.add_argument("--search", action="store_true", help="search even when --pp, --ep and --schedule are given")
    ap.add_argument("--top", type=_int("--top"), default=5, help="plans to rank (search)")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="search: accept a plan once no bound beats it by more than this fraction (0: exact)")
    ap.add_argument("--sm-split", metavar="JSON", help="bench/sm_split.py output to take comm_gbps_per_sm from "
                    "(default: reports/sm_split.json when it exists)")
    ap.add_argument("--trace", metavar="FILE", help="summarize a PyTorch-profiler Chrome trace: per-stream busy "
                    "time and time per kernel class (plan/trace.py)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--plot", metavar="DIR", help="write PNGs to DIR (of the predicted or best plan)")
    return ap


_SEARCH_FIELDS = ("pp", "ep", "dp", "schedule", "comm_sms", "fp8_dispatch", "routing", "micro_batch", "recompute")


def _inputs(args: argparse.Namespace):
    model = _model(args.model)
    cluster = load_cluster(args.cluster)
    notes = []
    overrides = {}
    for kv in args.set:
        if "=" not in kv:
            raise ValueError(f"--set expects FIELD=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        overrides[k] = _scalar(k, v) if v not in ("", "None", "null") else None
    if "comm_gbps_per_sm" not in overrides:
        m = measured_gbps_per_sm(args.sm_split)
        if m is not None:
            overrides["comm_gbps_per_sm"] = m[0]
            notes.append(f"comm_gbps_per_sm = {m[0]:g} GB/s per SM, measured: {m[1]}")
    elif args.sm_split:
        raise ValueError("--sm-split and --set comm_gbps_per_sm both set the GB/s per SM: give one")
    if overrides:
        try:
            cluster = cluster.from_dict({**cluster.to_dict(), **overrides})
        except (ValueError, TypeError) as e:
            raise type(e)(f"--set: {e}") from None
    base = load_plan(args.plan) if args.plan else None
    fields = {"pp": args.pp, "ep": args.ep, "dp": args.dp, "schedule": args.schedule, "comm_sms": args.comm_sms,
              "fp8_dispatch": args.fp8_dispatch, "gemm_dtype": args.gemm_dtype, "routing": args.routing,
              "seq_len": args.seq_len, "micro_batch": args.micro_batch, "global_batch": args.global_batch,
              "num_microbatches": args.num_microbatches, "mtp_depth": args.mtp_depth, "recompute": args.recompute}
    given = {k: v for k, v in fields.items() if v is not None}
    if base is not None:
        given = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)
                    if getattr(base, f.name) != f.default}, **given}
    return model, cluster, given, notes


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``moekit plan``; returns the exit status (2 for bad inputs)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    try:
        if args.trace:
            summary = summarize(args.trace)
        model, cluster, given, notes = _inputs(args)
        if args.trace:
            pred = predict_pair(model, cluster, given)
            if args.json:
                print(json.dumps({**dataclasses.asdict(summary), "planner": pred}, indent=2))
            else:
                print(render_trace(summary) + "\n" + render_comparison(summary, pred))
            return 0
        one = all(k in given for k in ("pp", "ep", "schedule")) and not args.search
        if one:
            return _one(args, model, cluster, given, notes)
        return _search(args, model, cluster, given, notes)
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        print(f"moekit plan: {msg}", file=sys.stderr)
        return 2


def _one(args, model, cluster, given, notes) -> int:
    result = plan(model, cluster, ParallelPlan(**given))
    for n in notes:
        print(f"moekit plan: {n}", file=sys.stderr)
    if args.json:
        d = to_dict(result)
        d["notes"] = notes
        print(json.dumps(d, indent=2, default=str))
    else:
        render(result)
    if args.plot:
        for p in plot(result, args.plot):
            print(f"wrote {p}", file=sys.stderr)
    return 0


def _search(args, model, cluster, given, notes) -> int:
    probe = ParallelPlan(**{k: v for k, v in given.items() if k != "dp"})  # field checks, one line each
    if "num_microbatches" in given:
        raise ValueError("--num-microbatches fixes one layout's pipeline: give --pp, --ep and --schedule with it, "
                         "or --global-batch for a search")
    if "gemm_dtype" in given and given["gemm_dtype"] == "fp8" and cluster.fp8_tflops is None:
        raise ValueError(f"gemm_dtype='fp8' but cluster {cluster.name!r} has no FP8 rate")
    if not 0 <= args.tolerance < 1 or not math.isfinite(args.tolerance):
        raise ValueError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    if not 1 <= args.top <= 100:
        raise ValueError(f"--top must be in [1, 100], got {args.top}")
    if "pp" in given and cluster.num_gpus % given["pp"]:
        raise ValueError(f"--pp ({given['pp']}) must divide the cluster's {cluster.num_gpus} GPUs")
    if "dp" in given and given["dp"] * given.get("pp", 1) > cluster.num_gpus:
        raise ValueError(f"--dp ({given['dp']}) x pp asks for more than the cluster's {cluster.num_gpus} GPUs")
    if "ep" in given and model.n_routed_experts % given["ep"]:
        raise ValueError(f"--ep ({given['ep']}) must divide the model's {model.n_routed_experts} routed experts")
    fixed = {k: given[k] for k in _SEARCH_FIELDS if k in given}
    gemm = given.get("gemm_dtype", "fp8" if cluster.fp8_tflops is not None else "bf16")
    res = search(model, cluster, fixed, top=args.top, global_batch=given.get("global_batch"),
                 seq_len=probe.seq_len, mtp_depth=probe.mtp_depth, gemm_dtype=gemm, tolerance=args.tolerance)
    ref = None
    if args.model == "deepseek-v3" and cluster.num_gpus == 2048 and not fixed:
        n = res.global_batch // (128 * 1)
        p = ParallelPlan(**{**DEEPSEEK_V3_PLAN, "num_microbatches": n + n % 2, "seq_len": probe.seq_len,
                            "mtp_depth": probe.mtp_depth, "gemm_dtype": gemm})
        ref = plan(model, cluster, p)
    best = res.ranked[0]
    full = plan(model, cluster, best.plan)  # with comm records, for the table and plots
    for n in notes:
        print(f"moekit plan: {n}", file=sys.stderr)
    if args.json:
        d = search_to_dict(res, full, ref)
        d["notes"] = notes
        print(json.dumps(d, indent=2, default=str))
    else:
        render_search(res, full, ref, notes)
        render(full)
    if args.plot:
        for p in plot(full, args.plot):
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
