"""Every fault of one rank (of 4) is the same clear error on every rank, within a bound, and bad input
leaves the group usable; a dead or absent peer is moekit's PeerTimeout naming it (harness.py)."""

from __future__ import annotations

import re

import pytest
import torch

from moekit.ep import Buffer
from moekit.ep.errors import Code, Status, first_failure
from moekit.testing import RankError, spawn

from .harness import BAD, PEER_FAULTS, TIMEOUT, WORLD, run_in_group, run_peer

BOUND_S = 20.0  # generous: the machine is shared; a hang would be the Buffer's 60 s timeout or gloo's


def _body(msg: str) -> str:
    # The call prefix ("moekit.Buffer.combine: ") is the rank's own call; the rest must be identical.
    return re.sub(r"^moekit\.Buffer\.[\w.]+: ", "", msg)


def _check_rows(results, bad=BAD):
    for i, (fault, *_rest) in enumerate(results[0]):
        per_rank = [r[i][1] for r in results]
        assert per_rank[0] is not None, f"{fault.name}: no error raised"
        kinds = {p[0] for p in per_rank}
        bodies = {_body(p[1]) for p in per_rank}
        assert kinds == {fault.exc} and len(bodies) == 1, f"{fault.name}: ranks differ: {per_rank}"
        msg = per_rank[0][1]
        assert fault.text in msg, (fault.name, msg)
        if fault.names_rank:
            assert f"rank {bad} of {WORLD}" in msg, (fault.name, msg)
        assert max(r[i][2] for r in results) < BOUND_S, (fault.name, [r[i][2] for r in results])
        assert all(r[i][3] for r in results)  # a valid call right after succeeded (checked on the ranks)


def test_faults_on_one_rank_flat():
    _check_rows(spawn(run_in_group, WORLD, False))


def test_faults_on_rank_zero():
    """Rank 0 misbehaving: the message still names it (handle identities are compared to the majority)."""
    _check_rows(spawn(run_in_group, WORLD, False, 0), bad=0)


def test_faults_on_one_rank_two_stage():
    _check_rows(spawn(run_in_group, WORLD, True, ranks_per_node=2))


@pytest.mark.parametrize("mode", sorted(PEER_FAULTS))
def test_dead_or_absent_peer(mode):
    fault = PEER_FAULTS[mode]
    results = spawn(run_peer, WORLD, mode, missing_ok=True, timeout=120)
    assert results[BAD] is None
    for r, res in enumerate(results):
        if r == BAD:
            continue
        (kind, msg), seconds, refused = res
        assert kind == fault.exc and fault.text in msg, msg
        assert "gloo" not in msg.split("[")[0] and "must be rebuilt" in msg
        assert seconds < TIMEOUT + 5.0 + BOUND_S, seconds  # the timeout, the side channel's grace, slack
        assert refused  # the next call says at once that the group is broken


def _two_ranks_fail(rank, world):
    """Ranks 3 and 1 fail with different errors: every rank raises rank 1's (the lowest)."""
    buf = Buffer()
    x, idx = torch.randn(4, 16), torch.randint(0, 2 * world, (4, 2))
    bad_x = x.long() if rank == 1 else x
    bad_idx = torch.full_like(idx, 99) if rank == 3 else idx
    with pytest.raises(TypeError) as err:
        buf.dispatch(bad_x, bad_idx, None, 2 * world)
    return str(err.value)


def test_lowest_failing_rank_wins():
    msgs = spawn(_two_ranks_fail, WORLD)
    assert len(set(msgs)) == 1 and "rank 1 of 4" in msgs[0] and "got torch.int64" in msgs[0], msgs
    # The rule itself, with the higher rank listed first.
    s3 = Status(int(Code.IDX_RANGE), 3, 99, 8).ints()
    s1 = Status(int(Code.X_DTYPE), 1, 6).ints()
    assert first_failure([Status().ints(), s3, s1]).rank == 1
    assert first_failure([s1, s3]).rank == 1 and first_failure([Status().ints()] * 3).ok


def _exits_early(rank, world):
    if rank == 1:
        import os

        os._exit(0)
    return rank


def test_spawn_reports_a_rank_without_result():
    with pytest.raises(RankError, match="rank 1 of 2 exited .* without returning a result"):
        spawn(_exits_early, 2)
    assert spawn(_exits_early, 2, missing_ok=True) == [0, None]


def test_timeout_and_check_handles_arguments():
    for bad in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="timeout must be a positive, finite number of seconds"):
            Buffer(timeout=bad)
    x, idx = torch.randn(3, 8), torch.tensor([[0], [1], [-1]])
    for check in (None, True, False):  # one rank: the preflight is a local copy; without it a local error
        buf = Buffer(timeout=5, check_handles=check)
        assert buf.timeout == 5.0
        d = buf.dispatch(x, idx, None, 2)
        with pytest.raises(TypeError, match="rank 0 of 1: handle must be a DispatchHandle"):
            buf.combine(d.recv_x, None)
        assert torch.equal(buf.combine(d.recv_x, d.handle).combined_x, torch.where(idx >= 0, 1.0, 0.0) * x)


def _absent_pipeline_peer(rank, world, timeout):
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
    from pipeline_stages import DTYPE, MB, H, Stage, batch, criterion

    from moekit.ep import PeerTimeout
    from moekit.pipeline import OneFOneB, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    set_p2p_tensor_shapes([(MB, H)])
    set_p2p_tensor_dtype(DTYPE)
    pipe = OneFOneB(Stage(rank), timeout=timeout)
    if rank == 1:  # alive, but never takes part in the step
        time.sleep(timeout + 4)
        return None
    x, _ = batch(4, 0)
    t0 = time.monotonic()
    try:
        pipe.step(x, num_chunks=4, criterion=criterion, labels=())
    except PeerTimeout as err:
        return time.monotonic() - t0, str(err), err.ranks
    return None


def test_pipeline_absent_neighbour_is_a_peer_timeout():
    # Rank 0's first forward waits for nothing (it sends), its backward waits for rank 1's gradient: the
    # bounded wait of the pipeline's p2p raises moekit's PeerTimeout naming rank 1, within the timeout.
    timeout = 2.0
    res = spawn(_absent_pipeline_peer, 2, timeout, timeout=90)
    took, msg, ranks = res[0]
    assert ranks == (1,), msg
    assert "pipeline step" in msg and "did not arrive" in msg
    assert timeout <= took < timeout + 20, took


def _ll_fault_device_protocol(rank, world):
    """The device-backend protocol (no preflight; statuses in the blocks' headers) run on gloo: an OOM while
    one rank prepares its low-latency dispatch / combine block is the same MemoryError on every rank."""
    from ep.reference import Case
    from moekit.ep import low_latency as ll_mod

    from .harness import _with_oom, check_low_latency

    buf = Buffer(timeout=60.0)
    buf._ll_host_checks = False
    x, idx = torch.randn(6, 128), torch.randint(0, 2 * world, (6, 2))
    w = torch.rand(6, 2)
    got = []
    for name in ("quantize_1x128", "_combine_block"):
        ll = buf.low_latency_dispatch(x.bfloat16(), idx, 8, 2 * world, use_fp8=False)
        if name == "quantize_1x128":
            def call():
                return buf.low_latency_dispatch(x, idx, 8, 2 * world)
        else:
            def call(ll=ll):
                return buf.low_latency_combine(ll.recv_x, idx, w, ll.handle)
        try:
            _with_oom(rank == BAD, call, ll_mod, name)
            got.append(None)
        except Exception as err:  # noqa: BLE001 - compared in the parent
            got.append((type(err).__name__, _body(str(err))))
        check_low_latency(buf, Case([4] * world, 16, 2, 2 * world, "masked", seed=90), rank, world)
    return got


def test_low_latency_exception_device_protocol():
    results = spawn(_ll_fault_device_protocol, WORLD, timeout=120)
    for i in range(2):
        per_rank = {r[i] for r in results}
        assert len(per_rank) == 1, per_rank
        (kind, msg), = per_rank
        assert kind == "MemoryError" and f"rank {BAD} of {WORLD}: MemoryError while preparing" in msg, msg
