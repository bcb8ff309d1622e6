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
