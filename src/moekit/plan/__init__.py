"""The planner: predict a cluster's MoE training step before renting it.

``plan(model, cluster, ParallelPlan(...))`` -> ``PlanResult`` (per-layer bytes and times, the SM split,
per-step bubble, step time, MFU, tokens/s/GPU, GPU-hours per trillion tokens); ``simulate`` is the
discrete-event pipeline simulator behind it; ``moekit plan`` is the command line (``plan/cli.py``).
"""

from __future__ import annotations

from .cluster import CLUSTER_PRESETS, ClusterSpec, ParallelPlan, load_cluster, load_plan
from .planner import LayerReport, PlanResult, StepReport, ep_sweep, plan, sm_sweep, smallest_hiding_sms
from .routing import Routing, Spread, expected_spread, parse_routing
from .schedules import SCHEDULES, bubble_formula, rank_orders
from .sim import SimResult, StageCosts, UniformCosts, simulate

__all__ = [
    "CLUSTER_PRESETS", "ClusterSpec", "LayerReport", "ParallelPlan", "PlanResult", "Routing", "SCHEDULES",
    "SimResult", "Spread", "StageCosts", "StepReport", "UniformCosts", "bubble_formula", "ep_sweep",
    "expected_spread", "load_cluster", "load_plan", "parse_routing", "plan", "rank_orders", "simulate",
    "sm_sweep", "smallest_hiding_sms",
]
