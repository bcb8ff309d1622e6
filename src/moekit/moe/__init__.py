"""The DeepSeek-V3 MoE layer: :class:`MoE` (gate -> dispatch -> grouped experts -> combine -> + shared)."""

from .experts import MLP, RoutedExperts
from .layer import MoE, is_expert_param, moe_layers, sync_grads, update_moe_biases

__all__ = ["MLP", "MoE", "RoutedExperts", "sync_grads", "is_expert_param", "moe_layers",
           "update_moe_biases"]
