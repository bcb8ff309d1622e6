"""The planner: find and predict a cluster's MoE training step before renting it.

``search(model, cluster, fixed)`` -> ``SearchResult`` (the fastest layouts that fit, ranked by tokens/s
per GPU, and why the next ones lose); ``plan(model, cluster, ParallelPlan(...))`` -> ``PlanResult``
(per-layer bytes and times, the SM split, memory per GPU, per-step bubble, step time, MFU, tokens/s/GPU,
GPU-hours per trillion tokens); ``simulate`` is the discrete-event pipeline simulator behind both
(``moekit.schedule``, re-exported here with ``UniformCosts``; ``StageCosts`` is the planner's per-stage
cost model); ``moekit plan`` is the command line (``plan/cli.py``).
"""

from __future__ import annotations

from ..schedule import SCHEDULES, Simulation, UniformCosts, bubble_formula, programs, simulate
from .cluster import CLUSTER_PRESETS, ClusterSpec, ParallelPlan, load_cluster, load_plan
from .cost import StageCosts
from .memory import MemoryReport, activation_bytes
from .planner import LayerReport, PlanResult, StepReport, ep_sweep, plan, sm_sweep, smallest_hiding_sms
from .search import Candidate, SearchResult, search
from .sms import deepep_theoretical_sms, sm_table
from .spread import Routing, Spread, expected_spread, parse_routing

SimResult = Simulation  # the planner's earlier name of the simulator's result
rank_orders = programs  # the planner's earlier name of the per-rank programs

__all__ = [
    "CLUSTER_PRESETS", "Candidate", "ClusterSpec", "LayerReport", "MemoryReport", "ParallelPlan", "PlanResult",
    "Routing", "SCHEDULES", "SearchResult", "SimResult", "Spread", "StageCosts", "StepReport", "UniformCosts",
    "activation_bytes", "bubble_formula", "deepep_theoretical_sms", "ep_sweep", "expected_spread", "load_cluster",
    "load_plan", "parse_routing", "plan", "rank_orders", "search", "simulate", "sm_sweep", "sm_table",
    "smallest_hiding_sms",
]
