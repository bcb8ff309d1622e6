"""Timelines of a step: gather every rank's ``PhaseRecord``s and draw them.

``PhaseRecord`` and ``PHASES`` live in ``moekit.schedule.records`` (the planner's simulator emits them
without importing the runtime); they are re-exported here, where the recorder's users import them.
"""

from __future__ import annotations

from ..schedule.records import PHASES, PhaseRecord

__all__ = ["PHASES", "PhaseRecord", "gather_records", "plot_timeline"]


def gather_records(records: list[PhaseRecord], group=None) -> list[PhaseRecord]:
    """Every rank's records on every rank (``all_gather_object`` over ``group``; collective).

    Without an initialised process group it returns ``records`` unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(records)
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, list(records), group=group)
    return [r for part in parts for r in part]


# Colours in the spirit of DeepSeek's figure: forwards warm, backwards cool, weight-grads green;
# the second direction / chunk a darker shade of the same hue.
_COLORS = {
    ("F", 0): "#f9c77e", ("F", 1): "#e8943a",
    ("B", 0): "#9fc5e8", ("B", 1): "#4f8cc9",
    ("W", 0): "#a8d5a2", ("W", 1): "#5da35a",
    ("COMM", 0): "#d9d9d9", ("COMM", 1): "#b0b0b0",
}


def _mb(mb) -> str:
    return "" if mb is None or mb < 0 else str(mb)  # None / < 0: not known to the recorder


def plot_timeline(records: list[PhaseRecord], path, title: str | None = None, time_unit: str = "ms") -> None:
    """Draw ``records`` as a PNG at ``path``: one row per rank (rank 0 on top), one box per phase.

    F / B / W boxes are coloured by phase (darker for chunk 1) and labelled with their micro-batch;
    an F&B pair is one black-bordered box, its upper half the forward, its lower half the backward,
    labelled ``f/b``. ``COMM`` records (communication in flight) are drawn as thin grey bars under
    the row. Times are shown from the earliest start, in ``time_unit`` ("s", "ms" or "us").
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}.get(time_unit)
    if scale is None:
        raise ValueError(f"time_unit must be 's', 'ms' or 'us', got {time_unit!r}")
    if not records:
        raise ValueError("plot_timeline: no records to draw")
    t0 = min(r.start for r in records)
    t1 = max(r.end for r in records)
    span = max(t1 - t0, 1e-12) * scale
    ranks = sorted({r.rank for r in records})
    row = {rk: i for i, rk in enumerate(ranks)}
    height = 0.45 * len(ranks) + 1.4
    fig, ax = plt.subplots(figsize=(12, height), dpi=90)
    for rec in records:
        x = (rec.start - t0) * scale
        w = max((rec.end - rec.start) * scale, span * 1e-4)
        y = len(ranks) - 1 - row[rec.rank]
        if rec.phase == "COMM":
            ax.add_patch(Rectangle((x, y - 0.02), w, 0.1, color=_COLORS[("COMM", rec.chunk % 2)], lw=0))
            continue
        if rec.phase == "FB":
            cb = rec.chunk_b if rec.chunk_b is not None else rec.chunk
            ax.add_patch(Rectangle((x, y + 0.5), w, 0.4, color=_COLORS[("F", rec.chunk % 2)], lw=0))
            ax.add_patch(Rectangle((x, y + 0.1), w, 0.4, color=_COLORS[("B", cb % 2)], lw=0))
            ax.add_patch(Rectangle((x, y + 0.1), w, 0.8, fill=False, ec="black", lw=0.8))
            label = f"{_mb(rec.microbatch)}/{_mb(rec.microbatch_b)}"
        else:
            ax.add_patch(Rectangle((x, y + 0.1), w, 0.8, color=_COLORS.get((rec.phase, rec.chunk % 2), "#cccccc"),
                                   ec="white", lw=0.3))
            label = _mb(rec.microbatch)
        if w > span / 160:  # only where the number fits
            ax.text(x + w / 2, y + 0.5, label, ha="center", va="center", fontsize=6)
    ax.set_xlim(0, span)
    ax.set_ylim(-0.1, len(ranks))
    ax.set_yticks([len(ranks) - 1 - i + 0.5 for i in range(len(ranks))])
    ax.set_yticklabels([f"rank {rk}" for rk in ranks])
    ax.set_xlabel(f"time ({time_unit})")
    if title:
        ax.set_title(title, fontsize=10)
    present = {r.phase for r in records}
    handles = [Patch(color=_COLORS[("F", 0)], label="F"), Patch(color=_COLORS[("B", 0)], label="B"),
               Patch(color=_COLORS[("W", 0)], label="W"), Patch(color=_COLORS[("F", 1)], label="F chunk 1"),
               Patch(color=_COLORS[("B", 1)], label="B chunk 1")]
    if "FB" in present:
        handles.append(Patch(facecolor="white", edgecolor="black", label="F&B (f/b)"))
    if "COMM" in present:
        handles.append(Patch(color=_COLORS[("COMM", 1)], label="communication in flight"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))  # keep the bottom 0.3 inch for the legend
    fig.savefig(path)
    plt.close(fig)
