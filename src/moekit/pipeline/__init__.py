"""Pipeline parallelism: DualPipe, DualPipeV and 1F1B on one schedule engine, any device and backend.

Drop-in for DeepSeek's DualPipe package (``from moekit.pipeline import DualPipe, DualPipeV,
WeightGradStore, run_backward, set_p2p_tensor_shapes, set_p2p_tensor_dtype``), plus ``OneFOneB``,
schedule recording (``PhaseRecord``) and ``plot_timeline``, the schedule simulator (``moekit.schedule``),
and ``MoEStage`` (MoE-aware overlapped forward/backward pairs). See docs/pipeline.md.
"""

from ..schedule import PhaseRecord, UniformCosts, sim_records, simulate
from .engine import DualPipe, DualPipeV, OneFOneB, PipelineSchedule
from .moe_overlap import MoEBlock, MoEStage
from .p2p import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from .timeline import gather_records, plot_timeline
from .utils import WeightGradStore, backward_chunk, run_backward

# The uniform cost model under its earlier name and signature here: Durations(F, B, W, FB) with B the
# full backward (UniformCosts takes the input-gradient part).
Durations = UniformCosts.from_full_backward

__all__ = [
    "DualPipe", "DualPipeV", "Durations", "MoEBlock", "MoEStage", "OneFOneB", "PhaseRecord", "PipelineSchedule",
    "WeightGradStore", "backward_chunk", "gather_records", "plot_timeline", "run_backward", "set_p2p_tensor_dtype",
    "set_p2p_tensor_shapes", "sim_records", "simulate",
]
