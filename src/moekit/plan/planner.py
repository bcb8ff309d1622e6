"""``plan()``: from a model, a cluster and a parallel plan to per-layer and per-step predictions.

Pipeline: routing -> expected fan-out (``routing.py``) -> bytes and times of one MoE layer
(``cost.py``) -> the smallest comm SM count that hides communication under the overlapped F&B pair
(``auto``) -> layers cut into balanced pipeline stages -> ``simulate`` one step -> + data-parallel
gradient sync and optimizer -> step time, MFU, tokens/s/GPU, GPU-hours per trillion tokens.
"""

from __future__ import annotations

from typing import NamedTuple

from ..config import MoEConfig
from .cluster import ClusterSpec, ParallelPlan
from .cost import (
    CommBytes,
    CommTimes,
    LayerTimes,
    comm_bytes,
    compute_parts,
    head_times,
    layer_params,
    layer_times,
    step_flops_per_token,
    transfer_time,
)
from .routing import Routing, Spread, expected_spread, parse_routing
from .schedules import Layout, bubble_formula, layout
from .sim import SimResult, StageCosts, simulate, two_stream


class LayerReport(NamedTuple):
    """One MoE layer, one micro-batch (``tokens`` tokens), one GPU; seconds and bytes.

    bytes: dispatch/combine bytes sent over NVLink and inter-node (forward; backward mirrors them);
    dispatch / combine: ``CommTimes`` (link, sm_limited, time) with ``comm_sms`` SMs;
    compute_f / compute_b: forward and full-backward compute seconds on ``sms - comm_sms`` SMs;
    attention_f / shared_f / routed_f / elementwise_f: parts of ``compute_f`` (MLA projections + gate +
    attention core; shared-expert GEMMs; routed-expert GEMMs on the busiest rank; memory-bound ops);
    dense_layer_f: forward compute of one of the first dense layers, for comparison; comm_f / comm_b:
    EP communication seconds forward / backward; compute_to_comm: ``compute_f / comm_f``;
    hides: in a simulated F&B pair (below) at least ``HIDE_THRESHOLD`` of the comm time runs under
    compute; smallest_hiding_sms: the smallest SM count for which it does (None: none does);
    pair_comm_hidden / pair_compute_busy: in a simulated F&B pair of 4 MoE layers each (the shape of
    DeepSeek's published training profile), the fraction of comm time under compute and of the pair's
    time the compute stream is busy.
    """

    tokens: int
    comm_sms: int
    bytes: CommBytes
    dispatch: CommTimes
    combine: CommTimes
    attention_f: float
    shared_f: float
    routed_f: float
    elementwise_f: float
    dense_layer_f: float
    compute_f: float
    compute_b: float
    comm_f: float
    comm_b: float
    compute_to_comm: float
    hides: bool
    smallest_hiding_sms: int | None
    pair_comm_hidden: float
    pair_compute_busy: float


class StepReport(NamedTuple):
    """One training step. Seconds unless named otherwise.

    pipeline: simulated makespan of the pipeline; bubble: largest per-rank idle time in it (the
    quantity of REFERENCE.md's formulas); bubble_busiest: idle time of the busiest rank (what uneven
    stages add shows as bubble - bubble_busiest); bubble_formula: the formula with this plan's
    stage-average F, B, W, F&B and free point-to-point; dp_sync: ZeRO-1
    reduce-scatter + all-gather of bf16 gradients/parameters, not overlapped; optimizer: AdamW update
    at HBM speed; step_time: their sum; comm_hidden: fraction of EP comm time under compute;
    compute_busy: fraction of the pipeline time the compute stream is busy; params_per_gpu: parameters
    on the fullest GPU; state_memory_gb: its weights (bf16) + gradients (fp32) + ZeRO-1 share of the
    optimizer (fp32 master, bf16 moments), 1e9 bytes, activations not included; fits_memory: that
    state fits in ``cluster.hbm_gb``.
    """

    num_microbatches: int
    tokens_per_step: int
    pipeline: float
    bubble: float
    bubble_busiest: float
    bubble_formula: float
    dp_sync: float
    optimizer: float
    step_time: float
    comm_hidden: float
    compute_busy: float
    mfu: float
    mfu_bf16: float
    tokens_per_s_per_gpu: float
    gpu_hours_per_trillion_tokens: float
    params_per_gpu: float
    state_memory_gb: float
    fits_memory: bool


class PlanResult(NamedTuple):
    model: MoEConfig
    cluster: ClusterSpec
    plan: ParallelPlan
    dp: int
    routing: Routing
    spread: Spread | None
    layer: LayerReport | None  # None when the model has no MoE layer
    step: StepReport
    stages: list[int]  # layers (incl. head as the last item) per pipeline stage
    sim: SimResult

    @property
    def num_gpus(self) -> int:
        return self.plan.pp * self.dp


def _moe_layer(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread | None, k: int) -> LayerTimes:
    return layer_times(cfg, cluster, tokens=plan.micro_batch * plan.seq_len, seq_len=plan.seq_len, dense=False,
                       spread=spread, fp8_dispatch=plan.fp8_dispatch, gemm_dtype=plan.gemm_dtype, comm_sms=k)


def _pair(lt: LayerTimes) -> tuple[float, float]:
    """(compute, comm) seconds of one MoE layer's forward + full backward (an F&B pair)."""
    comp = lt.attn_f + lt.mlp_f + lt.attn_bi + lt.mlp_bi + lt.attn_w + lt.mlp_w
    return comp, lt.dispatch_f + lt.combine_f + lt.dispatch_b + lt.combine_b


PAIR_LAYERS = 4  # MoE layers per chunk in DeepSeek's published F&B profile
HIDE_THRESHOLD = 0.95  # "hides": at least this fraction of the pair's comm time runs under compute


class SweepPoint(NamedTuple):
    """One comm SM count ``k``: per MoE layer F&B ``compute`` and ``comm`` seconds; in a simulated pair
    of ``PAIR_LAYERS`` layers, the fraction of comm under compute (``hidden``), the pair's seconds and
    the fraction of them the compute stream is busy."""

    k: int
    compute: float
    comm: float
    hidden: float
    pair_time: float
    busy: float  # fraction of the pair's time the compute stream is busy


def _sweep_point(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread | None, k: int) -> SweepPoint:
    lt = _moe_layer(cfg, cluster, plan, spread, k)
    comp, comm = _pair(lt)
    pair = two_stream([lt.forward() * PAIR_LAYERS, lt.backward(True) * PAIR_LAYERS])
    return SweepPoint(k, comp, comm, pair.comm_hidden / pair.comm if pair.comm > 0 else 1.0, pair.duration,
                      pair.compute / pair.duration if pair.duration > 0 else 0.0)


def sm_sweep(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread | None,
             ks: list[int] | None = None) -> list[SweepPoint]:
    """A ``SweepPoint`` for each comm SM count in ``ks`` (default ``1 .. sms-1``)."""
    ks = ks if ks is not None else list(range(1, cluster.sms))
    return [_sweep_point(cfg, cluster, plan, spread, k) for k in ks]


def smallest_hiding_sms(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread | None,
                        threshold: float = HIDE_THRESHOLD) -> int | None:
    """The smallest SM count for which a simulated F&B pair hides ``threshold`` of its comm (None if none)."""
    for pt in sm_sweep(cfg, cluster, plan, spread):
        if pt.hidden >= threshold:
            return pt.k
    return None


def _partition(costs: list[float], parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous, non-empty groups of ``costs`` minimising the largest group sum."""
    if parts > len(costs):
        raise ValueError(f"{parts} pipeline stages but only {len(costs)} layers (incl. the head) to place")

    def sizes_for(limit: float) -> list[int] | None:
        out, acc, n = [], 0.0, 0
        for i, c in enumerate(costs):
            left_items, left_parts = len(costs) - i, parts - len(out)
            if n and (acc + c > limit or left_items < left_parts):
                out.append(n)
                acc, n = 0.0, 0
            acc += c
            n += 1
        out.append(n)
        return out if len(out) <= parts and max(_sums(costs, out)) <= limit * (1 + 1e-12) else None

    lo, hi = max(costs), sum(costs)
    for _ in range(60):
        mid = (lo + hi) / 2
        if sizes_for(mid) is None:
            lo = mid
        else:
            hi = mid
    out = sizes_for(hi)
    while len(out) < parts:  # split the largest group until there are enough
        i = max(range(len(out)), key=lambda j: out[j])
        out[i:i + 1] = [out[i] // 2, out[i] - out[i] // 2]
    return out


def _sums(costs: list[float], sizes: list[int]) -> list[float]:
    out, i = [], 0
    for s in sizes:
        out.append(sum(costs[i:i + s]))
        i += s
    return out


def plan(model: MoEConfig | str, cluster: ClusterSpec | str, parallel: ParallelPlan) -> PlanResult:
    """Predict one training step of ``model`` on ``cluster`` laid out as ``parallel``.

    ``model``: a ``MoEConfig`` or a preset name; ``cluster``: a ``ClusterSpec``, a preset name or a
    YAML/JSON path. Raises ``ValueError`` for plans that do not fit (EP not dividing the experts, odd
    PP with DualPipe, more GPUs than the cluster, ...). Pure Python + numpy; 0.1-0.2 s for the
    2048-GPU DeepSeek-V3 plan.
    """
    from .cluster import load_cluster

    cfg = MoEConfig.preset(model) if isinstance(model, str) else model
    cl = load_cluster(cluster) if isinstance(cluster, str) else cluster
    res = parallel.resolve(cl, cfg.n_routed_experts)
    p, dp, n = parallel, res.dp, res.num_microbatches
    routing = parse_routing(p.routing, cfg.max_nodes_per_token)
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers or p.mtp_depth > 0
    # Histograms also matter at EP = 1 (the imbalance factor); otherwise EP = 1 moves no bytes.
    spread = expected_spread(routing, cfg.n_routed_experts, cfg.num_experts_per_tok, p.ep, cl.gpus_per_node) \
        if p.ep > 1 or routing.kind == "histogram" else None
    needs_comm = p.ep > 1 and has_moe
    if not needs_comm:
        k, hide_k = 0, None
        if spread is not None and p.ep > 1:
            spread = None  # no MoE layer: nothing to send
    else:
        hide_k = smallest_hiding_sms(cfg, cl, p, spread)
        if p.comm_sms != "auto":
            k = p.comm_sms
        else:
            k = hide_k if hide_k is not None else min(sm_sweep(cfg, cl, p, spread), key=lambda t: t.pair_time).k
    tokens = p.micro_batch * p.seq_len
    moe = _moe_layer(cfg, cl, p, spread, k)
    layer = _layer_report(cfg, cl, p, spread, moe, k, hide_k, needs_comm) if has_moe else None

    # Items in model order: layers (+ MTP blocks), then the output head(s); cut into stages.
    dense = layer_times(cfg, cl, tokens=tokens, seq_len=p.seq_len, dense=True, spread=None,
                        fp8_dispatch=p.fp8_dispatch, gemm_dtype=p.gemm_dtype, comm_sms=k)
    items = [dense if i < cfg.first_k_dense_replace else moe for i in range(cfg.num_hidden_layers + p.mtp_depth)]
    items += [head_times(cfg, cl, tokens=tokens, gemm_dtype=p.gemm_dtype, comm_sms=k)] * (1 + p.mtp_depth)
    lay = layout(p.schedule, p.pp)
    # Balance stages on what a layer costs in this schedule: DualPipe(V) hides EP comm under the paired
    # chunk's compute, 1F1B runs it in series.
    if p.schedule == "1f1b":
        weights = [sum(x.seconds for x in lt.forward() + lt.backward(True)) for lt in items]
    else:
        weights = [max(_pair(lt)) for lt in items]
    sizes = _partition(weights, lay.num_stages)
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    costs = StageCosts([items[a:b] for a, b in zip(bounds, bounds[1:])])
    # Consecutive stages sit on different nodes: activations [T, H] in bf16 over the inter-node link.
    p2p = cl.p2p_latency_us * 1e-6 + tokens * cfg.hidden_size * 2 / (cl.internode_gbps * cl.internode_efficiency * 1e9)
    sim = simulate(p.schedule, p.pp, n, costs, p2p=p2p)

    # The formula's bubble with stage-average costs.
    ns = lay.num_stages
    avg = [sum(costs.op(kind, s, split, s).duration for s in range(ns)) / ns
           for kind, split in (("F", False), ("B", True), ("W", False), ("FB", False))]
    formula = bubble_formula(p.schedule, p.pp, *avg)

    dense_p, expert_p = _params_per_gpu(cfg, p, lay, bounds)
    edp = dp // p.ep
    # ZeRO-1: reduce-scatter gradients + all-gather parameters, bf16, ring over DP (inter-node), not overlapped.
    link = cl.internode_gbps * cl.internode_efficiency * 1e9 if cl.num_nodes > 1 else \
        cl.nvlink_gbps * cl.nvlink_efficiency * 1e9
    dp_sync = 2 * 2 * (dense_p * (dp - 1) / dp + expert_p * (edp - 1) / edp) / link
    # AdamW on this rank's optimizer shard: ~28 bytes read+written per parameter at HBM speed.
    optimizer = 28 * (dense_p / dp + expert_p / edp) / (cl.hbm_tbps * cl.hbm_efficiency * 1e12)
    # bf16 weights + fp32 gradients on every rank; fp32 master + two bf16 moments sharded (ZeRO-1).
    memory = (2 + 4) * (dense_p + expert_p) + (4 + 2 + 2) * (dense_p / dp + expert_p / edp)
    step_time = sim.step_time + dp_sync + optimizer

    gpus = p.pp * dp
    tokens_step = dp * n * tokens
    tps = tokens_step / step_time / gpus
    flops = step_flops_per_token(cfg, p.seq_len, p.mtp_depth) * tokens_step
    peak = (cl.fp8_tflops if p.gemm_dtype == "fp8" else cl.bf16_tflops) * 1e12
    busiest = max(range(p.pp), key=lambda r: sim.busy[r])
    step = StepReport(n, tokens_step, sim.step_time, max(sim.bubble), sim.bubble[busiest], formula, dp_sync,
                      optimizer, step_time, sim.hidden_fraction, sim.compute_fraction,
                      flops / (step_time * gpus * peak), flops / (step_time * gpus * cl.bf16_tflops * 1e12),
                      tps, 1e12 / tps / 3600, dense_p + expert_p, memory / 1e9, memory / 1e9 <= cl.hbm_gb)
    return PlanResult(cfg, cl, p, dp, routing, spread, layer, step, sizes, sim)


def _layer_report(cfg: MoEConfig, cl: ClusterSpec, p: ParallelPlan, spread: Spread | None, moe: LayerTimes, k: int,
                  hide_k: int | None, needs_comm: bool) -> LayerReport:
    tokens = p.micro_batch * p.seq_len
    cb = comm_bytes(cfg, tokens, spread, p.fp8_dispatch) if needs_comm else CommBytes(0.0, 0.0, 0.0, 0.0)
    disp = transfer_time(cb.dispatch_intra, cb.dispatch_inter, cl, max(k, 1))
    comb = transfer_time(cb.combine_intra, cb.combine_inter, cl, max(k, 1))
    comp_pair, comm_pair = _pair(moe)
    comp_f, comm_f = moe.attn_f + moe.mlp_f, moe.dispatch_f + moe.combine_f
    pt = _sweep_point(cfg, cl, p, spread, max(k, 1))
    parts = compute_parts(cfg, cl, tokens=tokens, seq_len=p.seq_len, dense=False,
                          imbalance=spread.imbalance if spread is not None else 1.0, gemm_dtype=p.gemm_dtype,
                          comm_sms=k)
    dense = layer_times(cfg, cl, tokens=tokens, seq_len=p.seq_len, dense=True, spread=None,
                        fp8_dispatch=p.fp8_dispatch, gemm_dtype=p.gemm_dtype, comm_sms=k)
    return LayerReport(tokens, k, cb, disp, comb, parts.attn_linear + parts.attn_core, parts.mlp, parts.routed,
                       parts.elementwise, dense.attn_f + dense.mlp_f, comp_f, comp_pair - comp_f, comm_f,
                       comm_pair - comm_f, comp_f / comm_f if comm_f > 0 else float("inf"),
                       pt.hidden >= HIDE_THRESHOLD, hide_k, pt.hidden, pt.busy)


def _params_per_gpu(cfg: MoEConfig, p: ParallelPlan, lay: Layout, bounds: list[int]) -> tuple[float, float]:
    """(non-expert, expert) parameters on the fullest rank: the stages it holds (two for DualPipe(V))."""
    n_layers = cfg.num_hidden_layers + p.mtp_depth
    dense_s, expert_s = [], []
    for a, b in zip(bounds, bounds[1:]):
        d = e = 0.0
        for j in range(a, b):
            if j < n_layers:
                x, y = layer_params(cfg, dense=j < cfg.first_k_dense_replace)
                d, e = d + x, e + y
            else:
                d += cfg.hidden_size * cfg.vocab_size  # an output head
        dense_s.append(d)
        expert_s.append(e)
    held: dict[int, list[int]] = {}
    for (r, _c), (_d, st) in lay.stage_of.items():
        held.setdefault(r, []).append(st)
    dense_p = max(sum(dense_s[st] for st in sts) for sts in held.values())
    expert_p = max(sum(expert_s[st] for st in sts) for sts in held.values()) / p.ep
    return dense_p, expert_p


def ep_sweep(model: MoEConfig | str, cluster: ClusterSpec | str, parallel: ParallelPlan,
             eps: list[int] | None = None) -> list[tuple[int, float, bool]]:
    """``(ep, step_time, fits_memory)`` for each valid EP size (default: powers of two up to dp)."""
    import dataclasses

    cfg = MoEConfig.preset(model) if isinstance(model, str) else model
    from .cluster import load_cluster

    cl = load_cluster(cluster) if isinstance(cluster, str) else cluster
    dp = parallel.resolve(cl, cfg.n_routed_experts).dp
    if eps is None:
        eps, e = [], 1
        while e <= dp:
            eps.append(e)
            e *= 2
    out = []
    for e in eps:
        try:
            r = plan(cfg, cl, dataclasses.replace(parallel, ep=e))
        except ValueError:
            continue
        out.append((e, r.step.step_time, r.step.fits_memory))
    return out
