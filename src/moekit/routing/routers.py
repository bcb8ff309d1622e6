"""Routers of the MoE families other than DeepSeek-V3's gate, behind the :class:`~moekit.routing.GateOutput`
contract that :class:`moekit.MoE` consumes.

Shape legend: T = tokens, H = hidden size, E = routed experts, K = experts per token.

Two routing rules cover the models people run (see docs/hf.md for the table per architecture):

- ``"sigmoid_group"``: sigmoid scores, ``e_score_correction_bias`` added for the choice only, group-limited
  top-K, weights normalised and scaled (DeepSeek-V3 report, section 2.1; also Kimi-K2 and GLM-4.5, whose HF
  routers ``DeepseekV3TopkRouter`` / ``Glm4MoeTopkRouter`` compute the same thing).
- ``"softmax_topk"``: softmax over all E logits in fp32, top-K, optionally renormalised to sum 1 (HF's
  ``Qwen3MoeTopKRouter`` with ``norm_topk_prob``, ``MixtralTopKRouter`` always). gpt-oss's router (top-K of
  the logits, softmax over those K) is the same rule with renormalisation: softmax restricted to the chosen K
  equals the full softmax renormalised over them.

:class:`LogitsRouter` takes the *model's own* router module for the logits: a transformers router returns
``(router_logits, weights, indices)``, and calling it keeps what transformers records from it (the
``router_logits`` of ``output_router_logits=True``, through its forward hooks). moekit then chooses the
experts from those logits with :func:`moekit.routing.gate.route`, so that the aux-loss-free bias and
node-limited routing apply to every family, and the softmax families get a selection bias (zero, i.e. the
model's routing, until balancing moves it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..config import MoEConfig
from .gate import GateOutput, route

RouterKind = Literal["sigmoid_group", "softmax_topk"]
ROUTER_KINDS: tuple[str, ...] = ("sigmoid_group", "softmax_topk")


def scores_from_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The ``[T, E]`` fp32 affinity scores of a router kind from its ``[T, E]`` logits (any float dtype)."""
    if kind == "sigmoid_group":
        return logits.float().sigmoid()
    if kind == "softmax_topk":
        return logits.float().softmax(dim=-1)
    raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")


def routing_config(kind: str, *, num_experts: int, top_k: int, hidden_size: int, norm_topk_prob: bool,
                   n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
                   **fields) -> dict:
    """The :class:`MoEConfig` routing fields of a router kind (``fields`` add the experts' shape etc.)."""
    if kind not in ROUTER_KINDS:
        raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")
    return dict(hidden_size=hidden_size, n_routed_experts=num_experts, num_experts_per_tok=top_k,
                n_group=n_group if kind == "sigmoid_group" else 1,
                topk_group=topk_group if kind == "sigmoid_group" else 1,
                routed_scaling_factor=routed_scaling_factor if kind == "sigmoid_group" else 1.0,
                norm_topk_prob=norm_topk_prob, scoring_func="sigmoid" if kind == "sigmoid_group" else "softmax",
                **fields)


class LogitsRouter(nn.Module):
    """A model's own router (``router``: a module mapping ``x [T, H]`` to ``router_logits [T, E]``, or to a
    tuple whose first element they are) followed by moekit's expert choice for ``kind``.

    ``e_score_correction_bias`` ``[E]`` fp32 is the router's own buffer when it has one (DeepSeek-V3,
    GLM-4.5: loaded from the checkpoint), else a zero buffer of this module (not in the state dict, so the
    model's checkpoint format is unchanged); :func:`moekit.routing.balance.update_bias` moves either.
    ``num_nodes`` serves node-limited routing (``config.max_nodes_per_token``), as in :class:`Gate`.
    ``last``: the :class:`GateOutput` of the latest forward (for blocks that also return their routing
    weights, as gpt-oss's does).
    """

    def __init__(self, router: nn.Module, kind: str, config: MoEConfig, num_nodes: int = 1):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"LogitsRouter: kind must be one of {ROUTER_KINDS}, got {kind!r}")
        expected = "sigmoid" if kind == "sigmoid_group" else "softmax"
        if config.scoring_func != expected:
            raise ValueError(f"LogitsRouter: kind {kind!r} needs config.scoring_func={expected!r}, "
                             f"got {config.scoring_func!r}")
        config.check_ep(num_nodes, 1)
        self.router, self.kind, self.config, self.num_nodes = router, kind, config, num_nodes
        own = getattr(router, "e_score_correction_bias", None)
        if not isinstance(own, torch.Tensor):
            dev = next(iter(router.parameters())).device if any(True for _ in router.parameters()) else None
            self.register_buffer("_bias", torch.zeros(config.n_routed_experts, device=dev), persistent=False)
        self.last: GateOutput | None = None

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        own = getattr(self.router, "e_score_correction_bias", None)
        return own if isinstance(own, torch.Tensor) else self._bias

    def reset_parameters(self) -> None:
        """Nothing to draw: the router's weights are the model's (``MoE.reset_parameters`` calls this)."""

    def forward(self, x: torch.Tensor) -> GateOutput:
        """x: ``[T, H]``. Returns :class:`GateOutput` (topk_idx ``[T, K]`` int64, topk_weights ``[T, K]`` fp32,
        scores ``[T, E]`` fp32); differentiable w.r.t. the router's weights through the scores. No host sync."""
        if x.dim() != 2 or x.shape[1] != self.config.hidden_size:
            raise ValueError(f"LogitsRouter: x must be [T, {self.config.hidden_size}], got {list(x.shape)}")
        out = self.router(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out  # [T, E]
        scores = scores_from_logits(logits, self.kind)
        topk_idx, topk_weights = route(scores, self.e_score_correction_bias, self.config, self.num_nodes)
        self.last = GateOutput(topk_idx, topk_weights, scores)
        return self.last

    def extra_repr(self) -> str:
        c = self.config
        return f"kind={self.kind}, experts={c.n_routed_experts}, top_k={c.num_experts_per_tok}"
