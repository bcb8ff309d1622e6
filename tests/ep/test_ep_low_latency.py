"""Low-latency dispatch/combine (fixed capacity, per-expert packed layout) against the reference."""

from __future__ import annotations

import pytest
import torch

from moekit.ep import Buffer
from moekit.ep.fp8 import dequantize_1x128
from moekit.testing import spawn

from .reference import Case, make_inputs


def _expected_rows(xs, idxs, num_experts: int, world: int, rank: int):
    """Per local expert: the (source, token) rows it receives, by source rank then token."""
    l = num_experts // world
    out = []
    for e in range(l):
        g = rank * l + e
        out.append([(s, t) for s in range(world) for t in range(idxs[s].shape[0])
                    if g in [int(v) for v in idxs[s][t]]])
    return out


def _ll_rank(rank, world, cap):
    buf = Buffer(hierarchical=False)
    results = []
    for seed, (mode, use_fp8, hook) in enumerate([("masked", False, False), ("random", True, False),
                                                  ("skew", False, True), ("empty", False, False)]):
        case = Case([min(cap, 5 + 2 * r) for r in range(world)], 256 if use_fp8 else 24, 3, 2 * world, mode,
                    seed=seed)
        xs, idxs, ws = make_inputs(case, world)
        out = buf.low_latency_dispatch(xs[rank], idxs[rank], cap, case.num_experts, use_fp8=use_fp8,
                                       return_recv_hook=hook)
        if hook:
            out.hook()
        rx = dequantize_1x128(out.recv_x[0].flatten(0, 1), out.recv_x[1].flatten(0, 1)).view(
            *out.recv_x[0].shape) if use_fp8 else out.recv_x
        expect = _expected_rows(xs, idxs, case.num_experts, world, rank)
        assert out.recv_count.tolist() == [len(rows) for rows in expect]
        for e, rows in enumerate(expect):
            want = torch.stack([xs[s][t] for s, t in rows]) if rows else rx[e, :0]
            tol = 2 ** -4 * float(want.abs().max()) + 1e-6 if use_fp8 and rows else 0.0
            torch.testing.assert_close(rx[e, :len(rows)], want, rtol=0, atol=tol)
            assert bool((rx[e, len(rows):] == 0).all())
        # Experts: y = 2x + 1 on valid rows; combine weights them back.
        y = rx * 2 + 1
        comb = buf.low_latency_combine(y, idxs[rank], ws[rank], out.handle, async_finish=True)
        comb.event.wait()
        valid = idxs[rank] >= 0
        want = ((xs[rank].unsqueeze(1) * 2 + 1) * torch.where(valid, ws[rank], 0).unsqueeze(2)).sum(1)
        if use_fp8:
            torch.testing.assert_close(comb.combined_x, want, rtol=0.15, atol=0.15)
        else:
            torch.testing.assert_close(comb.combined_x, want, rtol=1e-5, atol=1e-5)
        l, c = case.num_experts // world, cap
        assert buf.stats.last.total_bytes == world * l * c * case.hidden * 4  # combine: fixed blocks
        results.append(out.recv_count.sum().item())
    with pytest.raises(ValueError, match="exceeds num_max_dispatch_tokens_per_rank"):
        buf.low_latency_dispatch(torch.zeros(cap + 1, 8), torch.zeros(cap + 1, 2, dtype=torch.int64), cap,
                                 2 * world, use_fp8=False)
    return results


@pytest.mark.parametrize("world", [1, 4])
def test_low_latency(world):
    if world == 1:
        _ll_rank(0, 1, 16)
    else:
        spawn(_ll_rank, world, 16)
