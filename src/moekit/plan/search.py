"""``search``: the layouts that fit a model on a cluster, ranked by tokens/s per GPU.

The space (every GPU used: ``pp * dp == num_gpus``, TP = 1 as DeepSeek-V3 trains, report sec. 3.2):
PP dividing the GPUs (at most one stage per layer), EP dividing the experts and DP (whole nodes, or a
divisor of a node), schedule in ``SCHEDULES``, micro-batch of 1, 2 or 4 sequences, comm SMs ``k``
(``"auto"`` = the smallest that hides the communication under an F&B pair; the smallest that moves
the bytes at link speed, ``link_bound_sms``, which is what a schedule without overlap wants; and
DeepSeek's 20: between the first two a step only loses compute SMs), node-limited routing at the
model's limit or uniform, FP8 or BF16 dispatch, recomputation none / selective / full. Any of these
can be fixed; the rest are searched.

The global batch is a training hyper-parameter, not a knob: it is kept (default: DeepSeek-V3's 7.5
sequences per GPU, 15,360 on 2,048 GPUs) and each layout takes the smallest micro-batch count its
schedule allows that covers it, if that stays within ``BATCH_SLACK`` of it.

Pruning (the answer is the same as simulating everything — ``tests/plan/test_search.py`` checks this
against brute force):

1. a closed-form bound per candidate: no step is shorter than the average rank's work (each op lasts
   at least its compute; the single-chain ops of 1F1B and interleaved 1F1B their compute + comm)
   plus the DP sync and optimizer of an average rank; model state on an average rank over HBM rules a
   candidate out for memory;
2. best first: the layout with the highest bound is refined — checked exactly (stages, memory of the
   fullest rank, then a tighter bound: each rank's exact busy time plus the time before its first op
   can start and after its last), then simulated; a simulated value that is higher than every
   remaining bound is the next in the ranking, so only layouts whose bounds beat the ``top``-th answer
   are ever simulated;
3. ``tolerance`` (default 1%) accepts a simulated value once no remaining bound beats it by more.
"""

from __future__ import annotations

import heapq
import math
import time
from typing import NamedTuple

from .._util import cdiv, round_up
from ..config import MoEConfig
from ..schedule import SCHEDULES, check_schedule
from .cluster import MAX_SIM_OPS, ClusterSpec, ParallelPlan, load_cluster
from .cost import layer_params
from .memory import STATE_BYTES_REPLICATED, STATE_BYTES_SHARDED
from .planner import PlanResult, check_model_sizes, finish, layer_costs, link_bound_sms, prepare
from .spread import expected_spread, parse_routing

MICRO_BATCHES = (1, 2, 4)
DEEPSEEK_SMS = 20  # DeepSeek-V3 report sec. 3.2.2: 20 of the 132 SMs run the all-to-all
RECOMPUTE = ("none", "selective", "full")
BATCH_SLACK = 0.10  # a layout may round the global batch up by at most this fraction
SEARCHED = ("pp", "ep", "schedule", "micro_batch", "comm_sms", "routing", "fp8_dispatch", "recompute")


class Candidate(NamedTuple):
    """A simulated plan: ``result`` (the full ``PlanResult``), ``tokens_per_s_per_gpu``, and the step's
    parts on the busiest rank (seconds): ``compute``, ``exposed_comm`` (busy but not computing),
    ``bubble`` (idle), ``dp`` (DP sync + optimizer)."""

    plan: ParallelPlan
    result: PlanResult
    tokens_per_s_per_gpu: float
    compute: float
    exposed_comm: float
    bubble: float
    dp: float


class Rejected(NamedTuple):
    """A plan that is not in the ranking: ``wall`` is ``"memory"`` (does not fit: ``memory_gb`` of
    ``capacity_gb``) or ``"bound"`` (its bound ``bound_tokens_per_s_per_gpu`` cannot beat the ranking)."""

    plan: ParallelPlan
    wall: str
    bound_tokens_per_s_per_gpu: float
    memory_gb: float
    capacity_gb: float


class SearchResult(NamedTuple):
    """``ranked``: the best ``top`` fitting plans, best first; ``memory_walls``: the fastest-bounded plans
    that do not fit; ``candidates``: layouts in the space; ``checked``: checked exactly (stages and
    memory); ``simulated``; ``seconds``: wall time of the search; ``global_batch``: sequences per step
    asked for."""

    ranked: list[Candidate]
    memory_walls: list[Rejected]
    candidates: int
    checked: int
    simulated: int
    seconds: float
    global_batch: int


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def default_global_batch(num_gpus: int) -> int:
    """DeepSeek-V3's ratio: 15,360 sequences on 2,048 GPUs (report sec. 4.2), 7.5 per GPU."""
    return max(1, round(7.5 * num_gpus))


def microbatches_for(schedule: str, pp: int, dp: int, micro_batch: int, global_batch: int) -> int | None:
    """The smallest micro-batch count ``schedule`` accepts that covers ``global_batch`` sequences, or None
    if it would exceed it by more than ``BATCH_SLACK``."""
    n = cdiv(global_batch, dp * micro_batch)
    if schedule == "dualpipe":
        n = max(n + n % 2, 2 * pp)
    elif schedule == "dualpipev":
        n = max(n, 2 * pp)
    elif schedule == "interleaved":
        n = round_up(n, pp)
    if n * dp * micro_batch > (1 + BATCH_SLACK) * global_batch:
        return None
    return n


def routing_floor(cfg: MoEConfig) -> int | None:
    """The node limit M a search may use: the model's ``max_nodes_per_token``, else its group limit
    ``topk_group`` (DeepSeek-V3 ties them: 4 nodes, 4 groups, report sec. 2.1.2 and 3.2.2). Fewer nodes
    always send fewer bytes, so a smaller M would always win; it changes the model, so it is not searched."""
    if cfg.max_nodes_per_token:
        return cfg.max_nodes_per_token
    return cfg.topk_group if cfg.n_group > 1 and cfg.topk_group < cfg.n_group else None


def _ep_ok(ep: int, dp: int, experts: int, g: int) -> bool:
    return experts % ep == 0 and dp % ep == 0 and (ep % g == 0 if ep > g else g % ep == 0)


def space(cfg: MoEConfig, cluster: ClusterSpec, fixed: dict | None = None, *, global_batch: int | None = None,
          seq_len: int = 4096, mtp_depth: int = 0, gemm_dtype: str = "fp8") -> list[ParallelPlan]:
    """Every layout of the search space, with the fields in ``fixed`` (names of ``ParallelPlan``) held."""
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(SEARCHED) - {"dp"})
    if unknown:
        raise ValueError(f"search: cannot fix {unknown}; fixable: {sorted(SEARCHED + ('dp',))}")
    g_all = cluster.num_gpus
    gb = global_batch if global_batch is not None else default_global_batch(g_all)
    items = cfg.num_hidden_layers + 2 * mtp_depth + 1
    m = routing_floor(cfg)
    routings = [f"node-limited:{m}", "uniform"] if m else ["uniform"]
    pick = {
        "pp": [d for d in divisors(g_all) if d <= items],
        "schedule": list(SCHEDULES),
        "micro_batch": list(MICRO_BATCHES),
        "comm_sms": ["auto", "link", DEEPSEEK_SMS] if DEEPSEEK_SMS < cluster.sms else ["auto", "link"],
        "routing": routings,
        "fp8_dispatch": [True, False],
        "recompute": list(RECOMPUTE),
    }
    for f in SEARCHED:
        if f in fixed and f != "ep":
            pick[f] = [fixed[f]]
    out: list[ParallelPlan] = []
    links: dict = {}
    for pp in pick["pp"]:
        dp = g_all // pp
        if "dp" in fixed and fixed["dp"] != dp:
            continue
        eps = [e for e in ([fixed["ep"]] if "ep" in fixed else divisors(cfg.n_routed_experts))
               if _ep_ok(e, dp, cfg.n_routed_experts, cluster.gpus_per_node)]
        for sched in pick["schedule"]:
            stages = pp * (2 if sched in ("dualpipev", "interleaved") else 1)
            if stages > items or (sched == "dualpipe" and pp % 2):
                continue
            for mb in pick["micro_batch"]:
                n = microbatches_for(sched, pp, dp, mb, gb)
                if n is None or pp * n * 3 > MAX_SIM_OPS:
                    continue
                try:
                    check_schedule(sched, pp, n)
                except ValueError:
                    continue
                for ep in eps:
                    comm = ep > 1
                    # A node limit at or above the EP group's node count changes nothing: one routing then.
                    rts = pick["routing"] if comm and (m is None or ep // cluster.gpus_per_node > m
                                                       or "routing" in fixed) else [pick["routing"][-1]]
                    for k in (pick["comm_sms"] if comm else ["auto"]):
                        for rt in rts:
                            for f8 in (pick["fp8_dispatch"] if comm else [pick["fp8_dispatch"][0]]):
                                kk = k
                                if k == "link":
                                    kk = _link_k(cfg, cluster, ep, mb, seq_len, rt, f8, links)
                                for rc in pick["recompute"]:
                                    out.append(ParallelPlan(
                                        pp=pp, ep=ep, dp=dp, schedule=sched, comm_sms=kk, fp8_dispatch=f8,
                                        gemm_dtype=gemm_dtype, routing=rt, seq_len=seq_len, micro_batch=mb,
                                        num_microbatches=n, mtp_depth=mtp_depth, recompute=rc))
    return list(dict.fromkeys(out))  # "link" may coincide with 20


def _link_k(cfg: MoEConfig, cl: ClusterSpec, ep: int, mb: int, seq_len: int, routing: str, fp8: bool,
            memo: dict) -> int:
    key = (ep, mb, routing, fp8)
    if key not in memo:
        spread = expected_spread(parse_routing(routing, cfg.max_nodes_per_token), cfg.n_routed_experts,
                                 cfg.num_experts_per_tok, ep, cl.gpus_per_node, tokens=mb * seq_len)
        memo[key] = link_bound_sms(cfg, cl, ParallelPlan(ep=ep, micro_batch=mb, seq_len=seq_len, fp8_dispatch=fp8),
                                   spread)
    return memo[key]


class _Totals(NamedTuple):
    dense: float  # non-expert parameters of the model (embedding, heads once, MTP blocks)
    expert: float


def _totals(cfg: MoEConfig, mtp_depth: int) -> _Totals:
    d = e = 0.0
    for i in range(cfg.num_hidden_layers + mtp_depth):
        x, y = layer_params(cfg, dense=i < cfg.first_k_dense_replace)
        d, e = d + x, e + y
    return _Totals(d + 2 * cfg.hidden_size * cfg.vocab_size, e)


def _bound(cfg: MoEConfig, cl: ClusterSpec, p: ParallelPlan, tot: _Totals, cache: dict) -> tuple[float, float]:
    """(lower bound on the step in seconds, model state bytes of an average rank) — see the module doc."""
    lc = layer_costs(cfg, cl, p, cache)
    serial = p.schedule in ("1f1b", "interleaved")

    def w(lt) -> float:
        f, b = lt.forward(), lt.backward(True)
        return sum(x.seconds for x in f + b if serial or x.stream == 0)

    nd = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    nm = cfg.num_hidden_layers + p.mtp_depth - nd
    work = nd * w(lc.dense) + nm * w(lc.moe) + (1 + p.mtp_depth) * w(lc.head)
    dp, edp = p.dp, p.dp // p.ep
    held = 2 if p.schedule == "dualpipe" else 1  # DualPipe keeps two copies of the model per pipeline
    dense = tot.dense * held / p.pp
    expert = tot.expert * held / p.pp / p.ep
    link = cl.internode_gbps * cl.internode_efficiency * 1e9 if cl.num_nodes > 1 else \
        cl.nvlink_gbps * cl.nvlink_efficiency * 1e9
    dp_sync = 2 * 2 * (dense * (dp - 1) / dp + expert * (edp - 1) / edp) / link
    opt = 28 * (dense / dp + expert / edp) / (cl.hbm_tbps * cl.hbm_efficiency * 1e12)
    state = STATE_BYTES_REPLICATED * (dense + expert) + STATE_BYTES_SHARDED * (dense / dp + expert / edp)
    return p.num_microbatches * work / p.pp + dp_sync + opt, state


def candidate(r: PlanResult) -> Candidate:
    """A ``Candidate`` from a simulated plan (the busiest rank's step split into its parts)."""
    sim = r.sim
    b = max(range(len(sim.busy)), key=lambda i: sim.busy[i])
    return Candidate(r.plan, r, r.step.tokens_per_s_per_gpu, sim.compute_busy[b], sim.busy[b] - sim.compute_busy[b],
                     sim.step_time - sim.busy[b], r.step.dp_sync + r.step.optimizer)


def search(model: MoEConfig | str, cluster: ClusterSpec | str, fixed: dict | None = None, *, top: int = 5,
           global_batch: int | None = None, seq_len: int = 4096, mtp_depth: int = 0, gemm_dtype: str = "fp8",
           exhaustive: bool = False, walls: int = 3, tolerance: float = 0.01) -> SearchResult:
    """The ``top`` fastest plans (tokens/s per GPU) of ``model`` on ``cluster`` that fit in HBM.

    ``fixed``: ``ParallelPlan`` fields to hold (``pp``, ``ep``, ``dp``, ``schedule``, ``micro_batch``,
    ``comm_sms``, ``routing``, ``fp8_dispatch``, ``recompute``); the rest are searched (module doc).
    ``global_batch``: sequences per step (default ``default_global_batch``). ``exhaustive``: simulate
    every candidate that fits (no bound; the reference the tests compare against). ``walls``: how many
    of the fastest non-fitting layouts to report. ``tolerance``: skip a layout whose bound beats the
    ``top``-th best by less than this fraction (the model is not that accurate, and near-ties are many);
    0 makes the search exact (the same ranking as ``exhaustive``). Raises ``ValueError`` when nothing
    in the space fits.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    t0 = time.perf_counter()
    cfg = MoEConfig.preset(model) if isinstance(model, str) else model
    cl = load_cluster(cluster) if isinstance(cluster, str) else cluster
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    check_model_sizes(cfg)
    plans = space(cfg, cl, fixed, global_batch=global_batch, seq_len=seq_len, mtp_depth=mtp_depth,
                  gemm_dtype=gemm_dtype)
    if not plans:
        raise ValueError(f"search: no layout of {cl.num_gpus} GPUs matches {fixed or {}} (check that EP "
                         "divides the experts and DP, and that the global batch covers DP x micro-batch)")
    cache: dict = {}
    tot = _totals(cfg, mtp_depth)
    cap = cl.hbm_gb * 1e9
    # Best-first over upper bounds on tokens/s/GPU: a layout is first known by its closed-form bound
    # (level 0), then by the bound after stages and memory are known (level 1), then by its simulated
    # value (level 2). The popped entry has the highest bound of all; when it is a simulated value, no
    # other layout can beat it, so it is next in the ranking.
    heap: list[tuple[float, int, int, ParallelPlan, object]] = []
    for i, p in enumerate(plans):
        lb, state = _bound(cfg, cl, p, tot, cache)
        ub = p.dp * p.num_microbatches * p.micro_batch * p.seq_len / lb / cl.num_gpus
        if state > cap:
            rejected_state = Rejected(p, "memory", ub, state / 1e9, cl.hbm_gb)
            heap.append((-ub, i, -1, p, rejected_state))
        else:
            heap.append((-ub, i, 0, p, None))
    heapq.heapify(heap)
    ranked: list[Candidate] = []
    rejected: list[Rejected] = []
    checked = simulated = 0
    done: list[Candidate] = []  # simulated, waiting for every higher bound to be resolved
    while heap and (exhaustive or len(ranked) < top):
        neg_ub, i, level, p, data = heapq.heappop(heap)
        ub = -neg_ub
        # A simulated value within `tolerance` of every remaining bound is accepted as it stands.
        while done and not exhaustive and done[0].tokens_per_s_per_gpu * (1 + tolerance) >= ub \
                and len(ranked) < top:
            ranked.append(done.pop(0))
        if len(ranked) >= top and not exhaustive:
            break
        if level == -1:
            rejected.append(data)
        elif level == 0:
            checked += 1
            pr = prepare(cfg, cl, p, cache)
            if not pr.memory.fits:
                rejected.append(Rejected(p, "memory", ub, pr.memory.total / 1e9, cl.hbm_gb))
                continue
            tokens = p.dp * p.num_microbatches * p.micro_batch * p.seq_len
            heapq.heappush(heap, (-min(ub, tokens / pr.step_lower_bound / cl.num_gpus), i, 1, p, pr))
        elif level == 1:
            simulated += 1
            c = candidate(finish(data, cache))
            heapq.heappush(heap, (-c.tokens_per_s_per_gpu, i, 2, p, c))
        else:
            done.append(data)
            done.sort(key=lambda c: -c.tokens_per_s_per_gpu)
            if not exhaustive:
                ranked.append(done.pop(0))
    while done and len(ranked) < (len(done) + len(ranked) if exhaustive else top):
        ranked.append(done.pop(0))
    ranked.sort(key=lambda c: -c.tokens_per_s_per_gpu)
    if not ranked:
        best = max(rejected, key=lambda r: r.bound_tokens_per_s_per_gpu, default=None)
        raise ValueError(f"search: none of the {len(plans):,} layouts fits in {cl.hbm_gb:g} GB per GPU"
                         + (f" (smallest need found: {min(r.memory_gb for r in rejected):.1f} GB)" if best else ""))
    best = ranked[0].tokens_per_s_per_gpu
    mem = sorted((r for r in rejected if r.bound_tokens_per_s_per_gpu > best),
                 key=lambda r: -r.bound_tokens_per_s_per_gpu)
    gb = global_batch if global_batch is not None else default_global_batch(cl.num_gpus)
    return SearchResult(ranked[:top] if not exhaustive else ranked, mem[:walls], len(plans), checked, simulated,
                        time.perf_counter() - t0, gb)


def wall(c: Candidate, best: Candidate) -> str:
    """Why ``c`` is slower than ``best``: the part of the step (compute, exposed communication, bubble,
    DP sync) that grew the most, with the seconds."""
    d = {"compute": c.compute - best.compute, "exposed communication": c.exposed_comm - best.exposed_comm,
         "bubble": c.bubble - best.bubble, "DP sync + optimizer": c.dp - best.dp}
    name, sec = max(d.items(), key=lambda kv: kv[1])
    if c is best or sec <= 0:
        return "-"
    return f"{name} +{sec:.2f} s"


def describe(p: ParallelPlan) -> dict:
    """The searched fields of a plan, for tables and JSON."""
    return {f: getattr(p, f) for f in ("pp", "ep", "dp", "schedule", "micro_batch", "num_microbatches", "comm_sms",
                                       "routing", "fp8_dispatch", "recompute")}
