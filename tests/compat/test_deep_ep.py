"""``moekit.compat.deep_ep`` exercised the way DeepEP's legacy tests exercise ``deep_ep.Buffer``, against
plain references of DeepEP's documented semantics: rank-identifying rows, the reference layout, cached
dispatch, with and without top-k, FP8 and BF16, ``num_worst_tokens``, combine ≈ x × ranks reached
(+ bias, + weights), low-latency per-expert layout and weighted combine, hook and async paths; on 2 and
4 gloo ranks and on 2 "nodes" x 2. Plus DeepEP's public signatures and the errors of what cannot work.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from deep_ep_reference import dequant, fp8_pair, inputs, layout, received

import moekit.compat.deep_ep as deep_ep
from moekit.ep.fp8 import unpack_ue8m0
from moekit.testing import spawn

NVL_BYTES, RDMA_BYTES = int(2e9) // 128 * 128, int(1e9) // 128 * 128


def _normal_rank(rank, world, ranks_per_node):
    buffer = deep_ep.Buffer(dist.group.WORLD, NVL_BYTES, RDMA_BYTES)
    hidden, topk, experts = 256, 3, 4 * world
    tokens = [9 + 3 * r for r in range(world)]
    tokens[-1] = 0 if world == 4 else tokens[-1]  # an empty rank
    all_in = inputs(100 + world, world, tokens, hidden, topk, experts)
    x_rand, x_rank, topk_idx, w_rand = all_in[rank]
    internode = ranks_per_node < world

    # Layout vs the loop reference; DeepEP's dtypes.
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    want = layout(topk_idx, experts, world, ranks_per_node)
    assert per_rank.dtype == per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool
    assert torch.equal(per_rank, want[0]) and torch.equal(per_expert, want[2]) and torch.equal(in_rank, want[3])
    assert (per_node is None) if not internode else torch.equal(per_node, want[1])
    reached = in_rank.sum(1, keepdim=True).float()  # [T, 1] ranks each token reaches

    w_rank = torch.full_like(w_rand, float(rank))
    x_fp8 = fp8_pair(x_rank)
    checked = 0
    for async_mode, previous in ((False, False), (True, True)):
        for which, x in ((0, x_rand), (1, x_rank), (1, x_fp8)):
            for with_topk in (False, True):
                args = dict(x=x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                            config=deep_ep.Config(24, 8, 256, 16, 128), async_finish=async_mode)
                weights = w_rand if which == 0 else w_rank
                if with_topk:
                    args.update(topk_idx=topk_idx, topk_weights=weights)
                if previous:
                    args.update(previous_event=buffer.capture())
                recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(**args)
                if async_mode:
                    event.current_stream_wait()
                ref_inputs = [(a[0], a[1], a[2], a[3] if which == 0 else torch.full_like(a[3], float(s)))
                              for s, a in enumerate(all_in)]
                rx, ridx, rw, per_src, ref_counts = received(ref_inputs, which, experts, world, rank, with_topk)
                is_pair = isinstance(recv_x, tuple)
                got_x = dequant(*recv_x) if is_pair else recv_x.float()
                if is_pair:  # the pair travels as it is: exactly the sender's e4m3 bytes and scales
                    rx = dequant(*fp8_pair(rx))
                assert torch.equal(got_x, rx.float()), (which, is_pair)
                assert counts == ref_counts
                # Rank-identifying rows: the handle's prefix sums say where each source's rows are.
                prefix = (handle[0][:, rank] if not internode else handle[-4]).tolist()
                assert prefix == torch.tensor(per_src).cumsum(0).tolist()
                if which == 1:
                    start = 0
                    for src, end in enumerate(prefix):
                        assert torch.all(got_x[start:end] == src)
                        start = end
                if with_topk:
                    assert torch.equal(recv_idx, ridx) and torch.equal(recv_w, rw)
                    # num_worst_tokens: fixed-size outputs, the same rows first, -1 after them.
                    worst = sum(tokens)
                    wx, widx, ww, empty, _, ev = buffer.dispatch(**args, num_worst_tokens=worst)
                    if async_mode:
                        ev.current_stream_wait()
                    wx0 = wx[0] if is_pair else wx
                    assert empty == [] and wx0.shape[0] == widx.shape[0] == ww.shape[0] == worst
                    m = rx.shape[0]
                    assert torch.equal(wx0[:m], recv_x[0] if is_pair else recv_x)
                    assert torch.equal(widx[:m], recv_idx) and torch.equal(ww[:m], recv_w)
                    assert torch.all(widx[m:] == -1)
                else:
                    assert recv_idx is None and recv_w is None
                    cargs = dict(x=x, handle=handle, async_finish=async_mode)
                    if previous:
                        cargs.update(previous_event=buffer.capture())
                    cx, *nones, ev = buffer.dispatch(**cargs)  # cached: same rows, no top-k
                    if async_mode:
                        ev.current_stream_wait()
                    assert nones == [None] * 4
                    assert torch.equal(dequant(*cx) if is_pair else cx.float(), got_x)
                    # DeepEP's tuning loops reuse a handle with the other format (FP8 <-> BF16).
                    other = x_rank if is_pair else x_fp8
                    ox, *_, ev = buffer.dispatch(x=other, handle=handle, async_finish=async_mode)
                    if async_mode:
                        ev.current_stream_wait()
                    want_x = received(ref_inputs, 1, experts, world, rank, False)[0].float()
                    want_x = dequant(*fp8_pair(want_x)) if not is_pair else want_x
                    assert torch.equal(dequant(*ox) if not is_pair else ox.float(), want_x)

                # Combine: the plain sum over the ranks the token reached (+ two biases), weights likewise.
                combine_in = got_x.bfloat16()
                bias = (torch.ones(tokens[rank], hidden).bfloat16(), x_rand)
                cargs = dict(x=combine_in, handle=handle, bias=bias, async_finish=async_mode)
                if with_topk:
                    cargs.update(topk_weights=recv_w)
                combined, combined_w, ev = buffer.combine(**cargs)
                if async_mode:
                    ev.current_stream_wait()
                ref_x = dequant(*x_fp8) if is_pair else x.float()
                ref = ref_x * reached + bias[0].float() + bias[1].float()
                torch.testing.assert_close(combined.float(), ref.bfloat16().float(), rtol=1e-2, atol=1e-2)
                if with_topk:
                    torch.testing.assert_close(combined_w, torch.where(topk_idx >= 0, weights, 0.0),
                                               rtol=0, atol=0)
                else:
                    assert combined_w is None
                checked += 1
    return checked


@pytest.mark.parametrize("world, ranks_per_node", [(2, 2), (4, 4), (4, 2)])
def test_normal_mode_like_deepep_tests(world, ranks_per_node):
    assert spawn(_normal_rank, world, ranks_per_node, ranks_per_node=ranks_per_node) == [12] * world


def _low_latency_rank(rank, world):
    hidden, topk, experts, cap = 512, 3, 2 * world, 8
    local = experts // world
    need = deep_ep.Buffer.get_low_latency_rdma_size_hint(cap, hidden, world, experts)
    buffer = deep_ep.Buffer(dist.group.WORLD, 0, need, low_latency_mode=True, num_qps_per_rank=local)
    tokens = [cap - r for r in range(world)]
    all_in = inputs(7 + world, world, tokens, hidden, topk, experts)
    _, _, topk_idx, _ = all_in[rank]
    topk_w = torch.rand(tokens[rank], topk)
    # DeepEP's rank-identifying input: the rank (offset) everywhere, the token index in the last 128 columns.
    xs = []
    for s, t in enumerate(tokens):
        x = torch.full((t, hidden), float(s - 2)).bfloat16()
        x[:, -128:] = torch.arange(t).float().view(-1, 1).bfloat16()
        xs.append(x)
    x = xs[rank]
    modes = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    for hook_mode in (False, True):
        for use_fp8, round_scale, use_ue8m0 in modes:
            stats = torch.zeros(local, dtype=torch.int32)
            packed, count, handle, event, hook = buffer.low_latency_dispatch(
                x, topk_idx, cap, experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
                round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=not hook_mode,
                return_recv_hook=hook_mode)
            hook() if hook_mode else event.current_stream_wait()
            assert count.dtype == torch.int32 and torch.equal(stats, count)
            if use_fp8:
                data, scales = packed
                assert scales.stride()[1:] == (1, world * cap)  # column-major in the last two dims
                if use_ue8m0:
                    assert scales.dtype == torch.int32 and scales.shape[-1] == hidden // 512
                    scales = unpack_ue8m0(scales)
                rows = dequant(data, scales)
            else:
                rows = packed.float()
            for e in range(local):
                expert = rank * local + e
                want = [(s, i) for s in range(world) for i in range(tokens[s])
                        if expert in all_in[s][2][i].tolist()]
                n = int(count[e])
                assert n == len(want)
                ref = torch.stack([xs[s][i].float() for s, i in want]) if want else torch.zeros(0, hidden)
                if use_fp8:  # plain amax/448 or power-of-two scales, as the sender quantized them
                    from moekit.kernels import per_token_group_quant
                    q = per_token_group_quant(ref, 128, scale_fmt="ue8m0" if round_scale else None)
                    ref = dequant(*q)
                assert torch.equal(rows[e, :n], ref)
                assert torch.all(packed[0][e, n:].float() == 0) if use_fp8 else torch.all(packed[e, n:] == 0)
                begin, cnt = handle[1][e] >> 32, handle[1][e] & (2 ** 32 - 1)
                per_src = [sum(1 for s2, _ in want if s2 == s) for s in range(world)]
                assert cnt.tolist() == per_src and begin.tolist() == (torch.tensor(per_src).cumsum(0)
                                                                       - torch.tensor(per_src)).tolist()
                # DeepEP's check of handle[0] (recv_src_info): each source's range holds that source's token
                # indices, in token order, matching the index its rows carry in the last 128 columns.
                src_info = handle[0][e]
                assert src_info.dtype == torch.int32 and src_info.shape == (world * cap,)
                assert src_info[:n].tolist() == [i for _, i in want]
                if not use_fp8:  # (FP8 rounds the carried index; the exact list above covers it)
                    for s in range(world):
                        b, k = int(begin[s]), int(cnt[s])
                        assert torch.equal(rows[e, b:b + k, -128:].amin(-1), src_info[b:b + k].float())
            # Weighted combine of the received rows: Σ_k w·x (masked entries add nothing); zero-copy and out=.
            sim = rows.bfloat16()
            for zero_copy in (False, True):
                if zero_copy:
                    buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = sim
                out = torch.empty(tokens[rank], hidden, dtype=torch.bfloat16)
                combined, event, hook = buffer.low_latency_combine(
                    sim if not zero_copy else torch.zeros_like(sim), topk_idx, topk_w, handle, zero_copy=zero_copy,
                    async_finish=not hook_mode, return_recv_hook=hook_mode, out=out)
                hook() if hook_mode else event.current_stream_wait()
                assert combined is out
                sent = dequant(*fp8_pair(x.float())) if use_fp8 and not round_scale else x.float()
                if use_fp8 and round_scale:
                    from moekit.kernels import per_token_group_quant
                    sent = dequant(*per_token_group_quant(x.float(), 128, scale_fmt="ue8m0"))
                want = sent.bfloat16().float() * torch.where(topk_idx >= 0, topk_w, 0.0).sum(1, keepdim=True)
                torch.testing.assert_close(combined.float(), want, rtol=1e-2, atol=1e-2)
    buffer.clean_low_latency_buffer(cap, hidden, experts)
    return True


@pytest.mark.parametrize("world, ranks_per_node", [(2, 2), (4, 2)])
def test_low_latency_like_deepep_tests(world, ranks_per_node):
    assert all(spawn(_low_latency_rank, world, ranks_per_node=ranks_per_node))


def _errors_rank(rank, world):
    buffer = deep_ep.Buffer(dist.group.WORLD, NVL_BYTES, 0, explicitly_destroy=True)
    hidden, topk, experts = 128, 2, 4
    x_rand, _, idx, w = inputs(3, world, [6, 6], hidden, topk, experts)[rank]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
    lay = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    msgs = []

    def expect(fn, exc=ValueError):
        with pytest.raises(exc) as info:
            fn()
        msgs.append(str(info.value))

    # Collective: one rank's bad argument, the same error on every rank (no hang).
    bad_in_rank = in_rank.int() if rank == 1 else in_rank
    expect(lambda: buffer.dispatch(x_rand, **{**lay, "is_token_in_rank": bad_in_rank}))
    expect(lambda: buffer.dispatch(x_rand, **lay, topk_idx=idx, num_worst_tokens=1 if rank == 0 else 100))
    out = buffer.dispatch(x_rand, **lay, topk_idx=idx, topk_weights=w)
    bad_bias = torch.ones(5, hidden).bfloat16() if rank == 0 else torch.ones(6, hidden).bfloat16()
    expect(lambda: buffer.combine(out[0], out[4], bias=bad_bias))
    bad_w = out[2].double() if rank == 1 else out[2]
    expect(lambda: buffer.combine(out[0], out[4], topk_weights=bad_w))
    # Local: what cannot work on this machine names its argument.
    local = []

    def named(fn, word, exc=ValueError):
        with pytest.raises(exc, match=word):
            fn()
        local.append(word)

    named(lambda: buffer.low_latency_dispatch(x_rand, idx, 8, experts), "low_latency_mode")
    named(lambda: deep_ep.Buffer(dist.group.WORLD, enable_shrink=True), "enable_shrink")
    named(lambda: deep_ep.Buffer(dist.group.WORLD, comm=object()), "comm")
    named(lambda: deep_ep.Buffer(dist.group.WORLD, 100), "num_nvl_bytes")
    small = deep_ep.Buffer(dist.group.WORLD, 128, 128, low_latency_mode=True)
    named(lambda: small.dispatch(x_rand, **lay), "num_nvl_bytes")
    named(lambda: small.low_latency_dispatch(x_rand, idx, 8, experts), "num_rdma_bytes")
    ll = deep_ep.Buffer(dist.group.WORLD, 0, int(1e8) // 128 * 128, low_latency_mode=True)
    named(lambda: ll.low_latency_dispatch(x_rand, idx, 8, experts,
                                          dispatch_wait_recv_cost_stats=torch.zeros(2, 2, dtype=torch.int64)),
          "dispatch_wait_recv_cost_stats")
    named(lambda: ll.low_latency_dispatch(x_rand, idx, 8, experts, use_ue8m0=True), "use_ue8m0")
    d = ll.low_latency_dispatch(x_rand, idx, 8, experts, use_fp8=False)
    named(lambda: ll.low_latency_combine(d[0], idx, w, d[2], use_logfmt=True), "use_logfmt")
    named(lambda: ll.low_latency_combine(d[0], idx, w, d[2], combine_wait_recv_cost_stats=torch.zeros(1)),
          "combine_wait_recv_cost_stats")
    named(lambda: buffer.dispatch(x_rand, num_tokens_per_rank=per_rank), "is_token_in_rank")
    named(lambda: buffer.dispatch(x_rand, **lay, allocate_on_comm_stream=True), "allocate_on_comm_stream")
    named(lambda: buffer.low_latency_update_mask_buffer(0, True), "enable_shrink", NotImplementedError)
    named(lambda: deep_ep.Buffer(dist.group.WORLD, 128 * (1 + rank)), "same on every rank")
    named(lambda: deep_ep.Buffer.set_num_sms(3), "new_num_sms")
    named(lambda: deep_ep.Config(20, 8, 8), "num_max_nvl_chunked_send_tokens")
    # The hook and the `with` form of EventOverlap.
    ev = buffer.dispatch(x_rand, **lay, async_finish=True)
    seen = []
    ev[-1].register_hook_after_wait(lambda: seen.append(True))
    with ev[-1]:
        pass
    buffer.destroy()
    named(lambda: buffer.dispatch(x_rand, **lay), "destroyed", RuntimeError)
    return msgs, local, seen


def test_errors_collective_and_named():
    res = spawn(_errors_rank, 2)
    assert res[0][0] == res[1][0]  # the same messages on every rank
    msgs = res[0][0]
    assert "rank 1 of 2" in msgs[0] and "is_token_in_rank" in msgs[0]
    assert "rank 0 of 2" in msgs[1] and "num_worst_tokens (1)" in msgs[1]
    assert "rank 0 of 2" in msgs[2] and "bias" in msgs[2]
    assert "rank 1 of 2" in msgs[3] and "topk_weights" in msgs[3]
    assert res[0][2] == [True]


def _hardware_rank(rank, world, hosts):
    import os
    from unittest import mock

    from moekit import dist as mdist

    os.environ.pop("LOCAL_WORLD_SIZE")
    if hosts is None:  # the real hosts: all these ranks run on this one
        return mdist.node_layout().ranks_per_node, deep_ep.Buffer(dist.group.WORLD)._buffer.node_layout.ranks_per_node
    with mock.patch.object(mdist, "host_identity", lambda: hosts[rank]):
        try:
            return mdist.node_layout().ranks_per_node
        except ValueError as e:
            return str(e)


def test_node_layout_from_the_hardware():
    # One host (the real one): a single node, also for the compat Buffer built without ranks_per_node.
    assert spawn(_hardware_rank, 2, None) == [(2, 2)] * 2
    assert spawn(_hardware_rank, 4, ["a", "a", "b", "b"]) == [2] * 4
    bad = spawn(_hardware_rank, 4, ["a", "b", "a", "b"])
    assert len(set(bad)) == 1 and "consecutive" in bad[0] and "LOCAL_WORLD_SIZE" in bad[0]


# ---- DeepEP's public names and signatures (deep_ep/buffers/legacy.py, dd758ca) ---------------------

SIGNATURES = {
    "__init__": "self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24, "
                "allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False, "
                "enable_shrink=False, comm=None",
    "destroy": "self",
    "is_sm90_compiled": "",
    "set_num_sms": "new_num_sms",
    "capture": "",
    "get_low_latency_rdma_size_hint": "num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts",
    "get_dispatch_config": "num_ranks",
    "get_combine_config": "num_ranks",
    "get_dispatch_layout": "self, topk_idx, num_experts, previous_event=None, async_finish=False, "
                           "allocate_on_comm_stream=False",
    "dispatch": "self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, "
                "is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None, "
                "expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False, "
                "allocate_on_comm_stream=False",
    "combine": "self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, "
               "async_finish=False, allocate_on_comm_stream=False",
    "clean_low_latency_buffer": "self, num_max_dispatch_tokens_per_rank, hidden, num_experts",
    "low_latency_dispatch": "self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, "
                            "cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, "
                            "use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False, "
                            "return_recv_hook=False",
    "low_latency_combine": "self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False, "
                           "async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None",
    "get_next_low_latency_combine_buffer": "self, handle",
}


def _plain(sig: inspect.Signature) -> str:
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                     for p in sig.parameters.values())


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_buffer_signature_is_deepeps(name):
    assert _plain(inspect.signature(getattr(deep_ep.Buffer, name))) == SIGNATURES[name]


def test_module_names_config_and_events():
    assert deep_ep.topk_idx_t == torch.int64 and deep_ep.Buffer.num_sms == 20
    assert _plain(inspect.signature(deep_ep.Config)) == (
        "num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256, "
        "num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256")
    assert _plain(inspect.signature(deep_ep.EventOverlap)) == "event=None, extra_tensors=None"
    for m in ("current_stream_wait", "register_hook_after_wait", "__enter__", "__exit__", "__call__"):
        assert callable(getattr(deep_ep.EventOverlap, m))
    assert deep_ep.Buffer.is_sm90_compiled() is True
    # DeepEP's table; num_sms follows set_num_sms.
    cfg = deep_ep.Buffer.get_dispatch_config(8)
    assert (cfg.num_sms, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens) == (20, 6, 256)
    deep_ep.Buffer.set_num_sms(24)
    try:
        assert deep_ep.Buffer.get_combine_config(4).num_sms == 24
    finally:
        deep_ep.Buffer.set_num_sms(20)
    with pytest.raises(ValueError, match="num_ranks"):
        deep_ep.Buffer.get_dispatch_config(3)
    # Size hints: 128-aligned, growing with the row size; no RDMA buffer within one NVLink domain.
    c = deep_ep.Config()
    a, b = c.get_nvl_buffer_size_hint(7168 * 2, 8), c.get_nvl_buffer_size_hint(7168, 8)
    assert a % 128 == 0 and a > b > 0 and c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    assert c.get_rdma_buffer_size_hint(7168 * 2, 16) > 0
    ll = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert ll % 128 == 0 and ll >= 2 * 256 * 128 * 7168 * 2  # at least the two BF16 receive buffers
    # An EventOverlap from capture() completes at once on the CPU.
    ev = deep_ep.Buffer.capture()
    ev.current_stream_wait()
