"""Pipeline parallelism: DualPipe, DualPipeV and 1F1B on one schedule engine, any device and backend.

Drop-in for DeepSeek's DualPipe package (``from moekit.pipeline import DualPipe, DualPipeV,
WeightGradStore, run_backward, set_p2p_tensor_shapes, set_p2p_tensor_dtype``), plus ``OneFOneB``,
schedule recording (``PhaseRecord``) and ``plot_timeline``, the schedule simulator, and ``MoEStage``
(MoE-aware overlapped forward/backward pairs). See docs/pipeline.md.
"""

from .engine import DualPipe, DualPipeV, OneFOneB, PipelineSchedule
from .moe_overlap import MoEBlock, MoEStage
from .p2p import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from .schedules import Durations, sim_records, simulate
from .timeline import PhaseRecord, gather_records, plot_timeline
from .utils import WeightGradStore, run_backward

__all__ = [
    "DualPipe", "DualPipeV", "Durations", "MoEBlock", "MoEStage", "OneFOneB", "PhaseRecord", "PipelineSchedule",
    "WeightGradStore", "gather_records", "plot_timeline", "run_backward", "set_p2p_tensor_dtype",
    "set_p2p_tensor_shapes", "sim_records", "simulate",
]
