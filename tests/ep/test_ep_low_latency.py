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
    errors = [_ll_errors(Buffer(hierarchical=False), rank, world, cap, host) for host in (True, False)]
    return results, errors


def _round_trip(buf: Buffer, rank: int, world: int, cap: int, seed: int, combine_dtype=None,
                mixed: bool = False) -> None:
    """A valid low-latency dispatch + combine (experts y = 2x + 1), checked against the reference.
    ``mixed``: some rank combines in bf16 (its rows are bf16-rounded for everyone)."""
    case = Case([min(cap, 3 + r) for r in range(world)], 128, 2, 2 * world, "masked", seed=seed)
    xs, idxs, ws = make_inputs(case, world)
    out = buf.low_latency_dispatch(xs[rank], idxs[rank], cap, case.num_experts, use_fp8=False)
    expect = _expected_rows(xs, idxs, case.num_experts, world, rank)
    assert out.recv_count.tolist() == [len(rows) for rows in expect]
    y = out.recv_x * 2 + 1
    comb = buf.low_latency_combine(y.to(combine_dtype or y.dtype), idxs[rank], ws[rank], out.handle)
    valid = idxs[rank] >= 0
    want = ((xs[rank].unsqueeze(1) * 2 + 1) * torch.where(valid, ws[rank], 0).unsqueeze(2)).sum(1)
    tol = 2e-2 if mixed else 1e-5
    assert comb.combined_x.dtype == (combine_dtype or y.dtype)
    torch.testing.assert_close(comb.combined_x.float(), want, rtol=tol, atol=tol)


def _ll_errors(buf: Buffer, rank: int, world: int, cap: int, host_checks: bool):
    """Bad input on one rank (the last): every rank raises the same error, then a valid call succeeds.
    ``host_checks=False`` runs the device-backend protocol (status words in the block's header) on gloo."""
    buf._ll_host_checks = host_checks
    e = 2 * world
    case = Case([6] * world, 128, 2, e, "masked", seed=71)
    xs, idxs, ws = make_inputs(case, world)
    x, idx, w = xs[rank], idxs[rank], ws[rank]
    bad = rank == world - 1
    # Same sizes as every call below: the device protocol sizes a bad rank's block from its previous call.
    _round_trip(buf, rank, world, cap, seed=70)
    ok = buf.low_latency_dispatch(x, idx, cap, e, use_fp8=False)
    y = ok.recv_x * 2

    def disp(xx=x, ii=idx, c=cap, ee=e, fp8=False, hook=False):
        out = buf.low_latency_dispatch(xx, ii, c, ee, use_fp8=fp8, return_recv_hook=hook)
        if hook:
            out.hook()

    def comb(yy=y, ii=idx, ww=w, asyn=False):
        buf.low_latency_combine(yy, ii, ww, ok.handle, async_finish=asyn).event.wait()

    cases = [  # (name, exception, text, call, host-check protocol only)
        ("x 3-D", ValueError, "x must be 2-D", lambda: disp(xx=x[None] if bad else x), False),
        ("x int", TypeError, "got torch.int64", lambda: disp(xx=x.long() if bad else x), False),
        ("idx int32", TypeError, "topk_idx must be int64", lambda: disp(ii=idx.int() if bad else idx), False),
        ("T > C", ValueError, f"num_tokens ({cap + 1}) exceeds num_max_dispatch_tokens_per_rank ({cap})",
         lambda: disp(xx=torch.randn(cap + 1, 128) if bad else x,
                      ii=torch.zeros(cap + 1, 2, dtype=torch.int64) if bad else idx), False),
        ("idx too big", ValueError, f"topk_idx values must lie in [-1, num_experts={e}), found {e}",
         lambda: disp(ii=torch.full_like(idx, e) if bad else idx, hook=True), False),
        ("idx below -1", ValueError, "found -3", lambda: disp(ii=torch.full_like(idx, -3) if bad else idx), False),
        ("E not divisible", ValueError, f"num_experts ({e + 1}) must be a positive multiple",
         lambda: disp(ee=e + 1 if bad else e), False),
        ("fp8 hidden", ValueError, "multiple of 128, got 100",
         lambda: disp(xx=x[:, :100] if bad else x, fp8=True), True),
        ("capacity differs", ValueError,
         f"num_max_dispatch_tokens_per_rank differs between ranks: rank 0 passes {cap}, it passes {2 * cap}",
         lambda: disp(c=2 * cap if bad else cap), True),
        ("hidden differs", ValueError, "hidden size differs between ranks: rank 0 passes 128, it passes 64",
         lambda: disp(xx=x[:, :64] if bad else x), True),
        ("dtype differs", ValueError, "x dtype (bfloat16 for an FP8 pair) differs between ranks",
         lambda: disp(xx=x.bfloat16() if bad else x), True),
        ("combine x shape", ValueError, "low_latency_combine's x must be",
         lambda: comb(yy=y[:, :-1] if bad else y), False),
        ("combine x int", ValueError, "low_latency_combine's x must be",
         lambda: comb(yy=y.long() if bad else y), False),
        ("combine weights f64", ValueError, "topk_idx and topk_weights must be int64 and float32 [6, num_topk]",
         lambda: comb(ww=w.double() if bad else w, asyn=True), False),
        ("combine idx range", ValueError, "found -2", lambda: comb(ii=torch.full_like(idx, -2) if bad else idx), False),
    ]
    out = []
    for name, exc, text, call, host_only in cases:
        if host_only and not host_checks:
            continue  # these size the block: without a host check they must agree (documented)
        try:
            call()
            got = None
        except Exception as err:  # noqa: BLE001 - compared in the parent
            got = (type(err).__name__, str(err))
        out.append((name, exc.__name__, text, got))
        _round_trip(buf, rank, world, cap, seed=len(out))  # the group is still usable
    # A valid float dtype that differs in combine travels in the dispatch's dtype (converted).
    _round_trip(buf, rank, world, cap, seed=99, combine_dtype=torch.bfloat16 if bad else None, mixed=True)
    return out


@pytest.mark.parametrize("world", [1, 4])
def test_low_latency(world):
    results = [_ll_rank(0, 1, 16)] if world == 1 else spawn(_ll_rank, world, 16)
    for mode in range(2):  # host-check protocol, device protocol
        errors = [r[1][mode] for r in results]
        for i, (name, exc, text, _) in enumerate(errors[0]):
            per_rank = [e[i][3] for e in errors]
            if world == 1 and name in ("capacity differs", "hidden differs", "dtype differs", "E not divisible"):
                assert per_rank[0] is None  # one rank cannot disagree with itself
                continue
            assert per_rank[0] is not None, f"{name}: no error raised"
            assert all(p == per_rank[0] for p in per_rank), f"{name}: ranks raised different errors: {per_rank}"
            kind, msg = per_rank[0]
            assert kind == exc and text in msg, (name, kind, msg)
            assert f"rank {world - 1} of {world}" in msg, (name, msg)
