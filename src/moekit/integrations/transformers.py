"""Expert parallelism for transformers MoE models: :func:`expert_parallel` and :func:`from_pretrained`.

Shape legend: T = tokens on this rank, H = hidden size, I = expert intermediate size, E = routed experts,
R = ranks of the EP group, E_loc = E / R experts per rank.

Each MoE block of a transformers ``PreTrainedModel`` becomes a :class:`moekit.MoE` whose routed experts are
sharded over the group (rank r keeps experts ``[r*E/R, (r+1)*E/R)``); attention, embeddings, norms, dense
MLPs, the router and the shared experts stay the model's own modules, replicated. The router is called as
the model calls it (so ``output_router_logits=True`` still records its logits) and moekit chooses the experts
from its logits with the family's rule (:mod:`moekit.routing.routers`). The model stays a transformers model:
``model(input_ids, labels=...)``, ``generate`` and its loss work as before, on every rank of the group.

Needs the ``moekit[hf]`` extra (transformers, safetensors). Nothing here downloads anything:
:func:`from_pretrained` reads a local directory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import resource
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .. import dist as mdist
from ..config import MoEConfig
from ..kernels.reference import mxfp4_dequant_ref
from ..moe.hf import dequantize_block_fp8
from ..moe.layer import MoE, is_expert_param
from ..routing.balance import ExpertLoad
from ..routing.routers import LogitsRouter, routing_config
from .gpt_oss import ClampedSwiGLUExperts, TupleOutputMoE

_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How moekit reads one transformers MoE family.

    block: class name of the HF MoE block that is replaced; router: its router attribute; kind: the routing
    rule (:data:`moekit.routing.routers.ROUTER_KINDS`); shared: its shared-experts attribute or None;
    expert_key: regex of a per-expert checkpoint key (groups: layer, expert, projection name) and
    proj_names: the checkpoint's names of (gate, up, down); renames: ``(checkpoint fragment, model
    fragment)`` pairs for the other keys; experts: ``"swiglu"`` (moekit's ``RoutedExperts``) or
    ``"clamped_swiglu"`` (gpt-oss's, :mod:`moekit.integrations.gpt_oss`); tuple_output: the block returns
    ``(hidden_states, routing weights)``.
    """

    block: str
    router: str
    kind: str
    shared: str | None
    expert_key: str
    proj_names: tuple[str, str, str] = _PROJ
    renames: tuple[tuple[str, str], ...] = ()
    experts: str = "swiglu"
    tuple_output: bool = False


_PER_EXPERT = r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$"
ARCHITECTURES: dict[str, Architecture] = {
    # DeepSeek-V3/R1 and Kimi-K2 (the DeepSeek-V3 architecture): sigmoid, group-limited, bias; 1 shared expert.
    "DeepseekV3ForCausalLM": Architecture("DeepseekV3MoE", "gate", "sigmoid_group", "shared_experts", _PER_EXPERT),
    # GLM-4.5 / 4.6: the DeepSeek-V3 router (Glm4MoeTopkRouter) and shared experts.
    "Glm4MoeForCausalLM": Architecture("Glm4MoeMoE", "gate", "sigmoid_group", "shared_experts", _PER_EXPERT),
    # Qwen3-MoE: softmax top-k, renormalised when config.norm_topk_prob; no shared expert.
    "Qwen3MoeForCausalLM": Architecture("Qwen3MoeSparseMoeBlock", "gate", "softmax_topk", None, _PER_EXPERT),
    # Mixtral: softmax top-k, always renormalised. Its checkpoints name the block `block_sparse_moe` and the
    # experts' projections w1 (gate), w3 (up), w2 (down) (mistralai/Mixtral-8x7B-v0.1 safetensors).
    "MixtralForCausalLM": Architecture(
        "MixtralSparseMoeBlock", "gate", "softmax_topk", None,
        r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(\w+)\.weight$", ("w1", "w3", "w2"),
        ((".block_sparse_moe.", ".mlp."),)),
    # gpt-oss: top-k of the logits, softmax over those k (= softmax_topk renormalised); experts a clamped
    # SwiGLU with biases, stored fused ([E, H, 2I] interleaved gate/up); the block returns (y, weights).
    "GptOssForCausalLM": Architecture("GptOssMLP", "router", "softmax_topk", None, r"(?!)",
                                      experts="clamped_swiglu", tuple_output=True),
}
# transformers has these, moekit does not shard them (yet): a clear error rather than a wrong model.
_UNSUPPORTED: dict[str, str] = {}


def architecture_of(model_or_config: Any) -> tuple[str, Architecture]:
    """``(class name, Architecture)`` of a transformers model (or of its config's ``architectures[0]``).

    Raises ``ValueError`` naming the class and the supported ones for any other model.
    """
    if isinstance(model_or_config, nn.Module):
        name = type(model_or_config).__name__
    else:
        archs = getattr(model_or_config, "architectures", None) or []
        name = archs[0] if archs else type(model_or_config).__name__
    if name in ARCHITECTURES:
        return name, ARCHITECTURES[name]
    why = f" ({_UNSUPPORTED[name]})" if name in _UNSUPPORTED else ""
    raise ValueError(f"moekit.integrations.transformers does not support {name}{why}; supported: "
                     f"{sorted(ARCHITECTURES)}")


def _moe_config(block: nn.Module, arch: Architecture, hf_config: Any, fp8: bool) -> MoEConfig:
    router = getattr(block, arch.router)
    if arch.experts == "clamped_swiglu":
        e, i, h = block.experts.down_proj.shape  # gpt-oss: [E, I, H]
    else:
        e, h, i = block.experts.down_proj.shape  # HF's fused [E, H, I]
    fields = routing_config(
        arch.kind, num_experts=e, top_k=router.top_k, hidden_size=h,
        norm_topk_prob=bool(getattr(router, "norm_topk_prob", True)),
        n_group=getattr(router, "num_group", None) or 1, topk_group=getattr(router, "topk_group", None) or 1,
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
        moe_intermediate_size=i, n_shared_experts=0,  # the HF block's own shared experts are kept
        vocab_size=hf_config.vocab_size, num_hidden_layers=hf_config.num_hidden_layers, first_k_dense_replace=0,
        # transformers' MoE models train without moekit's sequence-wise aux loss: the same loss as HF.
        seq_aux_loss_alpha=0.0, expert_backend="fp8" if fp8 else "torch")
    return MoEConfig(**fields)


def _buffer_kwargs(transport: str) -> dict:
    """``transport`` for :class:`moekit.Buffer`, checked here so that a bad value fails before any module
    is replaced (the Buffer is built per layer, collectively)."""
    from ..ep.transport.select import TRANSPORTS

    if not isinstance(transport, str):
        raise TypeError(f"transport must be a str, got {type(transport).__name__}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    return {"transport": transport}


def _blocks(model: nn.Module, arch: Architecture) -> list[tuple[nn.Module, str, nn.Module]]:
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ == arch.block:
                out.append((parent, name, child))
    return out


def expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, *, transport: str = "auto",
                    fp8: bool | None = None) -> nn.Module:
    """Replace every MoE block of a transformers model by a :class:`moekit.MoE` sharded over ``group``.

    model: a transformers ``PreTrainedModel`` of a supported architecture (:data:`ARCHITECTURES`), identical
    on every rank (same weights: e.g. loaded from one checkpoint or built with one seed). Its experts may be
    on the ``meta`` device (:func:`from_pretrained` loads them afterwards). group: the EP group (None = the
    default group, or no distribution). transport: :class:`moekit.Buffer`'s ``transport``
    (``"auto"`` | ``"collective"`` | ``"symmetric"``). fp8: run the routed experts through moekit's FP8
    grouped GEMM (``expert_backend="fp8"``:
    H and I multiples of 128); None = off.

    Returns ``model`` itself, changed in place: rank r holds experts ``[r*E/R, (r+1)*E/R)`` (parameters
    marked ``moekit_expert``: see :func:`moekit.moe.sync_grads` for training); all MoE layers share one
    Buffer. Collective over ``group`` when R > 1 (the Buffer). The forward of each replaced block has the
    HF block's signature and output; every rank must run the same forwards (the layers exchange tokens).
    Raises ``ValueError`` for an unsupported architecture, a model without MoE blocks, E not divisible by
    R, or Mixtral's ``router_jitter_noise > 0`` (not reproduced).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expert_parallel: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    _, arch = architecture_of(model)
    hf_config = getattr(model, "config", None)
    if getattr(hf_config, "router_jitter_noise", 0.0):
        raise ValueError(f"expert_parallel: router_jitter_noise ({hf_config.router_jitter_noise}) must be 0: "
                         f"moekit does not reproduce Mixtral's training-time jitter")
    blocks = _blocks(model, arch)
    if not blocks:
        raise ValueError(f"expert_parallel: no {arch.block} blocks in this {type(model).__name__} (already "
                         f"expert-parallel?)")
    ep_size = mdist.world_size(group)
    buffer_kw = _buffer_kwargs(transport)
    if ep_size > 1:
        from ..ep.buffer import Buffer

        buffer = Buffer(group, **buffer_kw)
    else:
        buffer = None
    for parent, name, block in blocks:
        cfg = _moe_config(block, arch, hf_config, bool(fp8))
        cfg.check_ep(ep_size)
        experts = block.experts
        dev, dt = experts.down_proj.device, experts.down_proj.dtype
        moe = (TupleOutputMoE if arch.tuple_output else MoE)(
            cfg, group, buffer=buffer, device=dev, dtype=dt, router=LogitsRouter(getattr(block, arch.router),
                                                                                  arch.kind, cfg))
        if arch.shared is not None:
            moe.shared_experts = getattr(block, arch.shared)
        if arch.experts == "clamped_swiglu":
            moe.experts = ClampedSwiGLUExperts(moe.num_local_experts, moe.expert_offset, cfg.hidden_size,
                                               cfg.moe_intermediate_size, experts.alpha, experts.limit,
                                               device=dev, dtype=dt)
            if dev.type != "meta":
                lo, n = moe.expert_offset, moe.num_local_experts
                with torch.no_grad():
                    for pname in ClampedSwiGLUExperts.PARAMS:
                        getattr(moe.experts, pname).copy_(getattr(experts, pname)[lo:lo + n])
                moe.experts.requires_grad_(experts.down_proj.requires_grad)
        elif dev.type != "meta":
            lo, n, i = moe.expert_offset, moe.num_local_experts, cfg.moe_intermediate_size
            with torch.no_grad():
                gate_up = experts.gate_up_proj[lo:lo + n]  # [E_loc, 2I, H]: gate rows first (HF chunk(2))
                moe.experts.gate_proj.copy_(gate_up[:, :i])
                moe.experts.up_proj.copy_(gate_up[:, i:])
                moe.experts.down_proj.copy_(experts.down_proj[lo:lo + n])
            moe.experts.requires_grad_(experts.down_proj.requires_grad)
        moe.train(block.training)
        setattr(parent, name, moe)
    return model


# --- loading from safetensors ------------------------------------------------------------------------------

class LoadStats(NamedTuple):
    """What :func:`from_pretrained` read on this rank (``model.moekit_load_stats``).

    bytes_read: bytes of the tensors read from the shards (as stored, e.g. FP8 + scales); expert_bytes /
    replicated_bytes: bytes of this rank's routed-expert parameters / of all other parameters and buffers;
    experts_read / experts_skipped: per-expert tensors read / left on disk for the other ranks;
    unexpected: checkpoint keys the model has no place for (e.g. DeepSeek-V3's multi-token-prediction layer);
    peak_rss_bytes: the process's peak resident memory after loading (``getrusage``; includes the interpreter
    and torch, and, for forked ranks, what the parent had).
    """

    bytes_read: int
    expert_bytes: int
    replicated_bytes: int
    experts_read: int
    experts_skipped: int
    unexpected: tuple[str, ...]
    peak_rss_bytes: int


def _shard_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"from_pretrained: no *.safetensors files in {path!r} (moekit never reads pickled "
                         f"checkpoints)")
    return files


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and persistent buffer real (uninitialised) storage, to be loaded; zero the
    routers' balancing biases; rebuild the modules whose non-persistent buffers are on meta (transformers'
    rotary embeddings compute theirs from ``config`` in their constructor); fresh load counters."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.device.type == "meta":
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
                if is_expert_param(p):
                    new.moekit_expert = True
                setattr(module, name, new)
        persistent = {k for k in module.state_dict(keep_vars=True) if "." not in k}
        for name, b in list(module.named_buffers(recurse=False)):
            if b.device.type == "meta" and (name in persistent or isinstance(module, LogitsRouter)):
                new = torch.zeros(b.shape, dtype=b.dtype, device=device)
                module.register_buffer(name, new, persistent=name in persistent)
        if isinstance(module, MoE):
            module.load = ExpertLoad(module.config.n_routed_experts, device=device)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if any(b.device.type == "meta" for b in child.buffers(recurse=False)):
                if not hasattr(child, "config"):
                    raise RuntimeError(f"from_pretrained: cannot rebuild the buffers of {type(child).__name__}")
                with torch.device(device):
                    setattr(parent, name, type(child)(child.config))


_MXFP4_BLOCKS, _MXFP4_SCALES = "_blocks", "_scales"
_MXFP4_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


def _check_mxfp4_pairs(key_file: dict[str, str]) -> None:
    """Every MXFP4 ``*_blocks`` key has its ``*_scales`` key and the reverse (gpt-oss's checkpoints store the
    routed experts' gate_up_proj / down_proj so, e.g. openai/gpt-oss-20b's model.safetensors.index.json)."""
    for key in filter(_MXFP4_KEY.match, key_file):
        for have, need in ((_MXFP4_BLOCKS, _MXFP4_SCALES), (_MXFP4_SCALES, _MXFP4_BLOCKS)):
            if key.endswith(have) and key.removesuffix(have) + need not in key_file:
                raise ValueError(f"from_pretrained: MXFP4 tensor {key} has no {key.removesuffix(have) + need} "
                                 f"in the checkpoint (blocks and scales come in pairs)")


def _expert_slot(moe_by_layer: dict[int, MoE], layer: int, expert: int) -> tuple[MoE, int] | None:
    moe = moe_by_layer.get(layer)
    if moe is None:
        return None
    j = expert - moe.expert_offset
    return (moe, j) if 0 <= j < moe.num_local_experts else None


def from_pretrained(path_or_dir: str, group: dist.ProcessGroup | None = None, *, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None, transport: str = "auto", fp8: bool | None = None
                    ) -> nn.Module:
    """Build a transformers MoE model from a local checkpoint directory, expert-parallel over ``group``,
    reading on each rank only the tensors it keeps.

    path_or_dir: a directory with ``config.json`` and ``*.safetensors`` shards (``save_pretrained``'s output
    or a hub snapshot); nothing is downloaded and nothing is unpickled. The model is built on the ``meta``
    device, :func:`expert_parallel` shards it, then each rank reads with ``safetensors.safe_open`` the
    replicated tensors and its E/R experts' tensors only: memory per rank ~ replicated weights + E/R
    experts (``model.moekit_load_stats``, a :class:`LoadStats`). Both per-expert keys
    (``experts.{i}.gate_proj.weight``, Mixtral's ``w1/w3/w2``) and transformers' fused ``experts.gate_up_proj``
    / ``experts.down_proj`` are read.

    dtype: of the parameters (default: the config's ``dtype``, else fp32); tensors a model keeps in fp32
    (DeepSeek-V3's router) stay fp32. device: where the parameters live (default CPU). Block-FP8 weights
    with a ``weight_scale_inv`` (DeepSeek-V3's published format: one fp32 scale per 128x128 block) are
    dequantized into ``dtype``; with ``fp8=True`` (default: FP8 checkpoint on CUDA with H and I multiples of
    128) the experts then run moekit's FP8 grouped GEMM, which quantizes them per 128x128 block again (the
    checkpoint's own values when its scales are the blocks' amax / 448). gpt-oss's MXFP4 checkpoints
    (``quantization_config.quant_method == "mxfp4"``, as openai/gpt-oss-20b / 120b publish them): the routed
    experts' ``mlp.experts.{gate_up_proj,down_proj}_blocks`` (uint8 ``[E, 2I, H/32, 16]`` / ``[E, H, I/32, 16]``,
    two FP4 E2M1 values per byte) and ``..._scales`` (uint8 E8M0 ``[E, 2I, H/32]`` / ``[E, H, I/32]``) are read
    for this rank's E/R experts only (rows of dim 0), dequantized into ``dtype``
    (:func:`moekit.kernels.reference.mxfp4_dequant_ref`) and transposed into ``GptOssExperts``' ``[E, H, 2I]``
    / ``[E, I, H]``; everything else is stored bf16 and read as is. ``bytes_read`` counts what is stored
    (packed bytes + scales). The experts then run in ``dtype`` (no MXFP4 GEMM). transport, fp8: as in
    :func:`expert_parallel`. Collective over ``group``. Returns the model in eval mode.
    Raises ``ValueError`` for a missing directory or shards, an unsupported architecture or quantization
    (any other ``quant_method``; ``mxfp4`` for another architecture), an MXFP4 ``*_blocks`` key without its
    ``*_scales`` key or the reverse, missing tensors.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path_or_dir):
        raise ValueError(f"from_pretrained: path_or_dir must be a local checkpoint directory, got {path_or_dir!r}")
    config = AutoConfig.from_pretrained(path_or_dir, local_files_only=True)
    name, arch = architecture_of(config)
    quant = getattr(config, "quantization_config", None)
    is_mxfp4 = False
    if quant is not None:
        q = quant if isinstance(quant, dict) else quant.to_dict()
        method = q.get("quant_method")
        is_mxfp4 = method == "mxfp4" and arch.experts == "clamped_swiglu"
        if method != "fp8" and not is_mxfp4:
            raise ValueError(f"from_pretrained: quantization {method!r} is not supported for {name} (only "
                             f"DeepSeek-V3's block FP8, and gpt-oss's MXFP4 for GptOssForCausalLM)")
        # moekit dequantizes these itself: no HF FP8 linear layers / Mxfp4GptOssExperts, the plain modules'
        # shapes (gpt-oss: GptOssExperts' bf16 gate_up_proj [E, H, 2I], down_proj [E, I, H]).
        del config.quantization_config
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device if device is not None else "cpu")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if type(model).__name__ != name:
        raise ValueError(f"from_pretrained: config.architectures says {name}, transformers built "
                         f"{type(model).__name__}")
    files = _shard_files(path_or_dir)
    key_file: dict[str, str] = {}
    for f in files:
        with safe_open(f, framework="pt") as s:
            key_file.update({k: f for k in s.keys()})
    is_fp8 = any(k.endswith("weight_scale_inv") for k in key_file)
    if is_mxfp4:
        _check_mxfp4_pairs(key_file)
    if fp8 is None:
        h, i = config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        fp8 = is_fp8 and device.type == "cuda" and h % 128 == 0 and i % 128 == 0
    # Checkpoint names are the HF model's; the kept modules move under the moekit layers (the router under
    # `mlp.gate.router`): map each original name to where its tensor lives after expert_parallel.
    before = {**dict(model.named_parameters()), **{k: b for k, b in model.named_buffers() if k in
                                                   model.state_dict()}}
    expert_parallel(model, group, transport=transport, fp8=fp8)
    after = {id(t): k for k, t in [*model.named_parameters(), *model.named_buffers()]}
    renamed = {k: after[id(t)] for k, t in before.items() if id(t) in after}
    _materialize(model, device)
    model.to(device)  # buffers built on the CPU (e.g. rotary) follow the parameters
    moe_by_layer = {}
    for mname, m in model.named_modules():
        if isinstance(m, MoE):
            moe_by_layer[int(re.search(r"layers\.(\d+)\.", mname + ".").group(1))] = m
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    targets = {k: live[v] for k, v in renamed.items()}
    expert_re = re.compile(arch.expert_key)
    fused_re = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\w+)$")
    proj_of = dict(zip(arch.proj_names, _PROJ))
    loaded: set[int] = set()
    bytes_read = experts_read = experts_skipped = 0
    unexpected: list[str] = []
    handles: dict[str, Any] = {}

    def handle(f: str):
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f]

    def read(key: str, rows: slice | None = None) -> torch.Tensor:
        nonlocal bytes_read
        h = handle(key_file[key])
        t = h.get_slice(key)[rows] if rows is not None else h.get_tensor(key)
        bytes_read += t.numel() * t.element_size()
        scale_key = key + "_scale_inv"
        if scale_key in key_file:
            s = handle(key_file[scale_key]).get_tensor(scale_key)
            bytes_read += s.numel() * s.element_size()
            t = dequantize_block_fp8(t, s, dtype=torch.float32)
        return t

    def read_mxfp4(stem: str, rows: slice, dst_dtype: torch.dtype) -> torch.Tensor:
        """This rank's experts (``rows`` of dim 0) of gpt-oss's ``{stem}_blocks`` / ``{stem}_scales``,
        dequantized into ``dst_dtype`` and transposed to the parameter's ``[E_loc, in, out]``."""
        nonlocal bytes_read
        blocks = handle(key_file[stem + "_blocks"]).get_slice(stem + "_blocks")[rows]  # [E_loc, R, G, 16] uint8
        scales = handle(key_file[stem + "_scales"]).get_slice(stem + "_scales")[rows]  # [E_loc, R, G] uint8
        bytes_read += blocks.numel() * blocks.element_size() + scales.numel() * scales.element_size()
        # The checkpoint stores each expert's matrix output-rows first ([E, 2I, H] for gate_up, [E, H, I] for
        # down, blocks along the last dim), the transpose of GptOssExperts' [E, H, 2I] / [E, I, H]:
        # transformers' convert_moe_packed_tensors (transformers/integrations/mxfp4.py) transposes dims 1, 2.
        return mxfp4_dequant_ref(blocks, scales, dst_dtype).transpose(1, 2)

    def put(dst: torch.Tensor, value: torch.Tensor, key: str) -> None:
        if tuple(value.shape) != tuple(dst.shape):
            raise ValueError(f"from_pretrained: {key} has shape {list(value.shape)}, the model expects "
                             f"{list(dst.shape)}")
        with torch.no_grad():
            dst.copy_(value)
        loaded.add(id(dst))

    for key in key_file:
        if key.endswith("weight_scale_inv") or (is_mxfp4 and _MXFP4_KEY.match(key) and key.endswith(_MXFP4_SCALES)):
            continue  # read with their weight / blocks
        m = expert_re.match(key)
        if m and m.group(3) in proj_of:
            slot = _expert_slot(moe_by_layer, int(m.group(1)), int(m.group(2)))
            if slot is None:
                if int(m.group(1)) in moe_by_layer:
                    experts_skipped += 1
                else:
                    unexpected.append(key)
                continue
            moe, j = slot
            param = getattr(moe.experts, proj_of[m.group(3)])
            put(param[j], read(key), key)
            loaded.add(id(param))
            experts_read += 1
            continue
        m = fused_re.match(key)
        if m and int(m.group(1)) in moe_by_layer:
            moe = moe_by_layer[int(m.group(1))]
            lo, n, i = moe.expert_offset, moe.num_local_experts, moe.config.moe_intermediate_size
            if isinstance(moe.experts, ClampedSwiGLUExperts) and m.group(2) in ClampedSwiGLUExperts.PARAMS:
                put(getattr(moe.experts, m.group(2)), read(key, slice(lo, lo + n)), key)
                experts_read += n
                experts_skipped += moe.config.n_routed_experts - n
                continue
            if is_mxfp4 and isinstance(moe.experts, ClampedSwiGLUExperts) and _MXFP4_KEY.match(key):  # *_blocks
                param = getattr(moe.experts, m.group(2).removesuffix(_MXFP4_BLOCKS))
                put(param, read_mxfp4(key.removesuffix(_MXFP4_BLOCKS), slice(lo, lo + n), param.dtype), key)
                experts_read += n
                experts_skipped += moe.config.n_routed_experts - n
                continue
            if m.group(2) not in ("gate_up_proj", "down_proj"):
                unexpected.append(key)
                continue
            value = read(key, slice(lo, lo + n))
            if m.group(2) == "gate_up_proj":
                put(moe.experts.gate_proj, value[:, :i], key)
                put(moe.experts.up_proj, value[:, i:], key)
            else:
                put(moe.experts.down_proj, value, key)
            experts_read += n
            experts_skipped += moe.config.n_routed_experts - n
            continue
        target = key
        for a, b in arch.renames:
            target = target.replace(a, b)
        if target not in targets:  # (Mixtral's checkpoints name the block differently)
            unexpected.append(key)
            continue
        put(targets[target], read(key), key)
    handles.clear()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        loaded.add(id(model.get_output_embeddings().weight))
    missing = [k for k, t in [*model.named_parameters(), *targets.items()] if id(t) not in loaded]
    if missing:
        raise ValueError(f"from_pretrained: {len(missing)} tensors missing from {path_or_dir!r}, e.g. {missing[:5]}")
    expert_bytes = resident_expert_bytes(model)
    replicated = sum(p.numel() * p.element_size() for p in model.parameters() if not is_expert_param(p))
    replicated += sum(b.numel() * b.element_size() for b in model.buffers())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.moekit_load_stats = LoadStats(bytes_read, expert_bytes, replicated, experts_read,
                                        experts_skipped, tuple(unexpected), rss)
    return model.eval()


def resident_expert_bytes(model: nn.Module) -> int:
    """Bytes of the routed-expert parameters this rank holds (``moekit_expert`` parameters)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if is_expert_param(p))


def replicated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that is the same on all ranks (all but the routed experts)."""
    return [(n, p) for n, p in model.named_parameters() if not is_expert_param(p)]

