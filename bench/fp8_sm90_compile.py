"""Compile every kernel for sm_90 (Hopper) without a GPU: a thin wrapper of ``moekit.kernels.targets``.

    PYTHONPATH=src python bench/fp8_sm90_compile.py [--json PATH] [--target sm_90 sm_100 gfx942 gfx950]

Prints the Markdown table of ``moekit.kernels.targets`` (registers, spills, shared memory, tensor cores,
load widths, inline PTX) for the targets asked (default: sm_90); ``--json`` also writes the rows.
``moekit info --targets`` prints the same for all four targets. Exit code 1 when a row is not green.
"""

from __future__ import annotations

import argparse
import json
import sys

from moekit.kernels import targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--target", nargs="+", default=["sm_90"], choices=list(targets.TARGETS))
    args = ap.parse_args(argv)
    rows = targets.compile_matrix(args.target, jobs=2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
    print(targets.to_markdown(rows))
    return 0 if all(targets.green(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
