"""What one GPU holds during a training step: model state, activations of the micro-batches in flight,
EP buffers. Bytes (1 GB = 1e9 bytes in reports).

**Model state** (per parameter on the GPU; ZeRO-1 as DeepSeek-V3 trains, report sec. 3.2 and 3.3.3):
bf16 weights (2) and fp32 gradients (4, kept for gradient accumulation) on every replica; fp32 master
weights (4) and the two AdamW moments in bf16 (2 + 2) sharded over the data-parallel replicas of that
parameter (``dp`` for the non-expert part, ``dp / ep`` for experts).

**Activations** kept for the backward, per token of one layer (``activation_bytes``). ``c`` is the byte
width of a cached GEMM input: 1 + 4/128 for FP8 (1x128 tiles with an fp32 scale, DeepSeek-V3 sec.
3.3.3 "Low-Precision Storage"), 2 for bf16; the attention output that feeds ``o_proj`` is kept in
E5M6 (1.5 bytes) under FP8 (same section).

- always (bf16): the layer input and the post-attention residual (``2H``, inputs of the two RMSNorms),
  the MLA latents ``q_lora + kv_lora + d_rope``, the softmax statistics ``4 nh``; MoE: fp32 gate
  scores ``4E``;
- the attention output ``nh dv`` (input of ``o_proj``);
- GEMM inputs cached for weight gradients (``c`` each): the RMSNorm outputs (``H`` twice, ``q_lora``,
  ``kv_lora``), the routed rows ``k H`` on the receiving GPU (times the busiest rank's imbalance),
  SwiGLU inputs ``(k + n_shared) 2I`` and outputs ``(k + n_shared) I`` (dense layer: ``2I`` and ``I``);
- the attention core's inputs Q, K, V (``nh (dn+dr)`` twice and ``nh dv``, bf16), the MLA up-projection
  outputs.

The routing weights are assumed applied to the SwiGLU output before the down-projection (the gradient
of a weight then needs only what SwiGLU recomputation gives back); applied after, the expert outputs
``k H`` bf16 would be kept too.

``recompute``: ``"none"`` keeps all of the above. ``"selective"`` is DeepSeek-V3 sec. 3.2.3 (recompute
every RMSNorm and the MLA up-projections in the backward) plus sec. 3.3.3 (cache SwiGLU inputs,
recompute its output): it drops the RMSNorm outputs, Q/K/V and the SwiGLU outputs, for the extra
forward work ``plan/cost.py`` charges (up-projection GEMMs, norms, SwiGLU). ``"full"`` keeps only each
layer's input and reruns the whole forward of a stage in its backward; one layer's full activations
are live at a time during that rerun.

**In flight**: the op order of each rank (``moekit.schedule.programs``) is walked; a forward adds its
stage's activations, a full backward frees them, an input-gradient backward (``split``) frees the
bf16 part and the matching ``W`` the cached GEMM inputs. The peak over ranks is what must fit; for
uniform stages it is ``min(P, N)`` stage-activations on rank 0 for 1F1B and ``P + 1`` for DualPipe
(the DualPipe README's table), which ``tests/plan/test_memory.py`` checks.

**EP buffers**: the receive buffer of a dispatch (one row per destination rank of a token, FP8 or
bf16, plus top-k metadata) and the bf16 combine buffer, for each EP transfer that can be in flight at
once (two for the overlapped schedules, whose F&B pairs run one micro-batch's dispatch beside the
other's combine; one for 1F1B).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from ..config import MoEConfig
from ..schedule import placement as _placement
from ..schedule import programs

FP8_BYTES = 1 + 4 / 128  # one byte per element + an fp32 scale per 1x128 tile
E5M6_BYTES = 1.5
STATE_BYTES_REPLICATED = 2 + 4  # bf16 weights + fp32 gradients
STATE_BYTES_SHARDED = 4 + 2 + 2  # fp32 master + bf16 Adam moments (ZeRO-1)


class ActivationBytes(NamedTuple):
    """Bytes per token of one layer kept for the backward: ``bf16`` (inputs of norms, latents,
    attention inputs and output, softmax statistics, gate scores) and ``cache`` (GEMM inputs kept for
    the weight gradients, FP8 under FP8 GEMMs). ``working``: extra bytes live while the layer's
    backward reruns its forward (``recompute="full"`` only)."""

    bf16: float
    cache: float
    working: float = 0.0

    @property
    def total(self) -> float:
        return self.bf16 + self.cache


def activation_bytes(cfg: MoEConfig, *, dense: bool, gemm_dtype: str, recompute: str,
                     imbalance: float = 1.0) -> ActivationBytes:
    """Per-token activation bytes of one transformer layer (see the module docstring for each term)."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ql, kvl = cfg.q_lora_rank or 0, cfg.kv_lora_rank
    fp8 = gemm_dtype == "fp8"
    c = FP8_BYTES if fp8 else 2.0
    keep = 2.0 * (2 * h + ql + kvl + dr) + 4.0 * nh + (E5M6_BYTES if fp8 else 2.0) * nh * dv
    norms = c * (2 * h + ql + kvl)
    qkv = 2.0 * (2 * nh * (dn + dr) + nh * dv)
    if dense:
        inter, rows, routed, scores = cfg.intermediate_size, 1, 0.0, 0.0
    else:
        k = cfg.num_experts_per_tok
        inter, rows = cfg.moe_intermediate_size, cfg.num_experts_per_tok + cfg.n_shared_experts
        routed, scores = c * k * h * imbalance, 4.0 * cfg.n_routed_experts
    swiglu_in = c * rows * 2 * inter
    swiglu_out = c * rows * inter
    full = ActivationBytes(keep + qkv + scores, norms + routed + swiglu_in + swiglu_out)
    if recompute == "none":
        return full
    if recompute == "selective":
        return ActivationBytes(keep + scores, routed + swiglu_in)
    if recompute == "full":
        return ActivationBytes(2.0 * h, 0.0, working=full.total)
    raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")


class StageMemory(NamedTuple):
    """Activation bytes of one micro-batch through one pipeline stage: ``bf16`` and ``cache`` parts and
    the ``working`` set of full recomputation (largest layer of the stage)."""

    bf16: float
    cache: float
    working: float


class Peak(NamedTuple):
    """A rank's peak activation bytes and the cached-GEMM-input part of it at that moment."""

    total: float
    cache: float


@lru_cache(maxsize=512)
def inflight_states(schedule: str, pp: int, n: int) -> tuple[tuple[tuple[tuple[int, ...], tuple[int, ...], bool], ...],
                                                               ...]:
    """For each rank, the candidate peak moments of the in-flight walk as ``(bf16 counts per chunk,
    cache counts per chunk, working set live)``, dominated moments removed. The peak bytes of any stage
    sizes is then the largest of a few dot products (``peak_activations``), so the walk over the op
    order runs once per (schedule, pp, n), not once per plan."""
    placement = _placement(schedule, pp)
    chunks = 1 + max(c for _, c in placement.stage_of)
    out = []
    for order in programs(schedule, pp, n):
        hb, hc = [0] * chunks, [0] * chunks
        states = set()
        wq: list[int] = []
        for op in order:
            if op.kind in ("F", "FB"):
                hb[op.chunk] += 1
                hc[op.chunk] += 1
                states.add((tuple(hb), tuple(hc), op.kind == "FB"))
            if op.kind in ("B", "FB"):
                cb = op.chunk if op.kind == "B" else op.chunk_b
                states.add((tuple(hb), tuple(hc), True))
                hb[cb] -= 1
                if op.kind == "B" and op.split:
                    wq.append(cb)
                else:
                    hc[cb] -= 1
            if op.kind == "W":
                hc[wq.pop(0)] -= 1
        keep = [s for s in states if not any(t != s and all(x <= y for x, y in zip(s[0] + s[1], t[0] + t[1]))
                                             and s[2] <= t[2] for t in states)]
        out.append(tuple(sorted(keep)))
    return tuple(out)


def peak_activations(schedule: str, pp: int, n: int, stages: list[StageMemory]) -> list[Peak]:
    """Peak activation bytes on each pipeline rank over one step (the in-flight walk of the module
    docstring). ``stages[s]``: per-micro-batch bytes of pipeline stage ``s`` (one direction's stages;
    DualPipe's second direction mirrors the first)."""
    placement = _placement(schedule, pp)
    if len(stages) != placement.num_stages:
        raise ValueError(f"need {placement.num_stages} stages for {schedule} on pp={pp}, got {len(stages)}")
    peaks = []
    for r, states in enumerate(inflight_states(schedule, pp, n)):
        chunks = sorted(c for (rr, c) in placement.stage_of if rr == r)
        st = [stages[placement.stage_of[(r, c)][1]] for c in chunks]
        working = max(x.working for x in st)
        best = Peak(0.0, 0.0)
        for hb, hc, w in states:
            cache = sum(k * x.cache for k, x in zip(hc, st))
            total = sum(k * x.bf16 for k, x in zip(hb, st)) + cache + (working if w else 0.0)
            if total > best.total:
                best = Peak(total, cache)
        peaks.append(best)
    return peaks


def ep_buffer_bytes(cfg: MoEConfig, tokens: int, ranks_per_token: float, fp8_dispatch: bool,
                    overlapped: bool) -> float:
    """EP staging buffers: dispatch receive + combine buffers of ``tokens`` tokens, each sent to
    ``ranks_per_token`` ranks on average; two transfers in flight when ``overlapped``."""
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    row = (h * FP8_BYTES if fp8_dispatch else 2 * h) + k * (8 + 4) + 2 * h
    return (2 if overlapped else 1) * tokens * ranks_per_token * row


class MemoryReport(NamedTuple):
    """Bytes on the fullest GPU (1e9 bytes = 1 GB in reports).

    weights / grads / optimizer: model state (ZeRO-1); activations: peak bytes of the micro-batches in
    flight (``activations_cache`` of it are cached GEMM inputs, FP8 under FP8 GEMMs); ep_buffers:
    dispatch/combine staging; total; capacity (``cluster.hbm_gb``); fits: ``total <= capacity``;
    inflight_microbatches: the peak expressed in micro-batches of the fullest rank's largest stage.
    """

    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_cache: float
    ep_buffers: float
    total: float
    capacity: float
    fits: bool
    inflight_microbatches: float
