"""``MoEConfig``: the MoE model's shape, with the field names of HF's ``DeepseekV3Config``.

moekit's own fields (``max_nodes_per_token``, ``bias_update_speed``, ``seq_aux_loss_alpha``,
``expert_backend``) sit beside HF's. Validation happens at construction and names the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._util import check_positive_int

_SCORING = ("sigmoid", "softmax")
_BACKENDS = ("torch", "fp8")


@dataclasses.dataclass
class MoEConfig:
    # --- HF DeepseekV3Config names (defaults: DeepSeek-V3 671B) ---
    hidden_size: int = 7168
    moe_intermediate_size: int = 2048
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    vocab_size: int = 129280
    rms_norm_eps: float = 1e-6
    # --- moekit's own ---
    max_nodes_per_token: int | None = None  # node-limited routing (DeepSeek-V3: 4); None = off
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing
    seq_aux_loss_alpha: float = 0.0001
    expert_backend: str = "torch"  # "torch" (bf16/fp32 grouped) or "fp8" (Triton FP8 grouped GEMM)
    dispatch_fp8: bool = False  # send dispatched rows in FP8 (1x128 power-of-two scales), as DeepSeek-V3
    # dtype of the expert GEMMs (routed and shared; torch backend): None = the parameters' dtype. With fp32
    # parameters and torch.bfloat16 here, the weights are fp32 master weights cast per call, the GEMMs
    # run in bf16 and the gradients reach the fp32 weights; the gate always stays fp32.
    compute_dtype: Any = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            check_positive_int(f"MoEConfig.{name}", getattr(self, name))

        for name in ("hidden_size", "moe_intermediate_size", "intermediate_size", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group", "num_hidden_layers",
                     "num_attention_heads", "vocab_size"):
            positive(name)
        if self.n_shared_experts < 0:
            raise ValueError(f"MoEConfig.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.scoring_func not in _SCORING:
            raise ValueError(f"MoEConfig.scoring_func must be one of {_SCORING}, got {self.scoring_func!r}")
        if self.expert_backend not in _BACKENDS:
            raise ValueError(f"MoEConfig.expert_backend must be one of {_BACKENDS}, got {self.expert_backend!r}")
        if self.expert_backend == "fp8":
            for name in ("hidden_size", "moe_intermediate_size"):
                if getattr(self, name) % 128 != 0:
                    raise ValueError(f"MoEConfig.{name} ({getattr(self, name)}) must be a multiple of 128 with "
                                     f"expert_backend='fp8' (1x128 / 128x128 scaling blocks)")
        if self.dispatch_fp8 and self.hidden_size % 128 != 0:
            raise ValueError(f"MoEConfig.hidden_size ({self.hidden_size}) must be a multiple of 128 with "
                             f"dispatch_fp8=True (1x128 scaling tiles)")
        if self.n_routed_experts % self.n_group != 0:
            raise ValueError(f"MoEConfig.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                             f"n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"MoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts that "
                f"topk_group ({self.topk_group}) groups of {per_group} hold ({self.topk_group * per_group})")
        if self.n_group > 1 and per_group < 2:
            # The group score is the sum of the top-2 scores of the group.
            raise ValueError(f"MoEConfig: each of the n_group ({self.n_group}) groups needs >= 2 experts, "
                             f"got {per_group}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"MoEConfig.first_k_dense_replace ({self.first_k_dense_replace}) must be in "
                             f"[0, num_hidden_layers={self.num_hidden_layers}]")
        check_positive_int("MoEConfig.max_nodes_per_token", self.max_nodes_per_token, none_ok=True)
        if self.bias_update_speed < 0:
            raise ValueError(f"MoEConfig.bias_update_speed must be >= 0, got {self.bias_update_speed}")
        if self.seq_aux_loss_alpha < 0:
            raise ValueError(f"MoEConfig.seq_aux_loss_alpha must be >= 0, got {self.seq_aux_loss_alpha}")
        self.compute_dtype = _compute_dtype(self.compute_dtype)

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def check_ep(self, ep_size: int, ranks_per_node: int | None = None) -> None:
        """Raise ``ValueError`` unless the routed experts shard evenly over ``ep_size`` ranks and, with
        node-limited routing, every token still finds ``num_experts_per_tok`` candidate experts.

        ``ranks_per_node=None`` means one node (node-limited routing is then a no-op).
        """
        check_positive_int("EP size", ep_size)
        if self.n_routed_experts % ep_size != 0:
            raise ValueError(f"MoEConfig.n_routed_experts ({self.n_routed_experts}) must be divisible by the "
                             f"EP size ({ep_size})")
        rpn = ep_size if ranks_per_node is None else ranks_per_node
        if rpn < 1 or ep_size % rpn != 0:
            raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide the EP size ({ep_size})")
        nodes = ep_size // rpn
        if self.max_nodes_per_token is None or self.max_nodes_per_token >= nodes:
            return
        per_node = self.n_routed_experts // nodes
        limits = self.routing_limits(nodes)
        if len(limits) == 2:
            per_group = self.experts_per_group
            if per_node % per_group != 0 and per_group % per_node != 0:
                raise ValueError(
                    f"MoEConfig.max_nodes_per_token ({self.max_nodes_per_token}) with n_group ({self.n_group}) "
                    f"needs groups and nodes that nest: {per_group} experts per group vs {per_node} per node")
        if self.num_experts_per_tok > self.guaranteed_candidates(nodes):
            raise ValueError(
                f"MoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts a token can "
                f"still choose with max_nodes_per_token ({self.max_nodes_per_token}) of {nodes} nodes "
                f"({per_node} experts each), topk_group ({self.topk_group}) of n_group ({self.n_group}): "
                f"{self.guaranteed_candidates(nodes)}")

    def routing_limits(self, num_nodes: int = 1) -> list[tuple[int, int]]:
        """The block limits of the gate, coarsest first: ``[(num_blocks, blocks_kept), ...]``.

        Groups (``n_group``/``topk_group``) and nodes (``num_nodes``/``max_nodes_per_token``) are both
        contiguous equal blocks of experts; a limit that keeps every block is left out. Applying the
        coarser limit first means the finer one always sees whole blocks (validated by :meth:`check_ep`).
        """
        limits = []
        if self.n_group > 1 and self.topk_group < self.n_group:
            limits.append((self.n_group, self.topk_group))
        m = self.max_nodes_per_token
        if num_nodes > 1 and m is not None and m < num_nodes:
            limits.append((num_nodes, m))
        limits.sort(key=lambda nk: nk[0])
        if len(limits) == 2 and limits[0][0] == limits[1][0]:  # same partition: the tighter limit wins
            limits = [(limits[0][0], min(limits[0][1], limits[1][1]))]
        return limits

    def guaranteed_candidates(self, num_nodes: int = 1) -> int:
        """The fewest experts any token can still choose from after the block limits (see ``routing_limits``)."""
        avail_blocks, size = 1, self.n_routed_experts  # blocks still open and their size
        for nb, keep in self.routing_limits(num_nodes):
            new_size = self.n_routed_experts // nb
            open_blocks = avail_blocks * (size // new_size)
            avail_blocks, size = min(keep, open_blocks), new_size
        return avail_blocks * size

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> MoEConfig:
        """Build from a HF ``DeepseekV3Config`` (or any object / dict with its field names).

        Unknown fields are ignored; ``overrides`` set moekit's own fields (or replace HF ones).
        """
        src = config if isinstance(config, dict) else (
            config.to_dict() if hasattr(config, "to_dict") else vars(config))
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in src.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MoEConfig:
        """``"deepseek-v3"`` (the 671B shape) or ``"tiny"`` (tests and the demo)."""
        if name not in PRESETS:
            raise ValueError(f"unknown MoEConfig preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_COMPUTE_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                   "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def _compute_dtype(value: Any):
    """None, or a float torch dtype from a dtype or its name ("bfloat16", "torch.bfloat16", "bf16", ...)."""
    if value is None:
        return None
    import torch  # lazy: the config module stays importable without torch

    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
    else:
        name = None
    if name not in _COMPUTE_DTYPES:
        raise ValueError(f"MoEConfig.compute_dtype must be None, torch.bfloat16, torch.float16 or torch.float32 "
                         f"(or their names), got {value!r}")
    return getattr(torch, _COMPUTE_DTYPES[name])


PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": {},
    # Qwen3-235B-A22B (its HF config.json): 94 layers, H 4096, 64 query heads of 128, 4 KV heads, 128
    # experts (top-8) of 1536, no shared expert, vocab 151936. Its GQA attention is written in MLA's
    # fields for the planner: no q latent, rope dim 0, and kv_lora_rank 205 so that the K/V projection
    # (H x 205 + 205 x 64 x 256) has GQA's H x 1024 parameters and FLOPs (within 0.1%).
    "qwen3-235b": dict(
        hidden_size=4096, moe_intermediate_size=1536, intermediate_size=12288, n_routed_experts=128,
        n_shared_experts=0, num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        scoring_func="softmax", num_hidden_layers=94, first_k_dense_replace=0, num_attention_heads=64,
        q_lora_rank=None, kv_lora_rank=205, qk_nope_head_dim=128, qk_rope_head_dim=0, v_head_dim=128,
        vocab_size=151936, rms_norm_eps=1e-6,
    ),
    "tiny": dict(
        hidden_size=64, moe_intermediate_size=32, intermediate_size=128, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=256,
        bias_update_speed=0.001,
    ),
}
