"""``plan()``: from a model, a cluster and a parallel plan to per-layer and per-step predictions.

Pipeline: routing -> expected fan-out (``spread.py``) -> bytes and times of one MoE layer
(``cost.py``) -> the smallest comm SM count that hides communication under the overlapped F&B pair
(``auto``) -> layers cut into balanced pipeline stages -> ``simulate`` one step -> + data-parallel
gradient sync and optimizer -> step time, MFU, tokens/s/GPU, GPU-hours per trillion tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

from ..config import MoEConfig
from ..schedule import Placement, Simulation, bubble_formula, programs, simulate
from ..schedule import placement as _placement
from .cluster import ClusterSpec, ParallelPlan, load_cluster
from .cost import (
    CommBytes,
    CommTimes,
    LayerTimes,
    StageCosts,
    comm_bytes,
    compute_parts,
    head_times,
    layer_params,
    layer_times,
    step_flops_per_token,
    transfer_time,
    two_stream,
)
from .memory import (
    FP8_BYTES,
    STATE_BYTES_REPLICATED,
    STATE_BYTES_SHARDED,
    ActivationBytes,
    MemoryReport,
    StageMemory,
    activation_bytes,
    ep_buffer_bytes,
    peak_activations,
)
from .spread import Routing, Spread, expected_spread, parse_routing


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
    quantity of the DualPipe README's formulas); bubble_busiest: idle time of the busiest rank (what uneven
    stages add shows as bubble - bubble_busiest); bubble_formula: the formula with this plan's
    stage-average F, B, W, F&B and free point-to-point; dp_sync: ZeRO-1
    reduce-scatter + all-gather of bf16 gradients/parameters, not overlapped; optimizer: AdamW update
    at HBM speed; step_time: their sum; comm_hidden: fraction of EP comm time under compute;
    compute_busy: fraction of the pipeline time the compute stream is busy; params_per_gpu: parameters
    on the fullest GPU; state_memory_gb: its weights (bf16) + gradients (fp32) + ZeRO-1 share of the
    optimizer (fp32 master, bf16 moments), 1e9 bytes; memory: the ``MemoryReport`` of the fullest GPU
    (state + activations in flight + EP buffers); fits_memory: ``memory.fits``;
    model_tflops_per_gpu: model FLOPs (``step_flops_per_token``, no recomputation) per second per GPU,
    the figure Megatron-Core reports as "TFLOPS/GPU".
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
    model_tflops_per_gpu: float
    memory: MemoryReport


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
    sim: Simulation

    @property
    def num_gpus(self) -> int:
        return self.plan.pp * self.dp


def moe_layer_times(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread | None,
                    k: int) -> LayerTimes:
    """Seconds of one MoE layer, one micro-batch of ``plan``, one GPU, with ``k`` comm SMs (host only)."""
    return layer_times(cfg, cluster, tokens=plan.micro_batch * plan.seq_len, seq_len=plan.seq_len, dense=False,
                       spread=spread, fp8_dispatch=plan.fp8_dispatch, gemm_dtype=plan.gemm_dtype, comm_sms=k,
                       recompute=plan.recompute)


def _pair(lt: LayerTimes) -> tuple[float, float]:
    """(compute, comm) seconds of one MoE layer's forward + full backward (an F&B pair)."""
    return lt.pair()


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
    lt = moe_layer_times(cfg, cluster, plan, spread, k)
    comp, comm = _pair(lt)
    pair = two_stream([lt.forward() * PAIR_LAYERS, lt.backward(True) * PAIR_LAYERS])
    return SweepPoint(k=k, compute=comp, comm=comm, hidden=pair.comm_hidden / pair.comm if pair.comm > 0 else 1.0,
                      pair_time=pair.duration, busy=pair.compute / pair.duration if pair.duration > 0 else 0.0)


def sm_sweep(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread | None,
             ks: list[int] | None = None) -> list[SweepPoint]:
    """A ``SweepPoint`` for each comm SM count in ``ks`` (default ``1 .. sms-1``)."""
    ks = ks if ks is not None else list(range(1, cluster.sms))
    return [_sweep_point(cfg, cluster, plan, spread, k) for k in ks]


def smallest_hiding_sms(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread | None,
                        threshold: float = HIDE_THRESHOLD) -> int | None:
    """The smallest SM count for which a simulated F&B pair hides ``threshold`` of its comm (None if none)."""
    for k in range(1, cluster.sms):
        if _sweep_point(cfg, cluster, plan, spread, k).hidden >= threshold:
            return k
    return None


def link_bound_sms(cfg: MoEConfig, cluster: ClusterSpec, plan: ParallelPlan, spread: Spread) -> int:
    """The smallest comm SM count at which dispatch and combine run at link speed: more SMs cannot make a
    transfer faster, they only take SMs from compute (what a schedule that does not overlap wants)."""
    cb = comm_bytes(cfg, plan.micro_batch * plan.seq_len, spread, plan.fp8_dispatch)
    need = 1
    for intra, inter in ((cb.dispatch_intra, cb.dispatch_inter), (cb.combine_intra, cb.combine_inter)):
        link = transfer_time(intra, inter, cluster, 1).link
        if link > 0:
            need = max(need, math.ceil((intra + inter) / (link * cluster.comm_gbps_per_sm * 1e9) - 1e-9))
    return min(need, cluster.sms - 1)


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


@lru_cache(maxsize=4096)
def _partition_cached(costs: tuple[float, ...], parts: int) -> tuple[int, ...]:
    return tuple(_partition(list(costs), parts))


def _sums(costs: list[float], sizes: list[int]) -> list[float]:
    out, i = [], 0
    for s in sizes:
        out.append(sum(costs[i:i + s]))
        i += s
    return out


class LayerCosts(NamedTuple):
    """Per-layer costs of one micro-batch, shared by every plan with the same layer-level choices."""

    routing: Routing
    spread: Spread | None
    k: int  # comm SMs used
    hide_k: int | None  # smallest k that hides the comm (None: none does / no comm)
    needs_comm: bool
    has_moe: bool
    moe: LayerTimes
    dense: LayerTimes
    head: LayerTimes


def layer_costs(cfg: MoEConfig, cl: ClusterSpec, p: ParallelPlan, cache: dict | None = None) -> LayerCosts:
    """Routing -> spread -> comm SMs -> ``LayerTimes`` of a MoE layer, a dense layer and the head.
    ``cache`` (a dict) memoises them across plans that share the layer-level choices (the search)."""
    key = (p.ep, p.micro_batch, p.seq_len, p.routing, p.fp8_dispatch, p.gemm_dtype, p.comm_sms, p.recompute,
           p.mtp_depth)
    if cache is not None and key in cache:
        return cache[key]
    routing = parse_routing(p.routing, cfg.max_nodes_per_token)
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers or p.mtp_depth > 0
    # Histograms also matter at EP = 1 (the imbalance factor); otherwise EP = 1 moves no bytes.
    spread = expected_spread(routing, cfg.n_routed_experts, cfg.num_experts_per_tok, p.ep, cl.gpus_per_node,
                             tokens=p.micro_batch * p.seq_len) \
        if p.ep > 1 or routing.kind == "histogram" else None
    needs_comm = p.ep > 1 and has_moe
    if not needs_comm:
        k, hide_k = 0, None
        if spread is not None and p.ep > 1:
            spread = None  # no MoE layer: nothing to send
    else:
        hide_k = _hide_k(cfg, cl, p, spread, key, cache) if p.comm_sms == "auto" else None
        if p.comm_sms != "auto":
            k = p.comm_sms
        else:
            k = hide_k if hide_k is not None else min(sm_sweep(cfg, cl, p, spread), key=lambda t: t.pair_time).k
    tokens = p.micro_batch * p.seq_len
    moe = moe_layer_times(cfg, cl, p, spread, k)
    dense = layer_times(cfg, cl, tokens=tokens, seq_len=p.seq_len, dense=True, spread=None,
                        fp8_dispatch=p.fp8_dispatch, gemm_dtype=p.gemm_dtype, comm_sms=k, recompute=p.recompute)
    head = head_times(cfg, cl, tokens=tokens, gemm_dtype=p.gemm_dtype, comm_sms=k, recompute=p.recompute)
    out = LayerCosts(routing=routing, spread=spread, k=k, hide_k=hide_k, needs_comm=needs_comm, has_moe=has_moe,
                     moe=moe, dense=dense, head=head)
    if cache is not None:
        cache[key] = out
    return out


def _hide_k(cfg: MoEConfig, cl: ClusterSpec, p: ParallelPlan, spread: Spread | None, key: tuple,
            cache: dict | None) -> int | None:
    hkey = ("hide",) + key[:6] + key[7:]
    if cache is not None and hkey in cache:
        return cache[hkey]
    k = smallest_hiding_sms(cfg, cl, p, spread)
    if cache is not None:
        cache[hkey] = k
    return k


class Prepared(NamedTuple):
    """Everything about a plan short of simulating its pipeline: layer costs, stages, memory, the
    closed-form DP terms and a lower bound on the step (``search`` uses it to skip simulations)."""

    cfg: MoEConfig
    cluster: ClusterSpec
    plan: ParallelPlan
    dp: int
    num_microbatches: int
    lc: LayerCosts
    sizes: list[int]
    costs: StageCosts
    memory: MemoryReport
    params_per_gpu: float
    state_bytes: float
    dp_sync: float
    optimizer: float
    p2p: float
    step_lower_bound: float


MODEL_LIMITS = {"num_hidden_layers": 100_000, "n_routed_experts": 1 << 20, "num_experts_per_tok": 1024,
                "hidden_size": 1 << 24, "vocab_size": 1 << 26}


def check_model_sizes(cfg: MoEConfig) -> None:
    """Refuse model sizes the planner cannot evaluate in seconds (it loops over layers, and the routing
    model takes binomials of experts choose top-k)."""
    for name, hi in MODEL_LIMITS.items():
        v = getattr(cfg, name)
        if v > hi:
            raise ValueError(f"MoEConfig.{name} ({v:,}) is over the planner's limit of {hi:,}")


def _item_kinds(cfg: MoEConfig, mtp_depth: int) -> list[str]:
    n_layers = cfg.num_hidden_layers + mtp_depth
    return ["dense" if i < cfg.first_k_dense_replace else "moe" for i in range(n_layers)] + ["head"] * (1 + mtp_depth)


def prepare(model: MoEConfig | str, cluster: ClusterSpec | str, parallel: ParallelPlan,
            cache: dict | None = None) -> Prepared:
    """Check ``parallel`` and compute all but the pipeline simulation (see ``plan``)."""
    cfg = MoEConfig.preset(model) if isinstance(model, str) else model
    cl = load_cluster(cluster) if isinstance(cluster, str) else cluster
    res = parallel.resolve(cl, cfg.n_routed_experts)
    p, dp, n = parallel, res.dp, res.num_microbatches
    check_model_sizes(cfg)
    lc = layer_costs(cfg, cl, p, cache)
    tokens = p.micro_batch * p.seq_len
    kinds = _item_kinds(cfg, p.mtp_depth)
    by_kind = {"dense": lc.dense, "moe": lc.moe, "head": lc.head}
    items = [by_kind[x] for x in kinds]
    placement = _placement(p.schedule, p.pp)
    # Balance stages on what a layer costs in this schedule: the overlapped schedules hide EP comm under
    # the paired chunk's compute, 1F1B and interleaved 1F1B run it in series.
    if p.schedule in ("1f1b", "interleaved"):
        w_of = {x: sum(q.seconds for q in lt.forward() + lt.backward(True)) for x, lt in by_kind.items()}
    else:
        w_of = {x: max(lt.pair()) for x, lt in by_kind.items()}
    sizes = list(_partition_cached(tuple(w_of[x] for x in kinds), placement.num_stages))
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    costs = StageCosts([items[a:b] for a, b in zip(bounds, bounds[1:])])
    # Consecutive stages sit on different nodes: activations [T, H] in bf16 over the inter-node link.
    p2p = cl.p2p_latency_us * 1e-6 + tokens * cfg.hidden_size * 2 / (cl.internode_gbps * cl.internode_efficiency * 1e9)

    # Memory: model state per rank (ZeRO-1) + activations in flight + EP buffers.
    imb = lc.spread.imbalance if lc.spread is not None else 1.0
    act = {x: activation_bytes(cfg, dense=x == "dense", gemm_dtype=p.gemm_dtype, recompute=p.recompute,
                               imbalance=imb) for x in ("dense", "moe")}
    c = FP8_BYTES if p.gemm_dtype == "fp8" else 2.0
    head_act = ActivationBytes(2.0 * cfg.vocab_size, c * cfg.hidden_size)  # bf16 logits, cached head input
    if p.recompute == "full":
        head_act = ActivationBytes(2.0 * cfg.hidden_size, 0.0, head_act.total)
    stage_mem = []
    for a, b in zip(bounds, bounds[1:]):
        parts = [head_act if kinds[j] == "head" else act[kinds[j]] for j in range(a, b)]
        stage_mem.append(StageMemory(tokens * sum(x.bf16 for x in parts), tokens * sum(x.cache for x in parts),
                                     tokens * max(x.working for x in parts)))
    peaks = peak_activations(p.schedule, p.pp, n, stage_mem)
    dense_r, expert_r = _params_per_rank(cfg, p, placement, bounds, kinds)
    edp = dp // p.ep
    ep_buf = ep_buffer_bytes(cfg, tokens, lc.spread.ranks, p.fp8_dispatch, p.schedule in ("dualpipe", "dualpipev")) \
        if lc.needs_comm else 0.0
    per_rank = []
    for r in range(p.pp):
        params = dense_r[r] + expert_r[r]
        opt = STATE_BYTES_SHARDED * (dense_r[r] / dp + expert_r[r] / edp)
        per_rank.append((STATE_BYTES_REPLICATED * params + opt + peaks[r].total + ep_buf, r, opt))
    total, rk, opt = max(per_rank)
    params = dense_r[rk] + expert_r[rk]
    big = max(stage_mem[st].bf16 + stage_mem[st].cache for (r, _c), (_d, st) in placement.stage_of.items() if r == rk)
    memory = MemoryReport(weights=2.0 * params, grads=4.0 * params, optimizer=opt, activations=peaks[rk].total,
                          activations_cache=peaks[rk].cache, ep_buffers=ep_buf, total=total,
                          capacity=cl.hbm_gb * 1e9, fits=total <= cl.hbm_gb * 1e9,
                          inflight_microbatches=peaks[rk].total / big if big > 0 else 0.0)

    # ZeRO-1: reduce-scatter gradients + all-gather parameters, bf16, ring over DP (inter-node), not
    # overlapped; every rank syncs its own parameters at once, so the rank with the most sets the time.
    link = cl.internode_gbps * cl.internode_efficiency * 1e9 if cl.num_nodes > 1 else \
        cl.nvlink_gbps * cl.nvlink_efficiency * 1e9
    dp_sync = max(2 * 2 * (d * (dp - 1) / dp + e * (edp - 1) / edp) / link for d, e in zip(dense_r, expert_r))
    # AdamW on this rank's optimizer shard: ~28 bytes read+written per parameter at HBM speed.
    optimizer = max(28 * (d / dp + e / edp) for d, e in zip(dense_r, expert_r)) / \
        (cl.hbm_tbps * cl.hbm_efficiency * 1e12)
    lb = _pipeline_lower_bound(p, n, placement, costs, p2p) + dp_sync + optimizer
    # The rank with the most parameters, for the report (the fullest in memory is ``memory``).
    dense_p, expert_p = max(zip(dense_r, expert_r), key=lambda de: de[0] + de[1])
    state = STATE_BYTES_REPLICATED * (dense_p + expert_p) + STATE_BYTES_SHARDED * (dense_p / dp + expert_p / edp)
    return Prepared(cfg=cfg, cluster=cl, plan=p, dp=dp, num_microbatches=n, lc=lc, sizes=sizes, costs=costs,
                    memory=memory, params_per_gpu=dense_p + expert_p, state_bytes=state, dp_sync=dp_sync,
                    optimizer=optimizer, p2p=p2p, step_lower_bound=lb)


@lru_cache(maxsize=512)
def _op_counts(schedule: str, pp: int, n: int) -> tuple[tuple[tuple[tuple, int], ...], ...]:
    """Per rank: how many times each distinct op (kind, chunk, split, chunk_b) occurs."""
    out = []
    for order in programs(schedule, pp, n):
        c = Counter((op.kind, op.chunk, op.split, op.chunk_b) for op in order)
        out.append(tuple(sorted(c.items(), key=repr)))
    return tuple(out)


def _pipeline_lower_bound(p: ParallelPlan, n: int, placement: Placement, costs: StageCosts, p2p: float) -> float:
    """A lower bound on the simulated pipeline time, for the search. Op durations do not depend on when
    an op starts, so a rank's busy time is exact; it cannot start before the first micro-batch's
    forward reaches its first stage (``head``); after its last backward, that micro-batch's backward
    still has to pass every earlier stage of its direction (``tail``), while the rank itself only has
    the weight-gradient ops left that follow that backward."""
    best = 0.0
    for r, (counts, ends) in enumerate(zip(_op_counts(p.schedule, p.pp, n), _ends(p.schedule, p.pp, n))):
        busy = 0.0
        for (kind, chunk, split, chunk_b), k in counts:
            s = placement.stage_of[(r, chunk)][1]
            sb = placement.stage_of[(r, chunk_b)][1] if chunk_b is not None else None
            busy += k * costs.op(kind, s, split, sb).duration
        s0 = placement.stage_of[(r, ends.first_chunk)][1]
        head = sum(costs.op("F", s, False, None).duration for s in range(s0)) + (p2p if s0 else 0.0)
        bound = head + busy
        if ends.last_b_chunk is not None:
            sl = placement.stage_of[(r, ends.last_b_chunk)][1]
            # The earlier stages' backwards of that micro-batch: at least their input-gradient part (the
            # whole backward where the schedule never splits it).
            split = p.schedule in ("dualpipe", "dualpipev")
            tail = sum(costs.op("B", s, split, None).duration for s in range(sl)) + (p2p if sl else 0.0)
            w_after = sum(k * costs.op("W", placement.stage_of[(r, c)][1], False, None).duration
                          for c, k in ends.w_after)
            bound = max(bound, head + busy - w_after + tail)
        best = max(best, bound)
    return best


class _Ends(NamedTuple):
    first_chunk: int  # chunk of the rank's first op (a forward)
    last_b_chunk: int | None  # backward chunk of its last B / FB op
    w_after: tuple[tuple[int, int], ...]  # (chunk, count) of the W ops after that last backward


@lru_cache(maxsize=512)
def _ends(schedule: str, pp: int, n: int) -> tuple[_Ends, ...]:
    out = []
    for order in programs(schedule, pp, n):
        queue: list[int] = []
        last_b, w_after = None, Counter()
        for op in order:
            if op.kind in ("B", "FB"):
                last_b, w_after = (op.chunk if op.kind == "B" else op.chunk_b), Counter()
                if op.kind == "B" and op.split:
                    queue.append(op.chunk)
            elif op.kind == "W":
                w_after[queue.pop(0)] += 1
        out.append(_Ends(order[0].chunk, last_b, tuple(sorted(w_after.items()))))
    return tuple(out)


def plan(model: MoEConfig | str, cluster: ClusterSpec | str, parallel: ParallelPlan,
         cache: dict | None = None) -> PlanResult:
    """Predict one training step of ``model`` on ``cluster`` laid out as ``parallel``.

    ``model``: a ``MoEConfig`` or a preset name; ``cluster``: a ``ClusterSpec``, a preset name or a
    YAML/JSON path. Raises ``ValueError`` for plans that cannot run (EP not dividing the experts, odd
    PP with DualPipe, more GPUs than the cluster, sizes over the ceilings of ``plan/cluster.py``, ...);
    a plan that runs but does not fit in HBM is returned with ``step.fits_memory`` False. Pure Python
    + numpy; 0.1-0.2 s for the 2048-GPU DeepSeek-V3 plan.
    """
    return finish(prepare(model, cluster, parallel, cache), cache)


def finish(pr: Prepared, cache: dict | None = None, give_up_after: float | None = None) -> PlanResult | None:
    """Simulate a ``Prepared`` plan's pipeline and assemble the ``PlanResult``; None when
    ``give_up_after`` (seconds of step) is given and the step is certainly longer."""
    cfg, cl, p, dp, n, lc, costs = pr.cfg, pr.cluster, pr.plan, pr.dp, pr.num_microbatches, pr.lc, pr.costs
    hide_k = lc.hide_k
    if hide_k is None and lc.needs_comm and p.comm_sms != "auto":
        key = (p.ep, p.micro_batch, p.seq_len, p.routing, p.fp8_dispatch, p.gemm_dtype, p.comm_sms, p.recompute,
               p.mtp_depth)
        hide_k = _hide_k(cfg, cl, p, lc.spread, key, cache)
    layer = _layer_report(cfg, cl, p, lc.spread, lc.moe, lc.k, hide_k, lc.needs_comm) if lc.has_moe else None
    limit = None if give_up_after is None else give_up_after - pr.dp_sync - pr.optimizer
    sim = simulate(p.schedule, p.pp, n, costs, p2p=pr.p2p, comm_records=cache is None, give_up_after=limit,
                   records=cache is None)
    if sim is None:
        return None
    return PlanResult(model=cfg, cluster=cl, plan=p, dp=dp, routing=lc.routing, spread=lc.spread, layer=layer,
                      step=_step_report(pr, sim), stages=pr.sizes, sim=sim)


def _stage_average_bubble(p: ParallelPlan, costs: StageCosts) -> float:
    """The schedule's bubble formula with this plan's stage-average F, B, W and F&B seconds."""
    ns = _placement(p.schedule, p.pp).num_stages
    avg = [sum(costs.op(kind, s, split, s).duration for s in range(ns)) / ns
           for kind, split in (("F", False), ("B", True), ("W", False), ("FB", False))]
    return bubble_formula(p.schedule, p.pp, *avg)


def _step_report(pr: Prepared, sim: Simulation) -> StepReport:
    """The ``StepReport`` of a prepared plan and its simulated pipeline."""
    cfg, cl, p, dp, n = pr.cfg, pr.cluster, pr.plan, pr.dp, pr.num_microbatches
    step_time = sim.step_time + pr.dp_sync + pr.optimizer
    gpus = p.pp * dp
    tokens_step = dp * n * p.micro_batch * p.seq_len
    tps = tokens_step / step_time / gpus
    flops = step_flops_per_token(cfg, p.seq_len, p.mtp_depth) * tokens_step
    peak = (cl.fp8_tflops if p.gemm_dtype == "fp8" else cl.bf16_tflops) * 1e12
    busiest = max(range(p.pp), key=lambda r: sim.busy[r])
    return StepReport(
        num_microbatches=n, tokens_per_step=tokens_step, pipeline=sim.step_time, bubble=max(sim.bubble),
        bubble_busiest=sim.bubble[busiest], bubble_formula=_stage_average_bubble(p, pr.costs), dp_sync=pr.dp_sync,
        optimizer=pr.optimizer, step_time=step_time, comm_hidden=sim.hidden_fraction,
        compute_busy=sim.compute_fraction, mfu=flops / (step_time * gpus * peak),
        mfu_bf16=flops / (step_time * gpus * cl.bf16_tflops * 1e12), tokens_per_s_per_gpu=tps,
        gpu_hours_per_trillion_tokens=1e12 / tps / 3600, params_per_gpu=pr.params_per_gpu,
        state_memory_gb=pr.state_bytes / 1e9, fits_memory=pr.memory.fits,
        model_tflops_per_gpu=flops / step_time / gpus / 1e12, memory=pr.memory)


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
    return LayerReport(
        tokens=tokens, comm_sms=k, bytes=cb, dispatch=disp, combine=comb,
        attention_f=parts.attn_linear + parts.attn_core, shared_f=parts.mlp, routed_f=parts.routed,
        elementwise_f=parts.elementwise, dense_layer_f=dense.attn_f + dense.mlp_f, compute_f=comp_f,
        compute_b=comp_pair - comp_f, comm_f=comm_f, comm_b=comm_pair - comm_f,
        compute_to_comm=comp_f / comm_f if comm_f > 0 else float("inf"), hides=pt.hidden >= HIDE_THRESHOLD,
        smallest_hiding_sms=hide_k, pair_comm_hidden=pt.hidden, pair_compute_busy=pt.busy)


def _params_per_rank(cfg: MoEConfig, p: ParallelPlan, placement: Placement, bounds: list[int],
                     kinds: list[str]) -> tuple[list[float], list[float]]:
    """(non-expert, expert-on-this-GPU) parameters of each pipeline rank: the stages it holds (two for
    DualPipe(V) and interleaved). The embedding sits in the first stage; the MTP heads share the main
    output head (DeepSeek-V3 sec. 2.2), so only the first head item carries parameters."""
    dense_s, expert_s = [], []
    first_head = kinds.index("head")
    for a, b in zip(bounds, bounds[1:]):
        d = e = 0.0
        for j in range(a, b):
            if kinds[j] == "head":
                d += cfg.hidden_size * cfg.vocab_size if j == first_head else 0.0
            else:
                x, y = layer_params(cfg, dense=kinds[j] == "dense")
                d, e = d + x, e + y
        if a == 0:
            d += cfg.hidden_size * cfg.vocab_size  # embedding
        dense_s.append(d)
        expert_s.append(e)
    dense_r, expert_r = [0.0] * p.pp, [0.0] * p.pp
    for (r, _c), (_d, st) in placement.stage_of.items():
        dense_r[r] += dense_s[st]
        expert_r[r] += expert_s[st] / p.ep
    return dense_r, expert_r


def ep_sweep(model: MoEConfig | str, cluster: ClusterSpec | str, parallel: ParallelPlan,
             eps: list[int] | None = None) -> list[tuple[int, float, bool]]:
    """``(ep, step_time, fits_memory)`` for each valid EP size (default: powers of two up to dp)."""
    cfg = MoEConfig.preset(model) if isinstance(model, str) else model
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
