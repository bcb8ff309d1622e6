"""Load one MoE layer of a HF DeepSeek-V3 checkpoint into :class:`moekit.MoE`.

The published checkpoint stores the expert (and most other) linear weights in FP8 E4M3 with one fp32
``weight_scale_inv`` per 128x128 block (``w = fp8 * scale_inv``), under keys
``model.layers.{l}.mlp.{gate.weight, gate.e_score_correction_bias, experts.{i}.{gate,up,down}_proj.weight,
shared_experts.*}``. :func:`moe_state_dict_from_hf` strips the prefix and dequantizes, giving exactly
the keys ``MoE.load_state_dict`` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .._util import cdiv
from ..kernels.reference import per_block_dequant_ref


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``weight`` ``[N, K]`` (FP8) times its block scales ``scale_inv`` ``[ceil(N/block), ceil(K/block)]`` fp32.

    Returns ``[N, K]`` in ``dtype`` (the product is formed in fp32).
    """
    n, k = weight.shape
    nb, kb = cdiv(n, block), cdiv(k, block)
    if tuple(scale_inv.shape) != (nb, kb):
        raise ValueError(f"scale_inv must be [{nb}, {kb}] for a [{n}, {k}] weight in {block}x{block} blocks, "
                         f"got {list(scale_inv.shape)}")
    return per_block_dequant_ref(weight, scale_inv.float(), block).to(dtype)


def moe_state_dict_from_hf(checkpoint: Mapping[str, torch.Tensor], layer: int, *,
                           experts: Iterable[int] | None = None, dtype: torch.dtype = torch.bfloat16,
                           prefix: str = "model.layers.{layer}.mlp.") -> dict[str, torch.Tensor]:
    """The state dict of MoE layer ``layer`` from a HF DeepSeek-V3 checkpoint mapping (e.g. a dict built from
    its safetensors shards, or a lazy mapping that loads on access).

    experts: the routed experts to take (e.g. ``moe.local_experts`` so that each EP rank materializes only
    its own); None = all. Weights with a ``weight_scale_inv`` are dequantized to ``dtype``; the gate's
    fp32 ``e_score_correction_bias`` is kept in fp32; other float tensors are cast to ``dtype``.
    Raises ``KeyError`` naming the prefix when the layer has no MoE keys.
    """
    pre = prefix.format(layer=layer)
    keep = None if experts is None else {int(e) for e in experts}
    out: dict[str, torch.Tensor] = {}
    for key in checkpoint.keys():
        if not key.startswith(pre) or key.endswith("weight_scale_inv"):
            continue
        name = key[len(pre):]
        if keep is not None and name.startswith("experts.") and int(name.split(".")[1]) not in keep:
            continue
        value = checkpoint[key]
        scale_key = key + "_scale_inv"
        if scale_key in checkpoint:
            value = dequantize_block_fp8(value, checkpoint[scale_key], dtype=dtype)
        elif name == "gate.e_score_correction_bias":
            value = value.float()
        elif value.is_floating_point():
            value = value.to(dtype)
        out[name] = value
    if not out:
        raise KeyError(f"no MoE keys under {pre!r} in the checkpoint")
    return out
