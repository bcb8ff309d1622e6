"""Grouped routed experts against a per-(row, expert) float64 loop; HF state-dict keys; FP8 backend."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_reference import reference_experts

from moekit.moe.experts import MLP, RoutedExperts


def make_experts(num_local, offset=0, h=16, i=8, backend="torch", dtype=torch.float32):
    ex = RoutedExperts(num_local, offset, h, i, backend, dtype=dtype)
    ex.reset_parameters(seed=1234)
    return ex


def local_sd(ex):
    """The state dict with local expert ids (the ids ``topk_idx`` uses here)."""
    out = {}
    for key, v in ex.state_dict().items():
        i, rest = key.split(".", 1)
        out[f"experts.{int(i) - ex.expert_offset}.{rest}"] = v
    return out


@settings(deadline=None, max_examples=20)
@given(n=st.integers(0, 24), k=st.integers(1, 4), e=st.integers(1, 6), pass_counts=st.booleans(),
       seed=st.integers(0, 10_000))
def test_grouped_experts_match_loop(n, k, e, pass_counts, seed):
    gen = torch.Generator().manual_seed(seed)
    ex = make_experts(e, offset=3)
    x = torch.randn(n, 16, generator=gen, requires_grad=True)
    idx = torch.randint(-1, e, (n, k), generator=gen)  # -1 = expert elsewhere; repeats are allowed rows
    w = torch.rand(n, k, generator=gen).masked_fill(idx < 0, 0.0).requires_grad_()
    counts = torch.bincount(idx[idx >= 0], minlength=e).tolist() if pass_counts else None
    y = ex(x, idx, w, counts)
    sd = local_sd(ex)
    ref = reference_experts(x.detach(), idx, w.detach(), sd)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # Gradients against autograd through the float64 loop.
    g = torch.randn(n, 16, generator=gen)
    (y * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    sd64 = {kk: v.detach().double().requires_grad_() for kk, v in sd.items()}
    out = torch.zeros(n, 16, dtype=torch.float64) + 0 * (x64.sum() + w64.sum())  # in the graph even for n = 0
    for t in range(n):
        for j in range(k):
            if idx[t, j] >= 0:
                p = f"experts.{int(idx[t, j])}"
                hdn = torch.nn.functional.silu(x64[t] @ sd64[f"{p}.gate_proj.weight"].T) * \
                    (x64[t] @ sd64[f"{p}.up_proj.weight"].T)
                out[t] = out[t] + w64[t, j] * (hdn @ sd64[f"{p}.down_proj.weight"].T)
    (out * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    for name in ("gate_proj", "up_proj", "down_proj"):
        for j in range(e):
            ref_g = sd64[f"experts.{j}.{name}.weight"].grad
            if ref_g is None:
                ref_g = torch.zeros_like(sd64[f"experts.{j}.{name}.weight"])
            torch.testing.assert_close(getattr(ex, name).grad[j].double(), ref_g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_every_slot_local_sums_in_slot_order(dtype, tol):
    """No -1 slot (P = N * K): the slot-order fp32 sum, forward and backward, against float64 autograd."""
    gen = torch.Generator().manual_seed(7)
    n, k, e = 12, 3, 4
    ex = make_experts(e, dtype=dtype)
    x = torch.randn(n, 16, generator=gen).to(dtype).requires_grad_()
    idx = torch.randint(0, e, (n, k), generator=gen)
    w = torch.rand(n, k, generator=gen).requires_grad_()
    y = ex(x, idx, w)
    assert y.dtype == dtype
    g = torch.randn(n, 16, generator=gen)
    (y.float() * g).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    wts = {name: getattr(ex, name).detach().double().requires_grad_() for name in RoutedExperts._PROJ}
    hdn = torch.nn.functional.silu(torch.einsum("nh,nkih->nki", x64, wts["gate_proj"][idx])) * \
        torch.einsum("nh,nkih->nki", x64, wts["up_proj"][idx])
    ref = torch.einsum("nk,nki,nkhi->nh", w64, hdn, wts["down_proj"][idx])
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol)
    for name in RoutedExperts._PROJ:
        torch.testing.assert_close(getattr(ex, name).grad.double(), wts[name].grad, rtol=tol, atol=tol)


def test_all_rows_to_one_expert_and_bf16():
    ex = make_experts(4, dtype=torch.bfloat16)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    idx = torch.full((10, 1), 2)
    w = torch.rand(10, 1)
    y = ex(x, idx, w, [0, 0, 10, 0])
    assert y.dtype == torch.bfloat16
    ref = reference_experts(x, idx, w, local_sd(ex))
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="counts"):
        ex(x, idx, w, [10])


def test_state_dict_uses_global_hf_keys():
    ex = make_experts(2, offset=4)
    sd = ex.state_dict()
    assert list(sd) == [f"{i}.{p}.weight" for i in (4, 5) for p in ("gate_proj", "up_proj", "down_proj")]
    assert sd["5.down_proj.weight"].shape == (16, 8) and sd["4.gate_proj.weight"].shape == (8, 16)
    # A full dict (experts 0..7) loads: this shard takes 4 and 5, the others are not "unexpected".
    full = {f"{i}.{p}.weight": torch.randn(8, 16) if p != "down_proj" else torch.randn(16, 8)
            for i in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    other = make_experts(2, offset=4)
    res = other.load_state_dict(full)
    assert not res.missing_keys and not res.unexpected_keys
    torch.testing.assert_close(other.up_proj[1], full["5.up_proj.weight"])
    res = other.load_state_dict({"4.gate_proj.weight": torch.zeros(8, 16), "bogus": torch.zeros(1)}, strict=False)
    assert "5.gate_proj.weight" in res.missing_keys and "bogus" in res.unexpected_keys
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict({**full, "4.gate_proj.weight": torch.zeros(3, 3)})
    assert all(getattr(p, "moekit_expert", False) for p in ex.parameters())


def test_same_experts_whatever_the_sharding():
    whole = make_experts(8)
    half = make_experts(4, offset=4)
    torch.testing.assert_close(whole.down_proj[4:], half.down_proj)


def test_mlp_keys():
    assert set(MLP(8, 4).state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}


def test_fp8_backend_within_fp8_error():
    pytest.importorskip("moekit.kernels.fp8_linear")
    gen = torch.Generator().manual_seed(0)
    ref_ex = make_experts(3, h=256, i=128)
    fp8_ex = make_experts(3, h=256, i=128, backend="fp8")
    x = torch.randn(40, 256, generator=gen)
    idx = torch.randint(-1, 3, (40, 2), generator=gen)
    w = torch.rand(40, 2, generator=gen).masked_fill(idx < 0, 0.0)
    y_ref = ref_ex(x, idx, w).double()
    y = fp8_ex(x, idx, w).double()
    # DeepGEMM's check: 1 - 2*sum(x*y)/sum(x*x+y*y), float64; three chained FP8 GEMMs.
    diff = 1 - 2 * (y * y_ref).sum() / (y * y + y_ref * y_ref).sum()
    assert diff < 5e-3, float(diff)


def test_forward_packed_matches_per_row_experts():
    """The low-latency layout [E_loc, M, H]: expert e's rows at the front of x[e], zeros after."""
    ex = make_experts(3)
    gen = torch.Generator().manual_seed(5)
    x = torch.zeros(3, 6, 16)
    rows = {0: 4, 1: 0, 2: 6}
    for e, c in rows.items():
        x[e, :c] = torch.randn(c, 16, generator=gen)
    y = ex.forward_packed(x)
    sd = local_sd(ex)
    for e, c in rows.items():
        idx, w = torch.full((c, 1), e), torch.ones(c, 1)
        torch.testing.assert_close(y[e, :c].double(), reference_experts(x[e, :c], idx, w, sd), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[e, c:], torch.zeros_like(y[e, c:]))
    with pytest.raises(ValueError, match="forward_packed"):
        ex.forward_packed(x[:2])
