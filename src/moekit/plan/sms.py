"""How many SMs EP communication needs, two ways, side by side.

1. **DeepEP V2's closed form** (``ElasticBuffer.get_theoretical_num_sms`` in deepseek-ai/DeepEP,
   ``deep_ep/buffers/elastic.py``; re-derived here from its description, for balanced routing only —
   its docstring says not to use it for V3's group-limited gate). Per token-unit of dispatched data it
   counts the HBM bytes the comm SMs read and write and the bytes on the binding link (RDMA between
   nodes, or NVLink), with ``t_k(G) = G (1 - C(E - E/G, k) / C(E, k))`` the expected number of the G
   equal groups a token's top-k touches:

   - reads: ``1/t_k(R)`` (the token itself); with several scale-out domains also the forwarded copies,
     ``t_k(N)/t_k(R)``;
   - writes, several scale-out domains (N > 1): the send buffer ``1/t_k(R)``, the local bypass
     ``t_k(N)/(N t_k(R))`` and the scale-up issue ``1``; RDMA traffic ``t_k(N)(1 - 1/N)/t_k(R)``, NVLink
     traffic ``1 - 1/G``;
   - writes, one scale-out domain: the NVLink issue ``G/R`` (+ the send buffer ``1/t_k(R)`` when there
     are RDMA peers); NVLink traffic ``G/R (1 - 1/G)``, RDMA ``(R - G)/R``;
   - SMs = ``max(link_GBps / traffic * reads / read_GBps_per_SM, link_GBps / traffic * writes /
     write_GBps_per_SM)`` for the binding link, times 1.25, at least 4, rounded up to even (at least 64
     when overlap with compute is not preferred), at most the GPU's SMs. DeepEP's defaults are 200 GB/s
     read and 50 GB/s write per SM.

2. **moekit's smallest k that hides the communication** (``planner.smallest_hiding_sms``): simulate an
   F&B pair of 4 MoE layers with ``k`` SMs moving ``comm_gbps_per_sm`` each and take the smallest ``k``
   for which 95% of its communication runs under compute — it depends on the model's compute per
   token, which DeepEP's form (a pure bandwidth balance) does not see. ``link_bound_sms``: the smallest
   k at which transfers run at link speed.

``comm_gbps_per_sm`` defaults to 10.5 GB/s (DeepSeek-V3's "20 SMs saturate IB + NVLink": (50 + 160) / 20);
``measured_gbps_per_sm`` reads the figure ``bench/sm_split.py`` measures on a GPU
(``reports/sm_split.json``, key ``gbps_per_sm``) so that the command line uses it when it exists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from .._util import check_positive_int
from ..config import MoEConfig
from .cluster import ClusterSpec, ParallelPlan
from .planner import link_bound_sms, smallest_hiding_sms
from .spread import expected_spread, parse_routing

SM_SPLIT_JSON = Path("reports") / "sm_split.json"


def _expected_groups(num_experts: int, top_k: int, groups: int) -> float:
    return groups * (1 - math.comb(num_experts - num_experts // groups, top_k) / math.comb(num_experts, top_k))


def deepep_theoretical_sms(num_experts: int, top_k: int, ep: int, gpus_per_node: int, *, rdma_gbps: float,
                           nvlink_gbps: float, device_sms: int, sm_read_gbps: float = 200.0,
                           sm_write_gbps: float = 50.0, prefer_overlap: bool = True) -> int:
    """DeepEP V2's SM count for ``ep`` ranks of ``gpus_per_node`` per NVLink domain (module docstring).

    ``rdma_gbps`` / ``nvlink_gbps``: link bandwidths per GPU (GB/s); ``device_sms``: the GPU's SMs.
    Returns an even count in ``[4, device_sms]`` (``device_sms`` when nothing is sent)."""
    for name, v in (("num_experts", num_experts), ("top_k", top_k), ("ep", ep), ("gpus_per_node", gpus_per_node),
                    ("device_sms", device_sms)):
        check_positive_int(name, v)
    if num_experts % ep:
        raise ValueError(f"ep ({ep}) must divide num_experts ({num_experts})")
    up = min(ep, gpus_per_node)  # scale-up (NVLink) ranks
    out = ep // up  # scale-out domains
    t_r = _expected_groups(num_experts, top_k, ep)
    t_n = _expected_groups(num_experts, top_k, out) if out > 1 else 0.0
    read, write = 1 / t_r, 0.0
    if out > 1:
        write += 1 / t_r + (1 / t_r) * (t_n / out) + 1
        rdma = (1 / t_r) * t_n * (1 - 1 / out)
        read += t_n / t_r
        nvl = 1 - 1 / up
    else:
        write += up / ep
        nvl = up / ep * (1 - 1 / up)
        rdma = (ep - up) / ep
    if out > 1 and rdma / rdma_gbps > nvl / nvlink_gbps:
        traffic, gbps = rdma, rdma_gbps
    else:
        traffic, gbps = nvl, nvlink_gbps
    sms = float(device_sms)
    if traffic > 0:
        sms = max(gbps / traffic * read / sm_read_gbps, gbps / traffic * write / sm_write_gbps)
    n = max(4, math.ceil(sms * 1.25))
    n += n % 2
    if not prefer_overlap:
        n = max(n, 64)
    return min(n, device_sms)


class SmRow(NamedTuple):
    """One cluster: DeepEP's closed form and moekit's counts (uniform and node-limited routing)."""

    cluster: str
    ep: int
    deepep: int
    moekit_hide_uniform: int | None
    moekit_hide_node_limited: int | None
    moekit_link_bound: int
    comm_gbps_per_sm: float


def sm_table(model: MoEConfig, clusters: list[ClusterSpec], ep: int = 64, *, seq_len: int = 4096,
             node_limit: int | None = 4) -> list[SmRow]:
    """``SmRow`` for each cluster (EP ``ep`` or the cluster size if smaller), a micro-batch of one sequence."""
    rows = []
    for cl in clusters:
        e = min(ep, cl.num_gpus)
        spread_u = expected_spread(parse_routing("uniform"), model.n_routed_experts, model.num_experts_per_tok, e,
                                   cl.gpus_per_node, tokens=seq_len)
        p = ParallelPlan(ep=e, seq_len=seq_len, recompute="selective")
        hide_u = smallest_hiding_sms(model, cl, p, spread_u)
        hide_n = None
        if node_limit is not None and e // cl.gpus_per_node > node_limit:
            spread_n = expected_spread(parse_routing(f"node-limited:{node_limit}"), model.n_routed_experts,
                                       model.num_experts_per_tok, e, cl.gpus_per_node, tokens=seq_len)
            hide_n = smallest_hiding_sms(model, cl, p, spread_n)
        rows.append(SmRow(cl.name, e, deepep_theoretical_sms(
            model.n_routed_experts, model.num_experts_per_tok, e, cl.gpus_per_node, rdma_gbps=cl.internode_gbps,
            nvlink_gbps=cl.nvlink_gbps, device_sms=cl.sms), hide_u, hide_n, link_bound_sms(model, cl, p, spread_u),
            cl.comm_gbps_per_sm))
    return rows


def measured_gbps_per_sm(path: str | Path | None = None) -> tuple[float, str] | None:
    """``(gbps_per_sm, where)`` from ``bench/sm_split.py``'s JSON (default ``reports/sm_split.json`` in the
    current directory, then in the checkout), or None when there is none. ``ValueError`` when the file
    exists but does not hold a finite positive ``gbps_per_sm``."""
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = [Path.cwd() / SM_SPLIT_JSON, Path(__file__).resolve().parents[3] / SM_SPLIT_JSON]
    for p in candidates:
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(p)!r}: not readable JSON ({e})") from None
        v = data.get("gbps_per_sm") if isinstance(data, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{str(p)!r}: gbps_per_sm must be a finite number > 0, got {v!r}")
        where = str(p)
        if isinstance(data.get("device"), str):
            where += f" (measured on {data['device']})"
        return float(v), where
    return None
