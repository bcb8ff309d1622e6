"""Schedule records: one ``PhaseRecord`` per op (or per transfer) of a step, measured or simulated.

The pipeline engine records them on a real run (``moekit.pipeline``), ``MoEStage`` records the pieces
of its overlapped pairs, and the simulator (``simulator.py``) emits them for a predicted step, so one
plot (``moekit.pipeline.plot_timeline``) draws all three.
"""

from __future__ import annotations

import dataclasses

# F = forward chunk, B = backward chunk (input grads, or full when W is not split), W = weight-grad
# chunk, FB = an overlapped forward+backward pair. Communication phases may use "COMM".
PHASES = ("F", "B", "W", "FB", "COMM")


@dataclasses.dataclass(frozen=True)
class PhaseRecord:
    """One phase of one rank: ``phase`` (one of ``PHASES``) of micro-batch ``microbatch`` through local
    model chunk ``chunk``, from ``start`` to ``end``; for ``FB`` also the backward's micro-batch and chunk."""

    rank: int
    phase: str
    chunk: int  # model chunk / direction: 0 or 1 (DualPipe), 0 for 1F1B
    microbatch: int  # for FB: the forward micro-batch; see microbatch_b
    start: float  # seconds (any common origin)
    end: float
    microbatch_b: int | None = None  # for FB: the backward micro-batch
    chunk_b: int | None = None  # for FB: the backward chunk
