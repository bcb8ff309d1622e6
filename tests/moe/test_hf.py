"""Loading a HF DeepSeek-V3-style checkpoint (FP8 weights + 128x128 ``weight_scale_inv``) into MoE."""

import pytest
import torch

from moekit import MoEConfig
from moekit.moe import MoE
from moekit.moe.hf import dequantize_block_fp8, moe_state_dict_from_hf


def test_dequantize_block_fp8_against_a_loop():
    w = (torch.randn(200, 300) * 3).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) + 0.5
    got = dequantize_block_fp8(w, s, dtype=torch.float32)
    ref = torch.empty(200, 300)
    for bi in range(2):
        for bj in range(3):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            ref[blk] = w[blk].float() * s[bi, bj]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scale_inv"):
        dequantize_block_fp8(w, torch.ones(3, 3))


def fake_checkpoint(cfg, layer):
    """A checkpoint as DeepSeek-V3's: FP8 expert weights with block scales, bf16 gate, fp32 bias, other layers."""
    torch.manual_seed(0)
    ref = MoE(cfg)
    ckpt = {"model.layers.0.mlp.gate_proj.weight": torch.zeros(2, 2)}  # a dense layer: not ours
    for k, v in ref.state_dict().items():
        key = f"model.layers.{layer}.mlp.{k}"
        if k.endswith("proj.weight"):
            n, kk = v.shape
            scale = v.abs().amax().clamp(min=1e-8) / 448 * torch.ones((n + 127) // 128, (kk + 127) // 128)
            ckpt[key] = (v / scale[0, 0]).to(torch.float8_e4m3fn)
            ckpt[key + "_scale_inv"] = scale
        else:
            ckpt[key] = v.to(torch.bfloat16) if k == "gate.weight" else v
    return ref, ckpt


def test_moe_loads_a_dequantized_layer():
    cfg = MoEConfig.preset("tiny")
    ref, ckpt = fake_checkpoint(cfg, layer=3)
    sd = moe_state_dict_from_hf(ckpt, 3, dtype=torch.float32)
    moe = MoE(cfg)
    moe.load_state_dict(sd)  # strict: exactly the layer's keys
    assert sd["gate.e_score_correction_bias"].dtype == torch.float32
    for k, v in ref.state_dict().items():  # FP8 round trip: within e4m3's relative step (2^-3)
        torch.testing.assert_close(moe.state_dict()[k], v, rtol=0.07, atol=v.abs().max().item() * 2e-3)
    only = moe_state_dict_from_hf(ckpt, 3, experts=range(4, 8))
    assert {k.split(".")[1] for k in only if k.startswith("experts.")} == {"4", "5", "6", "7"}
    assert "shared_experts.up_proj.weight" in only and only["gate.weight"].dtype == torch.bfloat16
    with pytest.raises(KeyError, match="model.layers.9.mlp."):
        moe_state_dict_from_hf(ckpt, 9)
