"""Fault injection: one misbehaving rank of four, every other rank healthy and calling as usual.

Each case returns, per rank, what it raised (type, message) and how long the failing call took;
``run_in_group`` then checks that the group is still usable with a valid dispatch + combine compared
against the reference (and, flat, a valid low-latency dispatch + combine). The cases that break the group
(a dead or absent peer) run in their own
``spawn`` (``run_peer``). Used by ``test_faults.py`` and ``bench/faults.py`` (the table of docs/ep.md).
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from ep.checks import check_dispatch_combine, check_grads
from ep.reference import Case, make_inputs
from moekit import MoEConfig
from moekit.ep import Buffer, PeerTimeout
from moekit.ep import autograd as autograd_mod
from moekit.ep import buffer as buffer_mod
from moekit.ep import low_latency as ll_mod
from moekit.moe import MoE

WORLD = 4
BAD = 2  # the misbehaving rank
TIMEOUT = 2.0  # the Buffer's timeout in the peer cases (seconds)


@dataclasses.dataclass(frozen=True)
class Fault:
    name: str
    what: str  # the fault, as docs/ep.md's table says it
    exc: str  # expected exception type on every rank
    text: str  # expected in the message
    names_rank: bool = True  # the message names the bad rank


@contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("injected: cannot allocate 8.00 GiB")


def _cases(buf: Buffer, rank: int, world: int, two_stage: bool, bad_rank: int = BAD):
    """(Fault, call) pairs; ``call()`` runs the faulty call on this rank (bad only on ``bad_rank``)."""
    e = 2 * world
    case = Case([6] * world, 128, 2, e, "masked", seed=5)
    xs, idxs, ws = make_inputs(case, world)
    x, idx, w = xs[rank], idxs[rank], ws[rank]
    bad = rank == bad_rank
    first = buf.dispatch(x, idx, w, e)  # an earlier call's handle
    cur = buf.dispatch(x, idx, w, e)
    ll = buf.low_latency_dispatch(x.bfloat16(), idx, 8, e, use_fp8=False)
    other = Buffer(ranks_per_node=1, hierarchical=False).dispatch(x, idx, w, e)  # another layout's handle
    meta_x = torch.empty(6, 128, device="meta")
    lay = buf.get_dispatch_layout(idx, e)
    cases = [
        (Fault("huge num_experts", "`num_experts` = 2**40 (an allocation would fail)", "ValueError",
               "num_experts (1099511627776) must be < 2**31"),
         lambda: buf.dispatch(x, idx, w, 2**40 if bad else e)),
        (Fault("numpy num_experts, not divisible", "`num_experts` a numpy int not divisible by R", "ValueError",
               f"num_experts ({e + 1}) must be a positive multiple"),
         lambda: buf.dispatch(x, idx, w, np.int64(e + 1) if bad else e)),
        (Fault("x on meta", "`x` on the meta device", "ValueError", "x must be a dense (strided) tensor with data, "
               "got a tensor on the meta device"),
         lambda: buf.dispatch(meta_x if bad else x, idx, w, e)),
        (Fault("topk_idx on meta", "`topk_idx` on the meta device", "ValueError", "topk_idx must be a dense"),
         lambda: buf.dispatch(x, idx.to("meta") if bad else idx, w, e)),
        (Fault("sparse x", "sparse `x`", "ValueError", "x must be a dense (strided) tensor with data, got a sparse"),
         lambda: buf.dispatch(x.to_sparse() if bad else x, idx, w, e)),
        (Fault("sparse topk_idx", "sparse `topk_idx`", "ValueError", "topk_idx must be a dense"),
         lambda: buf.dispatch(x, idx.to_sparse() if bad else idx, w, e)),
        (Fault("allocation fails", "an allocation fails while a rank prepares its part (injected OOM)",
               "MemoryError", "OutOfMemoryError: injected: cannot allocate"),
         lambda: _with_oom(bad, lambda: buf.dispatch(x, idx, w, e))),
        (Fault("layout on meta", "layout-driven `dispatch` with `is_token_in_rank` on the meta device", "ValueError",
               "is_token_in_rank must be a torch.bool tensor"),
         lambda: buf.dispatch(x, None, None, e, is_token_in_rank=lay.is_token_in_rank.to("meta") if bad
                              else lay.is_token_in_rank, num_tokens_per_expert=lay.num_tokens_per_expert)),
        (Fault("combine(x, None)", "`combine(x, None)`", "TypeError", "handle must be a DispatchHandle"),
         lambda: buf.combine(cur.recv_x, None if bad else cur.handle)),
        (Fault("combine, low-latency handle", "`combine` with a low-latency handle", "TypeError",
               "got a LowLatencyHandle"),
         lambda: buf.combine(cur.recv_x, ll.handle if bad else cur.handle)),
        (Fault("low_latency_combine, normal handle", "`low_latency_combine` with a normal handle", "TypeError",
               "handle must be a LowLatencyHandle"),
         lambda: buf.low_latency_combine(ll.recv_x, idx, w, cur.handle if bad else ll.handle)),
        (Fault("stale handle, combine", "`combine` with the handle of an earlier dispatch", "ValueError",
               "a stale handle"),
         lambda: buf.combine(first.recv_x if bad else cur.recv_x, first.handle if bad else cur.handle)),
        (Fault("stale handle, cached dispatch", "cached `dispatch` with the handle of an earlier dispatch",
               "ValueError", "a stale handle"),
         lambda: buf.dispatch(x, None, None, None, handle=first.handle if bad else cur.handle)),
        (Fault("cached dispatch on one rank", "a cached `dispatch` (handle) on one rank, a fresh one on the others",
               "ValueError", "ranks call different methods"),
         lambda: buf.dispatch(x, idx, w, e, handle=cur.handle if bad else None)),
        (Fault("foreign handle", "`combine` with the handle of a Buffer over another node layout", "ValueError",
               "made by a Buffer over another group, node layout or path"),
         lambda: buf.combine(other.recv_x if bad else cur.recv_x, other.handle if bad else cur.handle)),
        (Fault("combine vs dispatch", "`combine` on one rank, `dispatch` on the others", "ValueError",
               "ranks call different methods"),
         lambda: buf.combine(cur.recv_x, cur.handle) if bad else buf.dispatch(x, idx, w, e)),
        (Fault("ll dispatch, allocation fails", "`low_latency_dispatch`: an allocation fails while a rank "
               "prepares its block (injected OOM in its FP8 cast)", "MemoryError",
               "OutOfMemoryError: injected: cannot allocate"),
         lambda: _with_oom(bad, lambda: buf.low_latency_dispatch(x, idx, 8, e), ll_mod, "quantize_1x128")),
        (Fault("ll combine, allocation fails", "`low_latency_combine`: an allocation fails while a rank "
               "prepares its block (injected OOM)", "MemoryError", "OutOfMemoryError: injected: cannot allocate"),
         lambda: _with_oom(bad, lambda: buf.low_latency_combine(ll.recv_x, idx, w, ll.handle), ll_mod,
                           "_combine_block")),
        (Fault("ll combine, sparse x", "`low_latency_combine` with a sparse `x` (torch raises while the rank "
               "builds its block)", "NotImplementedError", "raised while preparing its part of the call: "
               "NotImplementedError: Could not run 'aten::gather'"),
         lambda: buf.low_latency_combine(ll.recv_x.to_sparse() if bad else ll.recv_x, idx, w, ll.handle)),
        (Fault("ll dispatch vs dispatch", "`low_latency_dispatch` on one rank, `dispatch` on the others",
               "ValueError", "ranks call different methods"),
         lambda: buf.low_latency_dispatch(x, idx, 8, e, use_fp8=False) if bad else buf.dispatch(x, idx, w, e)),
        (Fault("dispatch vs ll dispatch", "`dispatch` on one rank, `low_latency_dispatch` on the others",
               "ValueError", "ranks call different methods"),
         lambda: buf.dispatch(x, idx, w, e) if bad else buf.low_latency_dispatch(x, idx, 8, e, use_fp8=False)),
    ]
    if two_stage:  # the same faults on the node-aware path are in the flat list already; keep the stale one
        cases = [c for c in cases if c[0].name.startswith("stale") or c[0].name == "combine(x, None)"]
    return cases + _backward_cases(buf, x, idx, w, e, bad)


def _backward_cases(buf: Buffer, x, idx, w, e: int, bad: bool):
    """Faults inside a backward pass: a gradient of the wrong shape or dtype reaching the backward exchange
    of one rank (``Backward``, as a custom autograd Function would pass it), an exception while a rank
    prepares its backward rows (injected OOM during ``loss.backward()``)."""
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    d = buf.dispatch(xg, idx, wg, e)
    m = d.recv_x.shape[0]

    def backward_oom():
        xb = x.clone().requires_grad_(True)
        out = buf.dispatch(xb, idx, w, e)
        y, _ = buf.combine(out.recv_x.tanh(), out.handle)
        _with_oom(bad, lambda: y.sum().backward(), autograd_mod, "_check_grad")

    return [
        (Fault("backward, gradient shape", "a gradient of the wrong shape reaching the dispatch's backward "
               "exchange (`Backward.combine_grads`)", "ValueError",
               "the gradient of recv_x must be a floating point ["),
         lambda: buf._backward.combine_grads(d.handle, torch.ones(m + 1 if bad else m, x.shape[1]), None, x.dtype)),
        (Fault("backward, gradient dtype", "an int64 gradient reaching the combine's backward exchange "
               "(`Backward.dispatch_grads`)", "ValueError", "the gradient of combined_x must be a floating point"),
         lambda: buf._backward.dispatch_grads(d.handle, torch.ones(x.shape, dtype=torch.int64 if bad else x.dtype))),
        (Fault("backward, allocation fails", "an allocation fails while a rank prepares its backward rows "
               "(injected OOM in `loss.backward()`)", "MemoryError", "OutOfMemoryError: injected: cannot allocate"),
         backward_oom),
    ]


def _with_oom(bad: bool, call, module=buffer_mod, name="tokens_per_expert"):
    if not bad:
        return call()
    with _patched(module, name, _oom):
        return call()


def check_low_latency(buf: Buffer, case: Case, rank: int, world: int) -> None:
    """A valid low-latency dispatch + combine (no FP8) against a plain reference: the received rows of each
    local expert (source rank, then token order) and counts, and combine(identity) = Σ_k w[t, k] x[t]."""
    xs, idxs, ws = make_inputs(case, world)
    xs = [x.bfloat16() for x in xs]
    e, t_max = case.num_experts, max(x.shape[0] for x in xs)
    l = e // world
    out = buf.low_latency_dispatch(xs[rank], idxs[rank], t_max, e, use_fp8=False)
    for j in range(l):
        ex = rank * l + j
        want = [xs[s][t] for s in range(world) for t in range(xs[s].shape[0]) if ex in idxs[s][t].tolist()]
        n = len(want)
        assert int(out.recv_count[j]) == n, (j, int(out.recv_count[j]), n)
        if n:
            assert torch.equal(out.recv_x[j, :n], torch.stack(want)), f"low-latency recv_x of expert {ex} differs"
        assert not out.recv_x[j, n:].any()
    y = buf.low_latency_combine(out.recv_x, idxs[rank], ws[rank], out.handle).combined_x
    w = torch.where(idxs[rank] >= 0, ws[rank], 0.0).sum(1, keepdim=True)
    torch.testing.assert_close(y.float(), xs[rank].float() * w, rtol=2e-2, atol=2e-2)


def _outcome(call):
    t0 = time.perf_counter()
    try:
        call()
        got = None
    except Exception as err:  # noqa: BLE001 - compared in the parent
        got = (type(err).__name__, str(err))
    return got, time.perf_counter() - t0


def run_in_group(rank: int, world: int, two_stage: bool = False, bad_rank: int = BAD) -> list:
    """Every in-group case on this rank: ``[(Fault, outcome, seconds, reusable)]``; ``bad_rank`` misbehaves
    (the MoE layer's cases always use BAD)."""
    buf = Buffer(ranks_per_node=2 if two_stage else None, hierarchical=two_stage, timeout=60.0)
    out = []
    for i, (fault, call) in enumerate(_cases(buf, rank, world, two_stage, bad_rank)):
        got, dt = _outcome(call)
        check_dispatch_combine(buf, Case([4] * world, 16, 2, 2 * world, "masked", seed=40 + i), rank, world)
        if not two_stage:
            check_low_latency(buf, Case([4] * world, 16, 2, 2 * world, "masked", seed=70 + i), rank, world)
        if fault.name.startswith("backward"):
            check_grads(buf, Case([4] * world, 16, 2, 2 * world, "masked", seed=80 + i), rank, world)
        out.append((fault, got, dt, True))
    for fault, call in _layer_cases(rank, world) if bad_rank == BAD else ():
        got, dt = _outcome(call)
        out.append((fault, got, dt, True))
    return out


def _layer_cases(rank: int, world: int):
    """Faults of the MoE layer: its shape check and load_state_dict on one rank. Reuse: a valid forward."""
    cfg = MoEConfig.preset("tiny", n_routed_experts=8, n_group=1, topk_group=1)
    torch.manual_seed(0)
    moe = MoE(cfg, timeout=60.0)
    bad = rank == BAD

    def forward_65():
        h = cfg.hidden_size + (1 if bad else 0)
        try:
            moe(torch.randn(2, 3, h))
        finally:
            moe(torch.randn(2, 3, cfg.hidden_size))  # the group is still usable

    def load_bad():
        sd = moe.full_state_dict()
        if bad:
            sd["gate.weight"] = torch.zeros(cfg.n_routed_experts, cfg.hidden_size + 1)
        try:
            moe.load_state_dict(sd)
        finally:
            moe.load_state_dict(moe.full_state_dict())
            moe(torch.randn(5, cfg.hidden_size))

    return [
        (Fault("MoE hidden 65", "`MoE` forward with hidden 65 instead of 64", "ValueError",
               "MoE: hidden_states must be [..., hidden_size=64], got a 3-D tensor ending in 65"), forward_65),
        (Fault("MoE load_state_dict", "`MoE.load_state_dict` with a wrong shape", "ValueError",
               "size mismatch for gate.weight: copying a param with shape [8, 65]"), load_bad),
    ]


PEER_FAULTS = {
    "dead": Fault("dead peer", "a rank exits (process gone) before a `dispatch`", "PeerTimeout",
                  f"rank(s) [{BAD}] did not arrive: a peer's connection closed"),
    "absent": Fault("absent peer", "a rank is alive but never calls `combine`", "PeerTimeout",
                    f"rank(s) [{BAD}] did not arrive"),
    "no backward": Fault("skipped backward", "a rank skips the `MoE` backward (others run it)", "PeerTimeout",
                         f"rank(s) [{BAD}] did not arrive"),
}


def run_peer(rank: int, world: int, mode: str, timeout: float = TIMEOUT):
    """A dead or absent peer: ``(outcome, seconds, the next call refused at once)`` on the healthy ranks."""
    if mode == "no backward":
        cfg = MoEConfig.preset("tiny", n_routed_experts=8, n_group=1, topk_group=1)
        moe = MoE(cfg, timeout=timeout)
        y = moe(torch.randn(6, cfg.hidden_size, requires_grad=True))
        if rank == BAD:
            time.sleep(timeout * 2 + 1)  # past the peers' timeout and grace
            return None
        got, dt = _outcome(lambda: y.sum().backward())
        buf = moe.buffer
    else:
        buf = Buffer(timeout=timeout)
        case = Case([6] * world, 32, 2, 2 * world, "masked", seed=9)
        xs, idxs, ws = make_inputs(case, world)
        d = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
        if rank == BAD:
            if mode == "dead":
                os._exit(0)
            time.sleep(timeout * 2 + 1)  # alive, busy elsewhere, past the peers' timeout and grace
            return None
        if mode == "dead":
            got, dt = _outcome(lambda: buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts))
        else:
            got, dt = _outcome(lambda: buf.combine(d.recv_x, d.handle))
    t0 = time.perf_counter()
    again, _ = _outcome(lambda: buf.combine(torch.zeros(1, 1), None))
    refused = again is not None and again[0] == PeerTimeout.__name__ and time.perf_counter() - t0 < 1.0
    return got, dt, refused
