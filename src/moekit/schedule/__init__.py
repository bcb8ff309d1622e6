"""The schedule model shared by the pipeline runtime and the planner, torch-free.

- ``ops``: ``Op``, the stage placement (``placement``, ``stage_graph``), ``check_schedule`` and the per-rank
  programs of 1F1B, interleaved 1F1B, DualPipe and DualPipeV (``program``, ``programs``);
- ``simulator``: the discrete-event simulator (``simulate`` -> ``Simulation``) over a pluggable cost
  model (``CostModel``, ``OpTiming``, ``UniformCosts``), with the global p2p message order (``Message``);
- ``records``: ``PhaseRecord`` and ``PHASES``, what the runtime records and the simulator emits;
- ``bubbles``: the bubble formulas of DeepSeek's DualPipe README (``bubble_formula``).

``moekit.pipeline`` runs the programs, ``moekit.plan`` simulates them with its per-stage costs.
"""

from __future__ import annotations

from .bubbles import bubble_formula
from .ops import (
    INTERLEAVE,
    SCHEDULES,
    Op,
    Placement,
    Stage,
    StageLinks,
    check_schedule,
    microbatches_per_direction,
    placement,
    program,
    programs,
    stage_graph,
)
from .records import PHASES, PhaseRecord
from .simulator import CostModel, Message, OpTiming, Simulation, UniformCosts, sim_records, simulate

__all__ = [
    "INTERLEAVE", "PHASES", "SCHEDULES", "CostModel", "Message", "Op", "OpTiming", "PhaseRecord", "Placement",
    "Simulation", "Stage", "StageLinks", "UniformCosts", "bubble_formula", "check_schedule",
    "microbatches_per_direction", "placement", "program", "programs", "sim_records", "simulate", "stage_graph",
]
