"""moekit: DeepSeek-V3's MoE stack for every PyTorch user.

Public names are imported lazily, so that ``import moekit`` stays cheap and a missing optional
piece does not break the rest.
"""

from __future__ import annotations

import importlib

from . import platform  # noqa: F401  (first: chooses Triton's mode before any kernel module)
from .config import MoEConfig

__version__ = "0.1.0"

_LAZY = {
    "Buffer": "moekit.ep.buffer",
    "EventOverlap": "moekit.ep.event",
    "MoE": "moekit.moe.layer",
    "Gate": "moekit.routing.gate",
    "rebalance_experts": "moekit.routing.eplb",
    "ClusterSpec": "moekit.plan",
    "ParallelPlan": "moekit.plan",
}

__all__ = ["MoEConfig", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
