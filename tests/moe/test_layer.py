"""``moekit.MoE`` at world size 1 against the plain float64 block of ``moe_reference``."""

import pytest
import torch
import torch.nn.functional as F
from moe_reference import reference_moe

from moekit import MoEConfig
from moekit.moe import MoE, is_expert_param, moe_layers, sync_grads, update_moe_biases
from moekit.routing.balance import sequence_aux_loss
from moekit.routing.gate import route


def hf_state_dict(cfg, gen):
    """Random weights under the key names of a HF DeepSeek-V3 MoE block."""
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    sd = {"gate.weight": torch.randn(cfg.n_routed_experts, h, generator=gen) * 0.3,
          "gate.e_score_correction_bias": torch.randn(cfg.n_routed_experts, generator=gen) * 0.02}
    for e in range(cfg.n_routed_experts):
        sd[f"experts.{e}.gate_proj.weight"] = torch.randn(i, h, generator=gen) * h ** -0.5
        sd[f"experts.{e}.up_proj.weight"] = torch.randn(i, h, generator=gen) * h ** -0.5
        sd[f"experts.{e}.down_proj.weight"] = torch.randn(h, i, generator=gen) * i ** -0.5
    si = cfg.n_shared_experts * i
    sd["shared_experts.gate_proj.weight"] = torch.randn(si, h, generator=gen) * h ** -0.5
    sd["shared_experts.up_proj.weight"] = torch.randn(si, h, generator=gen) * h ** -0.5
    sd["shared_experts.down_proj.weight"] = torch.randn(h, si, generator=gen) * si ** -0.5
    return sd


def reference_grads(x, sd, cfg, g):
    """Autograd through the float64 block (routing fixed by the fp32 gate, as the layer does)."""
    x64 = x.detach().double().requires_grad_()
    p = {k: v.detach().double().requires_grad_() for k, v in sd.items() if k != "gate.e_score_correction_bias"}
    scores32 = torch.sigmoid(x.detach().float() @ sd["gate.weight"].float().T)
    idx, _ = route(scores32, sd["gate.e_score_correction_bias"], cfg)
    w = torch.sigmoid(x64 @ p["gate.weight"].T).gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor

    def mlp(v, pre):
        return (F.silu(v @ p[f"{pre}.gate_proj.weight"].T) * (v @ p[f"{pre}.up_proj.weight"].T)) @ \
            p[f"{pre}.down_proj.weight"].T

    y = mlp(x64, "shared_experts")
    rows = []
    for t in range(x64.shape[0]):
        rows.append(sum(w[t, j] * mlp(x64[t:t + 1], f"experts.{int(idx[t, j])}")[0] for j in range(idx.shape[1])))
    y = y + torch.stack(rows)
    (y * g.double()).sum().backward()
    return x64.grad, {k: v.grad for k, v in p.items()}


def test_moe_world1_matches_reference_and_loads_hf_weights():
    cfg = MoEConfig.preset("tiny", seq_aux_loss_alpha=0.0)
    gen = torch.Generator().manual_seed(1)
    sd = hf_state_dict(cfg, gen)
    moe = MoE(cfg)
    assert set(moe.state_dict()) == set(sd)
    moe.load_state_dict(sd)  # strict: exactly HF's names
    x = torch.randn(2, 7, cfg.hidden_size, generator=gen, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape
    ref, _ = reference_moe(x.detach().view(-1, cfg.hidden_size), sd, cfg)
    torch.testing.assert_close(y.detach().view(-1, cfg.hidden_size).double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(14, cfg.hidden_size, generator=gen)
    (y.view(-1, cfg.hidden_size) * g).sum().backward()
    gx, gp = reference_grads(x.view(-1, cfg.hidden_size), sd, cfg, g)
    torch.testing.assert_close(x.grad.view(-1, cfg.hidden_size).double(), gx, rtol=1e-5, atol=1e-5)
    got = {k: v for k, v in moe.named_parameters()}
    for key, ref_g in gp.items():
        if key.startswith("experts."):
            _, e, proj, _ = key.split(".")
            mine = got[f"experts.{proj}"].grad[int(e)]
        else:
            mine = got[key].grad
        torch.testing.assert_close(mine.double(), ref_g, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def test_full_state_dict_round_trip_world1():
    cfg = MoEConfig.preset("tiny")
    moe = MoE(cfg)
    full = moe.full_state_dict()
    assert list(full)[:3] == ["gate.weight", "gate.e_score_correction_bias", "experts.0.gate_proj.weight"]
    assert len([k for k in full if k.startswith("experts.")]) == 3 * cfg.n_routed_experts
    torch.manual_seed(5)
    other = MoE(cfg)
    other.load_state_dict(full)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, full[k])


def test_aux_loss_trains_through_the_output():
    cfg = MoEConfig.preset("tiny", seq_aux_loss_alpha=0.5)
    moe = MoE(cfg)
    x = torch.randn(3, 5, cfg.hidden_size)
    moe.train()
    y = moe(x)
    scores = torch.sigmoid(x.view(-1, cfg.hidden_size) @ moe.gate.weight.detach().T)
    idx = moe.gate(x.view(-1, cfg.hidden_size)).topk_idx
    torch.testing.assert_close(moe.aux_loss, sequence_aux_loss(scores, idx, 0.5, seq_len=5))
    y.sum().backward()
    with_aux = moe.gate.weight.grad.clone()
    moe.zero_grad()
    moe.eval()  # no aux loss in eval mode
    moe(x).sum().backward()
    moe.zero_grad()
    s = torch.sigmoid(x.view(-1, cfg.hidden_size) @ moe.gate.weight.T)
    sequence_aux_loss(s, idx, 0.5, seq_len=5).backward()
    aux_only = moe.gate.weight.grad.clone()
    moe.zero_grad()
    moe.train()
    cfg0 = cfg.replace(seq_aux_loss_alpha=0.0)
    moe.config = cfg0
    moe(x).sum().backward()
    torch.testing.assert_close(with_aux, moe.gate.weight.grad + aux_only)


def test_bias_update_over_layers_and_load_stats():
    cfg = MoEConfig.preset("tiny", bias_update_speed=0.01)
    model = torch.nn.Sequential(MoE(cfg), MoE(cfg))
    x = torch.randn(40, cfg.hidden_size)
    with torch.no_grad():
        model(x)
    layers = moe_layers(model)
    pending = [m.load.pending.clone() for m in layers]
    assert [int(p.sum()) for p in pending] == [40 * cfg.num_experts_per_tok] * 2
    out = update_moe_biases(model)
    assert torch.equal(out.load, torch.stack(pending))
    for m, p in zip(layers, pending):
        ref = 0.01 * torch.sign(p.double().mean() - p.double()).float()
        torch.testing.assert_close(m.gate.e_score_correction_bias, ref)
        assert int(m.load.pending.sum()) == 0 and torch.equal(m.load.total, p)
    # Nothing is pending after the model-wide update: a second one sees no load and moves no bias.
    before = layers[0].gate.e_score_correction_bias.clone()
    single = layers[0].update_bias()
    assert single.load.sum() == 0 and torch.equal(layers[0].gate.e_score_correction_bias, before)


def test_replicated_grads_and_bad_input():
    cfg = MoEConfig.preset("tiny")
    moe = MoE(cfg)
    moe(torch.randn(4, cfg.hidden_size)).sum().backward()
    before = {n: p.grad.clone() for n, p in moe.named_parameters()}
    sync_grads(moe)  # world size 1: nothing to do
    assert all(torch.equal(before[n], p.grad) for n, p in moe.named_parameters())
    assert {n for n, p in moe.named_parameters() if is_expert_param(p)} == \
        {"experts.gate_proj", "experts.up_proj", "experts.down_proj"}
    with pytest.raises(ValueError, match="hidden_size"):
        moe(torch.randn(4, cfg.hidden_size + 2))
    # Zero tokens.
    assert moe(torch.randn(0, cfg.hidden_size)).shape == (0, cfg.hidden_size)


def test_same_seed_same_model():
    cfg = MoEConfig.preset("tiny")
    torch.manual_seed(3)
    a = MoE(cfg).state_dict()
    torch.manual_seed(3)
    b = MoE(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_expert_backend_within_fp8_error():
    pytest.importorskip("moekit.kernels.fp8_linear")
    cfg = MoEConfig.preset("tiny", hidden_size=128, moe_intermediate_size=128, n_routed_experts=8, n_group=2,
                           topk_group=1, num_experts_per_tok=2, seq_aux_loss_alpha=0.0)
    ref = MoE(cfg)
    fp8 = MoE(cfg.replace(expert_backend="fp8"))
    fp8.load_state_dict(ref.state_dict())
    x = torch.randn(24, 128)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), fp8(xb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()

    def diff(a, b):  # DeepGEMM's measure, float64
        a, b = a.detach().double(), b.detach().double()
        return float(1 - 2 * (a * b).sum() / (a * a + b * b).sum())

    assert diff(ya, yb) < 5e-3  # three chained FP8 GEMMs (a wrong expert gives ~0.5)
    assert diff(xa.grad, xb.grad) < 5e-3  # backward in fp32 from FP8-forward activations
    assert diff(ref.experts.down_proj.grad, fp8.experts.down_proj.grad) < 5e-3
    assert diff(ref.experts.gate_proj.grad, fp8.experts.gate_proj.grad) < 5e-3


def test_dispatch_fp8_world1_is_the_fp8_round_trip_with_straight_through_grads():
    from moekit.ep.fp8 import dequantize_1x128, quantize_1x128

    cfg = MoEConfig.preset("tiny", hidden_size=128, dispatch_fp8=True, seq_aux_loss_alpha=0.0)
    moe = MoE(cfg)
    x = (torch.randn(9, 128) * 3).requires_grad_()
    y = moe(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    # By hand: the routed experts see the round trip, the gate and the shared experts see x.
    x2 = x.detach().clone().requires_grad_()
    xq = dequantize_1x128(*quantize_1x128(x2.detach()))
    assert (xq != x2).any()  # the round trip does change x
    out = moe.gate(x2)
    y2 = moe.experts(x2 + (xq - x2).detach(), out.topk_idx, out.topk_weights) + moe.shared_experts(x2)
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    with pytest.raises(ValueError, match="dispatch_fp8"):
        MoEConfig.preset("tiny", dispatch_fp8=True)
