"""``moekit info | demo | bench | plan``."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def _auto_transport(heap: str | None, backend: str) -> str:
    """What ``Buffer(transport="auto")`` picks for ranks of one node here, and why (ep/transport/select.py)."""
    import os

    from .kernels import atomics

    prefer = os.environ.get("MOEKIT_TRANSPORT", "")
    if prefer == "collective":
        return "collective everywhere (MOEKIT_TRANSPORT=collective)"
    if heap is None:
        return "collective (no heap here)"
    if backend == "cpu":
        ok, why = atomics.available()
        ex = "native executor: worker threads, " + why if ok else "Triton executor (interpreter): " + why
        return f"symmetric for CPU ranks of one node ({ex}); collective across machines and for one rank"
    return "symmetric for GPUs of one node (Triton kernels); collective across nodes and for one rank"


def _info_targets(as_json: bool) -> int:
    """``moekit info --targets``: every kernel compiled for sm_90 / sm_100 / gfx942 / gfx950 (no GPU needed)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from .kernels import targets

    rows = targets.compile_matrix(jobs=min(4, os.cpu_count() or 1))
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
        return 0
    t = Table(title="moekit kernels compiled per target, no GPU involved (docs/portability.md)")
    for c in targets.SUMMARY_HEADER:
        t.add_column(c)
    for r in rows:
        if r.kind != "helper":
            cells = [c.replace("**", "") for c in targets.summary_cells(r)]
            t.add_row(*cells, style=None if targets.green(r) else "red")
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(t)
    helpers = sorted({r.kernel for r in rows if r.kind == "helper"})
    console.print(f"device helpers (inlined into the kernels above): {', '.join(helpers)}; details: --json")
    return 0 if all(targets.green(r) for r in rows) else 1


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import platform

    if getattr(args, "targets", False):
        return _info_targets(args.json)

    p = platform.info()
    t = Table(title="moekit info", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("python", p.python_version)
    t.add_row("torch", p.torch_version)
    t.add_row("triton", p.triton_version or "not installed")
    t.add_row("backend", p.backend)
    t.add_row("device", p.device_name)
    t.add_row("SMs" if p.backend != "cpu" else "CPU cores", str(p.sm_count))
    if p.capability:
        t.add_row("compute capability", f"{p.capability[0]}.{p.capability[1]}")
    t.add_row("triton mode", "interpreter (TRITON_INTERPRET=1)" if p.triton_interpreted else "compiled")
    t.add_row("PTX fast paths", ("on" if p.ptx_enabled else "off") + f" ({p.ptx_reason})")
    t.add_row("distributed backends", ", ".join(p.dist_backends) or "none")
    heap, heap_why = platform.symmetric_heap_status()
    t.add_row("symmetric heap", f"{heap or 'none'} ({heap_why})")
    t.add_row("transport (auto)", _auto_transport(heap, p.backend))
    row = {"cuda": "NVIDIA: Triton -> PTX (+ inline PTX), NCCL",
           "rocm": "AMD: Triton -> AMDGCN, RCCL",
           "cpu": "CPU: torch references (+ Triton interpreter in tests), gloo"}[p.backend]
    t.add_row("backends row", row)
    Console().print(t)
    return 0


def _forward(module: str, argv: list[str]) -> int:
    return int(importlib.import_module(module).main(argv) or 0)


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    script = _BENCH_DIR / f"{args.name}.py"
    if not script.exists():
        names = sorted(p.stem for p in _BENCH_DIR.glob("*.py")) if _BENCH_DIR.exists() else []
        print(f"moekit bench: no benchmark {args.name!r}; available: {', '.join(names) or 'none (not a checkout)'}",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_BENCH_DIR.parent / "src"), env.get("PYTHONPATH", "")])
    return subprocess.call([sys.executable, str(script), *rest], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="what moekit runs on here")
    info.add_argument("--targets", action="store_true", help="compile every kernel for sm_90/sm_100/gfx942/gfx950")
    info.add_argument("--json", action="store_true", help="with --targets: the rows as a JSON list")
    sub.add_parser("demo", help="train a small DeepSeek-V3-style MoE model with expert parallelism", add_help=False)
    b = sub.add_parser("bench", help="run a benchmark script of bench/ (checkout only)")
    b.add_argument("name", help="e.g. ep_cpu, ep_hierarchical, moe_cpu, pipeline_bubbles")
    sub.add_parser("plan", help="predict a cluster's training step", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "info":
        return _info(args)
    if args.cmd == "demo":
        return _forward("moekit.demo", rest)
    if args.cmd == "plan":
        return _forward("moekit.plan.cli", rest)
    return _bench(args, rest)


if __name__ == "__main__":
    sys.exit(main())
