"""Routing: the DeepSeek-V3 gate, load balancing and EPLB."""

from . import balance  # noqa: F401
from .eplb import rebalance_experts
from .gate import Gate, GateOutput, route

__all__ = ["Gate", "GateOutput", "route", "rebalance_experts", "balance"]
