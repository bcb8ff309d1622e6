"""The heap protocol's native CPU executor (``moekit.kernels.comm_native``): K worker threads, real
release/acquire flags, races between workers of a launch and between ranks.

Every result is compared bitwise with the collective transport on the same inputs in the same rank
(which the single-process reference checks in tests/ep/test_ep_symmetric.py). Triton's interpreter runs
the programs of a launch one after another, so only this executor makes the workers really race.
"""

from __future__ import annotations

import pytest
import torch

from moekit.ep import Buffer
from moekit.testing import spawn

from .reference import Case, make_inputs
from .test_ep_symmetric import _ll_same, _same_as_collective

HEAP = 4 << 20


def _workers_rank(rank, world):
    for k in (1, 2, 4, 16):  # 16 workers for chunks of a few rows: most have nothing to copy
        sym = Buffer(hierarchical=False, transport="symmetric", heap_bytes=HEAP, num_sms=k)
        col = Buffer(hierarchical=False, transport="collective")
        ch = sym.transport_channel
        assert ch.executor_name == "native", ch.executor_why
        # Back to back, reusing both parities many times; skewed, all-to-one, empty ranks, FP8 pairs.
        for i in range(6):
            mode = ("random", "skew", "to_rank0", "masked", "empty", "one_expert")[i]
            case = Case([0 if (rank == 1 and i == 2) else 3 + 2 * i] * world, 128, 3, 4 * world, mode,
                        seed=100 + 10 * k + i)
            _same_as_collective(sym, col, case, rank, world, fp8=(i % 3 == 1))
            assert ch.last_workers == k  # exactly K threads moved rows
        # Low latency on the heap, with and without the hook.
        for hook in (False, True):
            case = Case([5] * world, 128, 2, 2 * world, "random", seed=200 + k + hook)
            _ll_same(sym, col, case, rank, world, 8, False, hook)


@pytest.mark.parametrize("world", [2, 4])
def test_native_workers_race_bitwise_equal(world):
    spawn(_workers_rank, world, timeout=240)


def _triton_rank(rank, world):
    sym = Buffer(hierarchical=False, transport="symmetric", heap_bytes=1 << 20, num_sms=2)
    col = Buffer(hierarchical=False, transport="collective")
    assert sym.transport_channel.executor_name == "triton"
    assert sym.transport_channel.last_workers is None
    _same_as_collective(sym, col, Case([7] * world, 128, 3, 4 * world, "masked", seed=300), rank, world)


def test_triton_kernels_still_run_the_protocol(monkeypatch):
    """MOEKIT_COMM_EXECUTOR=triton: the GPU path's kernels (in the interpreter) on the same heaps."""
    monkeypatch.setenv("MOEKIT_COMM_EXECUTOR", "triton")
    spawn(_triton_rank, 2, timeout=240)


def _sync_count_rank(rank, world):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    from moekit.ep.transport import symmetric as symmod

    # .tolist()/.item() while the Channel waits for flags (a host poll of the flags would read them so).
    in_wait, tolist, wait = [False], torch.Tensor.tolist, symmod.Channel.wait

    def counted_tolist(t):
        Count.n += in_wait[0]
        return tolist(t)

    def counted_wait(ch, landing):
        in_wait[0] = True
        try:
            return wait(ch, landing)
        finally:
            in_wait[0] = False
    torch.Tensor.tolist, symmod.Channel.wait = counted_tolist, counted_wait
    sym = Buffer(hierarchical=False, transport="symmetric", heap_bytes=HEAP, num_sms=2)
    case = Case([6] * world, 128, 2, 2 * world, "random", seed=400)
    xs, idxs, ws = make_inputs(case, world)
    out = sym.low_latency_dispatch(xs[rank], idxs[rank], 8, case.num_experts, use_fp8=False)
    sym.low_latency_combine(out.recv_x, idxs[rank], ws[rank], out.handle)  # warm
    with Count():
        out = sym.low_latency_dispatch(xs[rank], idxs[rank], 8, case.num_experts, use_fp8=False,
                                       return_recv_hook=True)
        out.hook()
        comb = sym.low_latency_combine(out.recv_x, idxs[rank], ws[rank], out.handle, return_recv_hook=True)
        comb.hook()
    torch.Tensor.tolist, symmod.Channel.wait = tolist, wait
    return Count.n


def test_low_latency_flag_wait_has_no_scalar_reads():
    """No ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, a data-dependent size) in a low-latency
    dispatch + combine on the heap, and no ``.tolist()`` while waiting for the flags: the wait reads the heap
    with atomics (the Triton executor's host poll reads a ``ready`` tensor back: ``MOEKIT_COMM_EXECUTOR=triton``
    fails this test). Not counted: the ``.tolist()`` of the status words at completion (docs/ep.md)."""
    assert spawn(_sync_count_rank, 2, timeout=120) == [0, 0]


def test_executor_argument_is_checked():
    from moekit.ep.heap import virtual_heaps
    from moekit.ep.transport.symmetric import choose_executor

    h = virtual_heaps(1, 4096)[0]
    with pytest.raises(ValueError, match="executor must be one of"):
        choose_executor(h, "cuda")
    assert choose_executor(h, "triton")[0] == "triton"
    assert choose_executor(h)[0] == "native"


def _heap_rank(rank, world, shm_dir):
    from moekit.ep.heap import shm_heap
    from moekit.ep.transport import Comm

    heap = shm_heap(Comm(None, world, rank, timeout=2.0), 1 << 16, shm_dir)
    return heap.pids


def test_heap_segments_mode_0600_and_never_left(tmp_path):
    import os
    import stat

    from moekit.ep.heap import sweep_stale_segments

    d = str(tmp_path)
    pids = spawn(_heap_rank, 2, d, timeout=60)
    assert len(set(pids[0])) == 2 and os.listdir(d) == []  # unlinked once every rank mapped them
    # A stale segment of a dead process (a job killed while creating its heap) and a live one.
    dead = os.path.join(d, f"moekit-{os.getuid()}-abc-0-999999999")
    live = os.path.join(d, f"moekit-{os.getuid()}-abc-1-{os.getpid()}")
    for p in (dead, live):
        fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
    assert sweep_stale_segments(d) == [dead] and os.listdir(d) == [os.path.basename(live)]
    assert stat.S_IMODE(os.stat(live).st_mode) == 0o600
    os.unlink(live)


def test_heap_created_owner_only(tmp_path, monkeypatch):
    import os
    import stat

    from moekit.ep import heap as heapmod

    seen = []
    real = torch.from_file

    def spy(path, *a, **k):
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        return real(path, *a, **k)
    monkeypatch.setattr(torch, "from_file", spy)

    class One:
        size, rank = 1, 0

        def exchange_fixed(self, msg):
            return msg.clone()
    heapmod.shm_heap(One(), 1 << 16, str(tmp_path))
    assert seen == [0o600] and os.listdir(tmp_path) == []


def _killed_rank(rank, world):
    import os
    import time

    from moekit.ep import PeerTimeout

    buf = Buffer(hierarchical=False, transport="symmetric", heap_bytes=HEAP, num_sms=2, timeout=30.0)
    case = Case([6] * world, 128, 2, 2 * world, "random", seed=500)
    xs, idxs, ws = make_inputs(case, world)
    buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    if rank == 1:
        os._exit(0)  # gone mid-job, after the heap exists, with no clean-up run (as SIGKILL; spawn's harness
        # reports a signalled rank as an error of the test, an exit as a missing result)
    t0 = time.monotonic()
    try:
        buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    except PeerTimeout as err:
        return str(err), time.monotonic() - t0, buf.transport_channel.heap.pids
    return None


def test_killed_peer_is_reported_at_once_and_leaves_no_segment():
    """A rank whose process vanishes: the survivor's wait sees the process gone (well before the 30 s timeout) and names
    it; no segment of the job is left in /dev/shm (each rank unlinked its name once all had mapped it)."""
    import os

    res = spawn(_killed_rank, 2, timeout=120, missing_ok=True)
    assert res[1] is None
    msg, seconds, pids = res[0]
    assert "rank(s) [1]" in msg and seconds < 15.0, (msg, seconds)
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"moekit-{os.getuid()}-")
            and int(n.rsplit("-", 1)[1]) in pids]
    assert left == []
