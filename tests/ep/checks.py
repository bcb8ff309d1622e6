"""Per-rank checks shared by the multi-rank tests (run inside spawned ranks)."""

from __future__ import annotations

import torch

from moekit.ep.fp8 import dequantize_1x128, quantize_1x128

from .reference import Case, inter_node_bytes, make_inputs, ref_combine, ref_dispatch, row_bytes


def distinct_ranks(idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    epr = num_experts // num_ranks
    return torch.tensor([len({int(e) // epr for e in row if int(e) >= 0}) for row in idx], dtype=torch.float32)


def check_dispatch_combine(buf, case: Case, rank: int, world: int, *, alignment: int = 1,
                           async_finish: bool = False) -> dict:
    """dispatch equals the reference exactly; combine(identity) = x * distinct destination ranks; bytes."""
    xs, idxs, ws = make_inputs(case, world)
    out = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts, expert_alignment=alignment,
                       async_finish=async_finish)
    out.event.wait()
    dispatch_traffic = buf.stats.last
    rx, ridx, rw, counts, _ = ref_dispatch(xs, idxs, ws, case.num_experts, world, rank)
    assert torch.equal(out.recv_x, rx), "recv_x differs from the reference"
    assert torch.equal(out.recv_topk_idx, ridx), "recv_topk_idx differs"
    assert torch.equal(out.recv_topk_weights, rw), "recv_topk_weights differs"
    assert out.num_recv_tokens_per_expert_list == [(c + alignment - 1) // alignment * alignment for c in counts]
    y, ev = buf.combine(out.recv_x, out.handle, async_finish=async_finish)
    ev.wait()
    want = xs[rank].float() * distinct_ranks(idxs[rank], case.num_experts, world).unsqueeze(1)
    tol = 1e-6 if case.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)
    assert y.dtype == case.dtype
    rb = row_bytes(case.hidden, xs[0].element_size(), case.topk)
    per = "node" if buf.hierarchical else "rank"
    g = buf.node_layout.ranks_per_node
    assert dispatch_traffic.inter_node_bytes == inter_node_bytes(idxs[rank], case.num_experts, world, g, rank, rb,
                                                                 per)
    return {"recv": out.recv_x.shape[0], "inter": dispatch_traffic.inter_node_bytes}


def check_grads(buf, case: Case, rank: int, world: int) -> None:
    """Gradients of x and topk_weights through dispatch → (nonlinear expert) → combine, vs float64 autograd."""
    xs, idxs, ws = make_inputs(case, world)
    g = torch.Generator().manual_seed(case.seed + 1)
    coef = [torch.randn(t, case.hidden, generator=g) for t in case.tokens]
    x = xs[rank].clone().requires_grad_(True)
    w = ws[rank].clone().requires_grad_(True)
    out = buf.dispatch(x, idxs[rank], w, case.num_experts)
    z = out.recv_x.tanh() * (1 + out.recv_topk_weights.sum(1, keepdim=True))
    y, _ = buf.combine(z, out.handle)
    loss = (y * coef[rank]).sum() + (out.recv_topk_weights ** 2).sum() + out.recv_x.sum()
    loss.backward()

    rxs = [t.double().requires_grad_(True) for t in xs]
    rws = [t.double().requires_grad_(True) for t in ws]
    zs, rows, total = [], [], 0.0
    for d in range(world):
        rx, _, rw, _, rr = ref_dispatch(rxs, idxs, rws, case.num_experts, world, d)
        zs.append(rx.tanh() * (1 + rw.sum(1, keepdim=True)))
        rows.append(rr)
        total = total + (rw ** 2).sum() + rx.sum()
    ys = ref_combine(zs, rows, case.tokens, case.hidden)
    total = total + sum((ys[s] * coef[s].double()).sum() for s in range(world))
    total.backward()
    torch.testing.assert_close(x.grad.double(), rxs[rank].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), rws[rank].grad, rtol=1e-5, atol=1e-5)


def check_fp8(buf, case: Case, rank: int, world: int) -> None:
    """fp8=True: the received pair dequantizes to x within the e4m3 error; a pair input passes through exactly."""
    xs, idxs, ws = make_inputs(case, world)
    out = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts, fp8=True)
    data, scales = out.recv_x
    assert data.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    rx, ridx, _, _, _ = ref_dispatch(xs, idxs, ws, case.num_experts, world, rank)
    deq = dequantize_1x128(data, scales)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the tile's max.
    tile_max = rx.float().abs().reshape(rx.shape[0], -1, 128).amax(2).repeat_interleave(128, 1) if len(rx) else rx
    assert bool((deq - rx.float()).abs().le(tile_max * 2 ** -4 + 1e-6).all())
    assert torch.equal(out.recv_topk_idx, ridx)
    # Pair in → the same bytes out, and the stats count the FP8 row size.
    pair = quantize_1x128(xs[rank])
    out3 = buf.dispatch(pair, idxs[rank], ws[rank], case.num_experts)
    assert torch.equal(out3.recv_x[0].view(torch.uint8), data.view(torch.uint8))
    assert torch.equal(out3.recv_x[1], scales)
    rb = row_bytes(case.hidden, 1, case.topk, fp8=True)
    per = "node" if buf.hierarchical else "rank"
    assert buf.stats.last.inter_node_bytes == inter_node_bytes(idxs[rank], case.num_experts, world,
                                                               buf.node_layout.ranks_per_node, rank, rb, per)
    # Combine after an FP8 dispatch runs in bf16.
    y, _ = buf.combine(deq.to(torch.bfloat16), out3.handle)
    assert y.dtype == torch.bfloat16


def check_handle_reuse(buf, case: Case, rank: int, world: int) -> None:
    """A handle's layout serves a second dispatch of other data without a counts exchange."""
    xs, idxs, ws = make_inputs(case, world)
    out = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    x2 = xs[rank] * 3 + 1
    again = buf.dispatch(x2, None, None, None, handle=out.handle)
    assert again.recv_topk_idx is None and again.recv_topk_weights is None
    torch.testing.assert_close(again.recv_x, out.recv_x * 3 + 1)
    w2 = ws[rank] * 2
    third = buf.dispatch(x2, idxs[rank], w2, case.num_experts, handle=out.handle)
    torch.testing.assert_close(third.recv_topk_weights, out.recv_topk_weights * 2)
    assert torch.equal(third.recv_topk_idx, out.recv_topk_idx)
    assert third.num_recv_tokens_per_expert_list == out.num_recv_tokens_per_expert_list


def check_async_overlap(buf, case: Case, rank: int, world: int) -> None:
    """async_finish: results match the synchronous ones once the event completes; autograd still works."""
    xs, idxs, ws = make_inputs(case, world)
    sync = buf.dispatch(xs[rank], idxs[rank], ws[rank], case.num_experts)
    x = xs[rank].clone().requires_grad_(True)
    out = buf.dispatch(x, idxs[rank], ws[rank], case.num_experts, async_finish=True)
    busy = torch.randn(64, 64) @ torch.randn(64, 64)  # compute while rows travel
    out.event.current_stream_wait()
    assert torch.equal(out.recv_x, sync.recv_x) and torch.equal(out.recv_topk_idx, sync.recv_topk_idx)
    y, ev = buf.combine(out.recv_x * 2, out.handle, async_finish=True)
    ev.wait()
    ev.wait()  # idempotent
    y.sum().backward()
    want = 2 * distinct_ranks(idxs[rank], case.num_experts, world)
    torch.testing.assert_close(x.grad, want.unsqueeze(1).expand_as(x).contiguous())
    del busy
