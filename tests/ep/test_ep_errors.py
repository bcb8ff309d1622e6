"""Bad input on one rank: every rank raises the same clear error, nothing hangs, the group stays usable."""

from __future__ import annotations

import pytest
import torch

from moekit.ep import Buffer
from moekit.ep.fp8 import quantize_1x128
from moekit.testing import spawn

from .checks import check_dispatch_combine, distinct_ranks
from .reference import Case, make_inputs, ref_combine, ref_dispatch


def _bad_rank(world: int) -> int:
    return min(1, world - 1)  # the rank that misbehaves


def _bad_cases(buf: Buffer, rank: int, world: int):
    """(name, expected exception type, expected text, callable) for each kind of bad input."""
    e = 2 * world
    case = Case([6] * world, 128, 2, e, "masked", seed=3)
    xs, idxs, ws = make_inputs(case, world)
    x, idx, w = xs[rank], idxs[rank], ws[rank]
    bad = rank == _bad_rank(world)
    ok = buf.dispatch(x, idx, w, e)
    ok_fp8 = buf.dispatch(quantize_1x128(x), idx, w, e)
    ok_no_w = buf.dispatch(x, idx, None, e)
    return [
        ("x 3-D", ValueError, "x must be 2-D", lambda: buf.dispatch(x[None] if bad else x, idx, w, e)),
        ("x int", TypeError, "got torch.int64", lambda: buf.dispatch(x.long() if bad else x, idx, w, e)),
        ("x not a tensor", TypeError, "x must be a tensor", lambda: buf.dispatch("x" if bad else x, idx, w, e)),
        ("idx int32", TypeError, "topk_idx must be int64, got torch.int32",
         lambda: buf.dispatch(x, idx.int() if bad else idx, w, e)),
        ("idx 1-D", ValueError, "topk_idx must be 2-D", lambda: buf.dispatch(x, idx[:, 0] if bad else idx, w, e)),
        ("idx too big", ValueError, f"topk_idx values must lie in [-1, num_experts={e}), found {e}",
         lambda: buf.dispatch(x, torch.full_like(idx, e) if bad else idx, w, e)),
        ("idx below -1", ValueError, "found -2",
         lambda: buf.dispatch(x, torch.full_like(idx, -2) if bad else idx, w, e)),
        ("weights shape", ValueError, "topk_weights must have the shape of topk_idx",
         lambda: buf.dispatch(x, idx, w[:, :1] if bad else w, e)),
        ("weights f64", TypeError, "topk_weights must be float32, got torch.float64",
         lambda: buf.dispatch(x, idx, w.double() if bad else w, e)),
        ("T mismatch", ValueError, "num_tokens differs between x (6) and topk_idx (5)",
         lambda: buf.dispatch(x, idx[:5] if bad else idx, w[:5] if bad else w, e)),
        ("E not divisible", ValueError, f"num_experts ({e + 1}) must be a positive multiple",
         lambda: buf.dispatch(x, idx, w, e + 1)),
        ("fp8 hidden", ValueError, "multiple of 128, got 100", lambda: buf.dispatch(x[:, :100], idx, w, e, fp8=True)),
        ("fp8 pair scales", ValueError, "scales of an FP8 pair",
         lambda: buf.dispatch((quantize_1x128(x)[0], quantize_1x128(x)[1][:, :0] if bad else quantize_1x128(x)[1]),
                              idx, w, e)),
        ("hidden differs", ValueError, "hidden size differs between ranks: rank 0 passes 128, it passes 64",
         lambda: buf.dispatch(x[:, :64] if bad else x, idx, w, e)),
        ("K differs", ValueError, "num_topk (K) differs between ranks: rank 0 passes 2, it passes 1",
         lambda: buf.dispatch(x, idx[:, :1] if bad else idx, w[:, :1] if bad else w, e)),
        ("alignment", ValueError, "expert_alignment must be >= 1, got 0",
         lambda: buf.dispatch(x, idx, w, e, expert_alignment=0 if bad else 1)),
        ("handle tokens", ValueError, "made for 6 tokens, x has 3",
         lambda: buf.dispatch(x[:3] if bad else x, None, None, None, handle=ok.handle)),
        ("handle routing", ValueError, "topk_idx sends tokens to other ranks than the handle's",
         lambda: buf.dispatch(x, torch.full_like(idx, -1) if bad else idx, w, e, handle=ok.handle)),
        ("combine rows", ValueError, "combine's x must have the handle's",
         lambda: buf.combine(ok.recv_x[:-1] if bad else ok.recv_x, ok.handle)),
        ("combine dtype", TypeError, "combine's x must be bfloat16, float16 or float32, got torch.int64",
         lambda: buf.combine(ok.recv_x.long() if bad else ok.recv_x, ok.handle)),
        ("combine hidden", ValueError, "dispatched hidden size 128, got 127",
         lambda: buf.combine(ok.recv_x[:, :127] if bad else ok.recv_x, ok.handle)),
        # Arguments that size the rows of a call without a counts exchange: each must match the handle.
        # The failing rank's zero rows take the handle's format whatever its x's dtype.
        ("combine rows, other dtype", ValueError, "combine's x must have the handle's",
         lambda: buf.combine(ok.recv_x[:-1].half() if bad else ok.recv_x, ok.handle)),
        ("combine 3-D, other dtype", ValueError, "combine's x must be 2-D",
         lambda: buf.combine(ok.recv_x[None].bfloat16() if bad else ok.recv_x, ok.handle,
                                    async_finish=True).event.wait()),
        ("handle tokens, other dtype", ValueError, "made for 6 tokens, x has 3",
         lambda: buf.dispatch(x[:3].half() if bad else x, None, None, None, handle=ok.handle)),
        ("handle hidden", ValueError, "made for hidden size 128, x has 64",
         lambda: buf.dispatch(x[:, :64] if bad else x, None, None, None, handle=ok.handle)),
        ("handle: pair on a float handle", ValueError, "a float dispatch",
         lambda: buf.dispatch(quantize_1x128(x) if bad else x, None, None, None, handle=ok.handle)),
        ("handle: fp8=True on a float handle", ValueError, "a float dispatch",
         lambda: buf.dispatch(x, None, None, None, fp8=bad, handle=ok.handle)),
        ("handle: float x on an FP8 handle", ValueError, "an FP8 dispatch",
         lambda: buf.dispatch(x.bfloat16() if bad else quantize_1x128(x), None, None, None, handle=ok_fp8.handle)),
        ("handle K", ValueError, "made for num_topk=2, topk_idx has 1",
         lambda: buf.dispatch(x, idx[:, :1] if bad else idx, w[:, :1] if bad else w, e, handle=ok.handle)),
        ("handle E", ValueError, f"made for num_experts={e}, got {2 * e}",
         lambda: buf.dispatch(x, idx, w, 2 * e if bad else e, handle=ok.handle)),
        ("handle weights", ValueError, "without topk_weights",
         lambda: buf.dispatch(x, idx, w if bad else None, e, handle=ok_no_w.handle)),
        ("weights without idx", ValueError, "may be None only with a handle",
         lambda: buf.dispatch(x, None, w if bad else None, None, handle=ok.handle)),
        ("handle idx range", ValueError, f"found {e}",
         lambda: buf.dispatch(x, torch.full_like(idx, e) if bad else idx, w, e, handle=ok.handle)),
        ("fp8 pair dtype differs", ValueError, "x dtype (bfloat16 for an FP8 pair) differs between ranks",
         lambda: buf.dispatch(quantize_1x128(x) if bad else x, idx, w, e, fp8=True)),
        # dequantize sizes the backward's rows (x travels back only when the FP8 rows were dequantized).
        ("dequantize differs", ValueError, "dequantize (with FP8 rows) differs between ranks: rank 0 passes 0, "
         "it passes 1", lambda: buf.dispatch(x, idx, w, e, fp8=True, dequantize=bad)),
    ]


def _mixed_dtypes(buf: Buffer, rank: int, world: int) -> None:
    """Valid float dtypes that differ between ranks in combine / cached dispatch: rows travel in the
    handle's dtype (converted), every rank gets its result in its own dtype, gradients too."""
    e = 2 * world
    case = Case([5 + r for r in range(world)], 24, 3, e, "masked", seed=61)
    xs, idxs, ws = make_inputs(case, world)
    odd = _bad_rank(world)
    d = buf.dispatch(xs[rank], idxs[rank], ws[rank], e)  # fp32 handle on every rank
    assert d.handle.x_dtype == torch.float32
    rows = [ref_dispatch(xs, idxs, ws, e, world, dest)[4] for dest in range(world)]
    # combine: the odd rank's expert output is bf16 (and needs a gradient).
    z = d.recv_x.sin()
    z_in = (z.bfloat16() if rank == odd else z).requires_grad_(True)
    y, _ = buf.combine(z_in, d.handle)
    assert y.dtype == z_in.dtype
    zs = [ref_dispatch(xs, idxs, ws, e, world, dest)[0].sin() for dest in range(world)]
    zs[odd] = zs[odd].bfloat16().float()  # what the odd rank sent, exactly (bf16 -> fp32 is exact)
    want = ref_combine(zs, rows, case.tokens, case.hidden)[rank]
    tol = 1e-2 if rank == odd else 1e-5
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)
    # Backward of combine = cached dispatch of the gradient, in the handle's dtype.
    g = torch.Generator().manual_seed(7)
    coefs = [torch.randn(t, case.hidden, generator=g) for t in case.tokens]
    (y.float() * coefs[rank]).sum().backward()
    sent = [c.to(torch.bfloat16).float() if s == odd else c for s, c in enumerate(coefs)]
    want_g = torch.stack([sent[s][t] for s, t in rows[rank]]) if rows[rank] else torch.zeros(0, case.hidden)
    assert z_in.grad.dtype == z_in.dtype
    torch.testing.assert_close(z_in.grad, want_g.to(z_in.dtype), rtol=0, atol=0)
    # Cached dispatch: the odd rank's x is fp16; the other ranks get its rows exactly (fp16 -> fp32),
    # it gets theirs in fp16. Only the odd rank passes topk_idx: it alone gets recv_topk_idx.
    x2 = [xs[s] * 3 + 1 for s in range(world)]
    mine = x2[rank].half() if rank == odd else x2[rank]
    again = buf.dispatch(mine, idxs[rank] if rank == odd else None, None, None, handle=d.handle)
    sent = [t.half().float() if s == odd else t for s, t in enumerate(x2)]
    want_x = torch.stack([sent[s][t] for s, t in rows[rank]]) if rows[rank] else torch.zeros(0, case.hidden)
    assert again.recv_x.dtype == mine.dtype
    torch.testing.assert_close(again.recv_x, want_x.to(mine.dtype), rtol=0, atol=0)
    if rank == odd:
        assert torch.equal(again.recv_topk_idx, d.recv_topk_idx) and again.recv_topk_weights is None
    else:
        assert again.recv_topk_idx is None
    # Backward where ranks track different inputs (x on the others, only topk_weights on the odd rank):
    # one row size for all (no hang); a gradient flows only between ranks that both track it.
    xg = xs[rank].clone().requires_grad_(rank != odd)
    wg = ws[rank].clone().requires_grad_(rank == odd)
    dg = buf.dispatch(xg, idxs[rank], wg, e)
    (dg.recv_x.sum() + dg.recv_topk_weights.sum()).backward()
    epr = e // world
    if rank == odd:  # weights gradients come from the odd rank itself only
        torch.testing.assert_close(wg.grad, ((idxs[rank] >= 0) & (idxs[rank] // epr == odd)).float())
    else:  # x gradients from the destination ranks that track recv_x: all but the odd one
        masked = torch.where(idxs[rank] // epr == odd, -1, idxs[rank])
        want_xg = distinct_ranks(masked, e, world).unsqueeze(1).expand_as(xg)
        torch.testing.assert_close(xg.grad, want_xg, rtol=0, atol=0)
    # After an FP8 dispatch of a pair the handle's dtype is bf16: an fp32 combine is converted to it.
    p = buf.dispatch(quantize_1x128(torch.randn(4, 128)), torch.full((4, 1), rank % e), None, e)
    assert p.handle.x_dtype == torch.bfloat16
    y2, _ = buf.combine(torch.ones(p.handle.num_recv_tokens, 128, dtype=torch.float32 if rank == odd
                                   else torch.bfloat16), p.handle)
    assert y2.dtype == (torch.float32 if rank == odd else torch.bfloat16) and bool((y2 == 1).all())


def _errors_rank(rank, world, hierarchical, rpn):
    buf = Buffer(ranks_per_node=rpn, hierarchical=hierarchical)
    _mixed_dtypes(buf, rank, world)
    check_dispatch_combine(buf, Case([4] * world, 16, 2, 2 * world, "masked", seed=60), rank, world)
    out = []
    for name, exc, text, call in _bad_cases(buf, rank, world):
        try:
            call()
            got = None
        except Exception as err:  # noqa: BLE001 - recorded and compared in the parent
            got = (type(err).__name__, str(err))
        out.append((name, exc.__name__, text, got))
        # The group is still usable: a valid call right after succeeds and is correct.
        check_dispatch_combine(buf, Case([4] * world, 16, 2, 2 * world, "masked", seed=len(out)), rank, world)
    # A handle from a Buffer of another node layout is refused locally (on every rank that passes it).
    other = Buffer(ranks_per_node=1, hierarchical=False) if world > 1 else buf
    if other is not buf:
        case = Case([4] * world, 16, 2, 2 * world, "masked", seed=99)
        xs, idxs, ws = make_inputs(case, world)
        h = other.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts).handle
        with pytest.raises(ValueError, match="made by a Buffer over another group, node layout or path"):
            buf.combine(torch.zeros(h.num_recv_tokens, 16), h)
    return out


@pytest.mark.parametrize("world, hierarchical, rpn", [(1, False, None), (2, False, None), (4, None, 2)])
def test_bad_input_on_one_rank(world, hierarchical, rpn):
    if world == 1:
        results = [_errors_rank(0, 1, hierarchical, rpn)]
    else:
        results = spawn(_errors_rank, world, hierarchical, rpn)
    for i, (name, exc, text, _) in enumerate(results[0]):
        if world == 1 and name in ("hidden differs", "K differs", "E not divisible", "fp8 pair dtype differs",
                                     "dequantize differs"):
            assert results[0][i][3] is None  # one rank cannot disagree with itself
            continue
        per_rank = [r[i][3] for r in results]
        assert per_rank[0] is not None, f"{name}: no error raised"
        assert all(p == per_rank[0] for p in per_rank), f"{name}: ranks raised different errors: {per_rank}"
        kind, msg = per_rank[0]
        assert kind == exc, (name, kind, msg)
        assert text in msg, (name, msg)
        if name not in ("E not divisible", "fp8 hidden"):
            assert f"rank {_bad_rank(world)} of {world}" in msg, (name, msg)


def test_every_status_code_has_a_message():
    """Each failing code renders (the lookup table of moekit.ep.errors covers them all) with its type."""
    from moekit.ep.errors import Code, _render

    for code in Code:
        if code == Code.OK:
            continue
        exc, msg = _render(code, 0, 1, 0)
        assert issubclass(exc, Exception) and msg, code
    with pytest.raises(AssertionError, match="unknown status code"):
        _render(Code.OK, 0, 0, 0)
