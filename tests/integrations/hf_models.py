"""Tiny random transformers MoE checkpoints, written locally (nothing is downloaded)."""

from __future__ import annotations

import json
import os

import torch

from moekit.kernels.reference import per_block_dequant_ref

V = 96  # vocabulary of the tiny models


def _configs():
    import transformers as tf

    attn = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=V, num_hidden_layers=2,
                max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return {
        # DeepSeek-V3: 16 experts in 4 groups, top-4 among 2 groups, scaled weights; layer 0 dense.
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(
            attn, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, first_k_dense_replace=1,
            n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
            routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16)),
        # GLM-4.5: the DeepSeek-V3 router without groups, both layers MoE.
        "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, dict(
            attn, head_dim=16, intermediate_size=96, moe_intermediate_size=32, first_k_dense_replace=0,
            n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
            routed_scaling_factor=1.5)),
        # Qwen3-MoE without renormalisation (norm_topk_prob=False, the config's default).
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
            attn, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
            norm_topk_prob=False)),
        # Mixtral: softmax top-2, renormalised; its checkpoints use block_sparse_moe.experts.{i}.w1/w2/w3.
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(
            attn, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)),
        # gpt-oss: biased router, clamped SwiGLU experts with biases, fused [E, H, 2I] weights.
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM, dict(
            attn, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=8)),
    }


ARCHS = ("deepseek_v3", "glm4_moe", "qwen3_moe", "mixtral", "gpt_oss")


def build(arch: str, seed: int = 0, **overrides):
    """A tiny random HF model of ``arch`` (fp32, eval). Router weights are drawn wide and the balancing biases
    random, so that top-k choices have margins far above fp32 rounding (ties would make the test flaky)."""
    cfg_cls, model_cls, kw = _configs()[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**kw, **overrides})).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def write(arch: str, root: str, seed: int = 0, **overrides) -> str:
    """``build(arch)`` saved with ``save_pretrained`` (safetensors) under ``root/arch``; returns the directory."""
    path = os.path.join(root, arch)
    build(arch, seed, **overrides).save_pretrained(path)
    return path


def fp8_block_quant(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight format: e4m3 values and one fp32 ``weight_scale_inv`` per 128x128 block
    (scale = block amax / 448), so that ``w ~ fp8 * scale_inv``. w: ``[N, K]`` fp32."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    pad = torch.zeros(nb * block, kb * block)
    pad[:n, :k] = w
    blocks = pad.view(nb, block, kb, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [nb, kb]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(nb * block, kb * block)[:n, :k]
    return q.contiguous(), scale.float()


def write_fp8_deepseek(root: str, seed: int = 0, **overrides) -> tuple[str, str]:
    """A DeepSeek-V3 checkpoint whose routed experts are block-FP8 + ``weight_scale_inv`` (expert intermediate
    size 160: a full and a ragged 128-row block), and the same model with those weights dequantized in fp32.
    Returns ``(fp8 dir, dequantized dir)``."""
    from safetensors.torch import load_file, save_file

    src = write("deepseek_v3", os.path.join(root, "fp32"), seed, **{"moe_intermediate_size": 160, **overrides})
    fp8_dir, deq_dir = os.path.join(root, "fp8"), os.path.join(root, "dequant")
    for d in (fp8_dir, deq_dir):
        os.makedirs(d)
        for name in ("config.json", "generation_config.json"):
            if os.path.exists(os.path.join(src, name)):
                with open(os.path.join(src, name)) as f, open(os.path.join(d, name), "w") as g:
                    g.write(f.read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    fp8, deq = {}, {}
    for key, value in tensors.items():
        if ".mlp.experts." in key:
            q, s = fp8_block_quant(value)
            fp8[key], fp8[key + "_scale_inv"] = q, s
            deq[key] = per_block_dequant_ref(q, s, 128)
        else:
            fp8[key] = deq[key] = value
    save_file(fp8, os.path.join(fp8_dir, "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, os.path.join(deq_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(fp8_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    with open(os.path.join(fp8_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return fp8_dir, deq_dir


# --- gpt-oss's MXFP4 checkpoints, packed here (not with moekit's code, which the tests check) ----------------

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)  # codes 0-7; bit 3 = sign


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [..., K]`` (K a multiple of 32) -> ``(blocks uint8 [..., K/32, 16], scales uint8 [..., K/32], the
    values they encode float64 [..., K])``: one power-of-two scale per 32 values, the smallest that brings the
    block's max-abs within E2M1's 6, then each value rounded to the nearest E2M1 magnitude (ties to the lower
    code). Even elements in the low nibble, odd ones in the high nibble (gpt-oss's layout)."""
    *lead, k = w.shape
    x = w.double().reshape(*lead, k // 32, 32)
    amax = x.abs().amax(dim=-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0)).clamp(-127, 127)
    scaled = x / torch.exp2(e).unsqueeze(-1)
    mag = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(dim=-1)  # [..., G, 32] in 0..7
    codes = (mag | ((scaled < 0).long() << 3)).to(torch.uint8)
    values = torch.where(scaled < 0, -E2M1[mag], E2M1[mag]) * torch.exp2(e).unsqueeze(-1)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (e + 127).to(torch.uint8), values.reshape(*lead, k)


def write_mxfp4_gpt_oss(root: str, seed: int = 0, **overrides) -> tuple[str, str]:
    """A tiny gpt-oss checkpoint as openai/gpt-oss-* publish it: the routed experts' ``gate_up_proj`` /
    ``down_proj`` as ``*_blocks`` + ``*_scales`` (stored output-rows first, ``[E, 2I, H/32, 16]`` and
    ``[E, H, I/32, 16]``), everything else bf16, ``quantization_config.quant_method = "mxfp4"``; and the same
    model with exactly those values in fp32 (``save_pretrained``), to run in transformers.
    Returns ``(mxfp4 dir, dequantized dir)``."""
    from safetensors.torch import save_file

    model = build("gpt_oss", seed, **overrides)
    mx_dir, deq_dir = os.path.join(root, "mxfp4"), os.path.join(root, "dequant")
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            stem = name.rsplit(".", 1)[-1]
            if ".mlp.experts." in name and stem in ("gate_up_proj", "down_proj"):
                blocks, scales, values = mxfp4_pack(p.transpose(1, 2))  # [E, out, in]: blocks along `in`
                tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
                p.copy_(values.transpose(1, 2))
            else:
                tensors[name] = p.to(torch.bfloat16).contiguous()
                p.copy_(tensors[name])
    model.save_pretrained(deq_dir)
    os.makedirs(mx_dir)
    save_file(tensors, os.path.join(mx_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(deq_dir, "config.json")))
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(mx_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return mx_dir, deq_dir
