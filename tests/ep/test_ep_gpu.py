"""Device code paths of the Buffer on one GPU (world size 1): CUDA tensors, the communication stream of
``async_finish``, FP8, autograd and the low-latency mode. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from moekit.ep import Buffer
from moekit.ep.fp8 import dequantize_1x128

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_gpu_single_rank_paths():
    dev = torch.device("cuda")
    buf = Buffer()
    t, h, e = 96, 256, 8
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(-1, e, (t, 3), device=dev)
    w = torch.rand(t, 3, device=dev, requires_grad=True)
    keep = (idx >= 0).any(1)
    out = buf.dispatch(x, idx, w, e, async_finish=True)
    out.event.current_stream_wait()
    assert torch.equal(out.recv_x, x.detach()[keep])
    y, ev = buf.combine(out.recv_x * 2, out.handle, async_finish=True)
    ev.wait()
    (y.float().sum() + out.recv_topk_weights.sum()).backward()
    torch.testing.assert_close(x.grad.float(), (2 * keep.float()).unsqueeze(1).expand(t, h))
    torch.testing.assert_close(w.grad, (idx >= 0).float())
    fp8 = buf.dispatch(x.detach(), idx, w.detach(), e, fp8=True)
    deq = dequantize_1x128(*fp8.recv_x)
    torch.testing.assert_close(deq, x.detach().float()[keep], rtol=0.07, atol=1e-2)
    ll = buf.low_latency_dispatch(x.detach(), idx, 128, e, use_fp8=False)
    assert ll.recv_count.tolist() == [int((idx == i).any(1).sum()) for i in range(e)]
    comb = buf.low_latency_combine(ll.recv_x, idx, w.detach(), ll.handle)
    want = (x.detach().float().unsqueeze(1) * torch.where(idx >= 0, w.detach(), 0).unsqueeze(2)).sum(1)
    torch.testing.assert_close(comb.combined_x.float(), want, rtol=2e-2, atol=2e-2)


def test_nccl_options_of_this_torch():
    # The real ProcessGroupNCCL.Options (CUDA builds): num_sms becomes config.max_ctas.
    from moekit.ep.transport import nccl

    if nccl.nccl_options_class() is None:
        pytest.skip("this torch has no NCCL backend")
    opts = nccl.cta_limited_options(16)
    if opts is None:
        pytest.skip("this torch's NCCL options have no config.max_ctas (NCCL < 2.17)")
    assert opts.config.max_ctas == 16
    assert nccl.buffer_pg_options("gloo", 16) is None
