"""The fault table of docs/ep.md ("Faults"): every case of the fault-injection harness, one bad rank of 4.

For each fault: what every rank raises (the same on all; the message's start), the slowest rank's time
from the faulty call to its exception, and whether the group is usable afterwards (a valid dispatch +
combine checked against the reference). Gloo ranks on this machine (``moekit.testing.spawn``).

    .venv/bin/python bench/faults.py [--timeout 2.0] [--markdown]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faults.harness import BAD, PEER_FAULTS, WORLD, run_in_group, run_peer  # noqa: E402
from moekit import benchtools  # noqa: E402
from moekit.testing import spawn  # noqa: E402


def _short(msg: str, n: int = 160) -> str:
    body = re.sub(r"^moekit\.Buffer\.[\w.]+: ", "", msg)
    if body.endswith("]") and "did not arrive" in body:
        body = body.rsplit(" [", 1)[0]  # PeerTimeout: drop the backend's detail
    body = body.replace("|", "\\|")
    return body if len(body) <= n else body[:n - 3] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--timeout", type=float, default=2.0, help="Buffer timeout of the dead/absent peer cases (s)")
    args = ap.parse_args()
    rows = []
    for path, res in (("flat", spawn(run_in_group, WORLD, False)),
                      ("two-stage", spawn(run_in_group, WORLD, True, ranks_per_node=2))):
        for i, (fault, *_r) in enumerate(res[0]):
            outs = [r[i][1] for r in res]
            same = len({(o[0], re.sub(r"^moekit\.Buffer\.[\w.]+: ", "", o[1])) for o in outs if o}) == 1
            kind, msg = outs[0]
            rows.append((f"{fault.what} ({path})", f"`{kind}` {_short(msg)}" + ("" if same else " (DIFFERS)"),
                         max(r[i][2] for r in res), "yes" if all(r[i][3] for r in res) else "no"))
    for mode, fault in sorted(PEER_FAULTS.items()):
        res = spawn(run_peer, WORLD, mode, args.timeout, missing_ok=True, timeout=120)
        good = [r for k, r in enumerate(res) if k != BAD]
        kind, msg = good[0][0]
        refused = all(r[2] for r in good)
        rows.append((fault.what, f"`{kind}` {_short(msg)}", max(r[1] for r in good),
                     "no: rebuild the group" + (" (next call refused at once)" if refused else "")))
    print(f"fault table, {WORLD} gloo ranks, bad rank {BAD}, peer timeout {args.timeout:g} s; "
          f"{benchtools.device_tag()}")
    print("| fault (one rank of 4) | what every rank raises | slowest rank | group reusable? |")
    print("|---|---|---|---|")
    for what, seen, secs, reuse in rows:
        print(f"| {what} | {seen} | {secs:.3f} s | {reuse} |")


if __name__ == "__main__":
    main()
