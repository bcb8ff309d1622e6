"""Schedule records shared by the pipeline recorder and the planner's simulator."""

from __future__ import annotations

import dataclasses

# F = forward chunk, B = backward chunk (input grads, or full when W is not split), W = weight-grad
# chunk, FB = an overlapped forward+backward pair. Communication phases may use "COMM".
PHASES = ("F", "B", "W", "FB", "COMM")


@dataclasses.dataclass(frozen=True)
class PhaseRecord:
    rank: int
    phase: str
    chunk: int  # model chunk / direction: 0 or 1 (DualPipe), 0 for 1F1B
    microbatch: int  # for FB: the forward micro-batch; see microbatch_b
    start: float  # seconds (any common origin)
    end: float
    microbatch_b: int | None = None  # for FB: the backward micro-batch
    chunk_b: int | None = None  # for FB: the backward chunk
