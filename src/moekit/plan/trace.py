"""Read a PyTorch-profiler Chrome trace: per-stream busy time and time per kernel class.

``summarize(path)`` returns a ``TraceSummary``: the GPU span (first kernel start to last kernel end),
each stream's busy time (the union of its kernel intervals, so overlapping kernels count once) and the
summed kernel time per class (GEMM, attention, elementwise, comm dispatch/combine/notify, other).
Times are milliseconds on the host (plain floats; no device, no sync). A file that is missing, not
JSON, has no ``traceEvents`` list or no GPU kernels raises ValueError naming what is wrong.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from .cluster import ParallelPlan
from .cost import two_stream
from .planner import PAIR_LAYERS, layer_costs, moe_layer_times

# Kernel-name patterns, tried in order (lower-cased name); the first that matches names the class.
CLASSES: tuple[tuple[str, str], ...] = (
    ("comm:notify", r"notify"),
    ("comm:dispatch", r"dispatch"),
    ("comm:combine", r"combine"),
    ("comm:other", r"nccl|allreduce|all_reduce|allgather|reduce_scatter|sendrecv"),
    ("attention", r"flash|fmha|attn|attention|mla"),
    ("gemm", r"gemm|cutlass|sm90_xmma|cublas|matmul|wgmma"),
    ("elementwise", r"elementwise|vectorized|cast|quant|transpose|norm|silu|swiglu|act|reduce|copy|softmax|"
                    r"fill|index|scatter|gather|cat|add|mul|rotary|expand|mapping"),
)


def kernel_class(name: str) -> str:
    """The class of a kernel from its name (``CLASSES``, first match), or ``"other"``."""
    low = name.lower()
    for cls, pat in CLASSES:
        if re.search(pat, low):
            return cls
    return "other"


@dataclass
class TraceSummary:
    path: str
    kernels: int
    span_ms: float
    stream_busy_ms: dict[str, float] = field(default_factory=dict)
    stream_classes: dict[str, dict[str, float]] = field(default_factory=dict)
    class_ms: dict[str, float] = field(default_factory=dict)


def _union_ms(iv: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(iv):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1000.0


def summarize(path: str) -> TraceSummary:
    """Summarize the GPU kernels of the Chrome trace at ``path`` (see the module doc)."""
    if not os.path.isfile(path):
        raise ValueError(f"--trace {path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--trace {path!r}: not JSON ({e})") from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError(f"--trace {path!r}: no 'traceEvents' list (not a PyTorch-profiler Chrome trace)")
    per_stream: dict[str, list[tuple[float, float]]] = {}
    stream_classes: dict[str, dict[str, float]] = {}
    classes: dict[str, float] = {}
    for ev in events:
        if not isinstance(ev, dict) or ev.get("ph") != "X" or str(ev.get("cat", "")).lower() != "kernel":
            continue
        try:
            ts, dur = float(ev["ts"]), float(ev["dur"])
        except (KeyError, TypeError, ValueError):
            continue
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        stream = str(args.get("stream", ev.get("tid", "?")))
        cls = kernel_class(str(ev.get("name", "")))
        per_stream.setdefault(stream, []).append((ts, ts + dur))
        sc = stream_classes.setdefault(stream, {})
        sc[cls] = sc.get(cls, 0.0) + dur / 1000.0
        classes[cls] = classes.get(cls, 0.0) + dur / 1000.0
    if not per_stream:
        raise ValueError(f"--trace {path!r}: no GPU kernels (no 'X' events with cat 'kernel')")
    starts = [s for iv in per_stream.values() for s, _ in iv]
    ends = [e for iv in per_stream.values() for _, e in iv]
    busy = {s: _union_ms(iv) for s, iv in per_stream.items()}
    return TraceSummary(path=path, kernels=sum(len(v) for v in per_stream.values()),
                        span_ms=(max(ends) - min(starts)) / 1000.0,
                        stream_busy_ms=dict(sorted(busy.items(), key=lambda kv: -kv[1])),
                        stream_classes=stream_classes, class_ms=dict(sorted(classes.items(), key=lambda kv: -kv[1])))


def render_trace(s: TraceSummary) -> str:
    """The summary as a text table."""
    lines = [f"trace {s.path}: {s.kernels} GPU kernels, span {s.span_ms:.1f} ms", "",
             f"{'stream':>8} {'busy ms':>9}  classes (summed kernel ms)"]
    for st, b in s.stream_busy_ms.items():
        cl = ", ".join(f"{c} {v:.1f}" for c, v in sorted(s.stream_classes[st].items(), key=lambda kv: -kv[1]))
        lines.append(f"{st:>8} {b:9.1f}  {cl}")
    lines += ["", f"{'class':<14} {'ms':>8}"]
    lines += [f"{c:<14} {v:8.1f}" for c, v in s.class_ms.items()]
    return "\n".join(lines)


# The configuration of DeepSeek's published training profile (deepseek-ai/profile-data README):
# DualPipe F&B chunk pair of 4 MoE layers each, EP64, TP1, 4K sequence; 20 comm SMs as DeepSeek-V3
# report sec. 3.2.2. Micro-batch 1 is the default; ``--micro-batch`` overrides it.
TRACE_PLAN = dict(pp=16, ep=64, schedule="dualpipe", comm_sms=20, routing="node-limited:4", fp8_dispatch=True,
                  recompute="selective", micro_batch=1, seq_len=4096)


def predict_pair(model, cluster, given: dict) -> dict[str, float]:
    """The planner's F&B pair of ``PAIR_LAYERS`` MoE layers for ``TRACE_PLAN`` updated by ``given``:
    milliseconds of the pair, of the compute stream and of the communication stream, and the comm SMs."""
    p = ParallelPlan(**{**TRACE_PLAN, **{k: v for k, v in given.items() if k in TRACE_PLAN or k == "gemm_dtype"}})
    lc = layer_costs(model, cluster, p)
    lt = moe_layer_times(model, cluster, p, lc.spread, lc.k)
    pair = two_stream([lt.forward() * PAIR_LAYERS, lt.backward(True) * PAIR_LAYERS])
    return {"pair_ms": pair.duration * 1e3, "compute_ms": pair.compute * 1e3, "comm_ms": pair.comm * 1e3,
            "comm_sms": float(lc.k), "micro_batch": float(p.micro_batch)}


def render_comparison(s: TraceSummary, pred: dict[str, float]) -> str:
    """Trace against prediction: pair span, busiest (compute) stream, comm stream (the stream whose
    kernels are mostly ``comm:*``)."""
    comm_streams = [st for st, c in s.stream_classes.items()
                    if sum(v for k, v in c.items() if k.startswith("comm")) > 0.5 * sum(c.values())]
    comp_streams = [st for st in s.stream_busy_ms if st not in comm_streams]
    comp = s.stream_busy_ms[comp_streams[0]] if comp_streams else 0.0
    comm = s.stream_busy_ms[comm_streams[0]] if comm_streams else 0.0
    rows = [("pair (GPU span)", s.span_ms, pred["pair_ms"]), ("compute stream busy", comp, pred["compute_ms"]),
            ("comm stream busy", comm, pred["comm_ms"])]
    lines = ["", f"planner: micro-batch {pred['micro_batch']:g}, {pred['comm_sms']:g} comm SMs",
             f"{'':<20} {'trace ms':>9} {'planner ms':>11} {'error':>7}"]
    for name, t, q in rows:
        err = f"{(q - t) / t:+.0%}" if t > 0 else "-"
        lines.append(f"{name:<20} {t:9.1f} {q:11.1f} {err:>7}")
    return "\n".join(lines)
