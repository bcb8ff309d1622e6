"""The pipeline bubbles of DeepSeek's DualPipe README, for uniform stage costs.

The table of deepseek-ai/DualPipe's README (B there is the *full* backward, input gradients + W):
1F1B ``(PP-1)(F+B)``; DualPipe ``(PP/2-1)(F&B+B-3W)``; DualPipeV, whose PP counts its ``2P`` stages on
``P`` devices, ``(P-1)(F&B+B-3W)``. Interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", SC'21, sec. 2.2) has 1F1B's bubble with the F and B
of its V-times smaller chunk.

``simulate`` reproduces them exactly as the largest per-rank idle time when stage costs are uniform,
point-to-point is free, ``F == B_in``, ``W <= F`` and ``max(F, B) <= F&B <= F + B``
(tests/schedule/test_simulator.py); outside that regime they are approximations (they go negative
for a large W, for one).
"""

from __future__ import annotations

from .ops import SCHEDULES


def bubble_formula(schedule: str, num_ranks: int, f: float, b: float, w: float, fb: float) -> float:
    """The README's bubble of ``schedule`` on ``num_ranks`` pipeline ranks.

    Args:
        schedule: one of ``SCHEDULES``.
        num_ranks: pipeline ranks (devices; DualPipeV's stages are ``2 * num_ranks``).
        f, b, w: forward, input-gradient backward and weight-gradient seconds of one stage and one
            micro-batch (for ``interleaved``: of one chunk, 1/V of a 1F1B stage).
        fb: seconds of an overlapped forward + full backward pair (unused by 1F1B).

    Returns:
        The bubble (idle time) of the busiest rank, in the units of the arguments.
    """
    full = b + w  # the formulas' B
    if schedule in ("1f1b", "interleaved"):
        return (num_ranks - 1) * (f + full)
    if schedule == "dualpipe":
        return (num_ranks // 2 - 1) * (fb + full - 3 * w)
    if schedule == "dualpipev":
        return (num_ranks - 1) * (fb + full - 3 * w)
    raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {schedule!r}")
