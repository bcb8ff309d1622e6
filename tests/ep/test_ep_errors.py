"""Bad input on one rank: every rank raises the same clear error, nothing hangs, the group stays usable."""

from __future__ import annotations

import pytest
import torch

from moekit.ep import Buffer
from moekit.ep.fp8 import quantize_1x128
from moekit.testing import spawn

from .checks import check_dispatch_combine
from .reference import Case, make_inputs


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
    ]


def _errors_rank(rank, world, hierarchical, rpn):
    buf = Buffer(ranks_per_node=rpn, hierarchical=hierarchical)
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
        if world == 1 and name in ("hidden differs", "K differs", "E not divisible"):
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
