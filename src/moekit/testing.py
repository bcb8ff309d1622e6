"""Run a function on several gloo ranks, as processes on this machine: the harness of multi-rank tests.

``spawn(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` on every rank with the default
process group initialised (gloo on a free local port) and returns the list of the ranks' return
values. A rank that raises makes ``spawn`` raise in the caller with that rank's traceback; a rank that
exits without a result (``os._exit``, a signal) makes it raise :class:`RankError` saying so (unless
``missing_ok``); ranks that do not finish within ``timeout`` seconds are killed and ``spawn`` raises
``TimeoutError``.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ._util import check_positive_int


class RankError(RuntimeError):
    """A rank of :func:`spawn` raised; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, backend, outdir, threads, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
    # Many ranks share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by an injected fault; the result is saved
            pass


def spawn(fn, world_size: int, *args, timeout: float = 300.0, backend: str = "gloo",
          start_method: str | None = None, threads: int = 1, ranks_per_node: int | None = None,
          missing_ok: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return their results in rank order.

    ``fn`` must be a module-level function (it is pickled). ``ranks_per_node`` sets
    ``LOCAL_WORLD_SIZE`` in the ranks, so that :func:`moekit.dist.default_ranks_per_node` sees it.
    ``start_method`` defaults to ``fork`` on Linux (no torch re-import per rank), else ``spawn``.
    ``missing_ok``: a rank that exits without a result (fault-injection tests kill ranks on purpose)
    gives ``None`` instead of a :class:`RankError`.
    """
    check_positive_int("world_size", world_size)
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    old = os.environ.get("LOCAL_WORLD_SIZE")
    if ranks_per_node is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_node)
    else:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
    try:
        with tempfile.TemporaryDirectory(prefix="moekit-spawn-") as outdir:
            ctx = mp.start_processes(
                _entry, args=(fn, world_size, free_port(), backend, outdir, threads, args),
                nprocs=world_size, join=False, start_method=start_method,
            )
            deadline = time.monotonic() + timeout
            try:
                while not ctx.join(timeout=0.2):
                    if time.monotonic() > deadline:
                        for p in ctx.processes:
                            if p.is_alive():
                                p.kill()
                        raise TimeoutError(f"spawn: ranks did not finish within {timeout:.0f}s")
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                errs = []
                for r in range(world_size):
                    path = os.path.join(outdir, f"rank{r}.err")
                    if os.path.exists(path):
                        with open(path) as f:
                            errs.append(f"--- rank {r} ---\n{f.read()}")
                raise RankError("\n".join(errs) or str(e)) from None
            results = []
            for r in range(world_size):
                path = os.path.join(outdir, f"rank{r}.pt")
                if os.path.exists(path):
                    results.append(torch.load(path, weights_only=False))
                elif missing_ok:
                    results.append(None)
                else:
                    raise RankError(f"spawn: rank {r} of {world_size} exited (exit code "
                                    f"{ctx.processes[r].exitcode}) without returning a result: it left fn "
                                    "early (os._exit, sys.exit in a child, a signal)")
            return results
    finally:
        if old is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old
