"""Expected fan-out of a token under a routing model: how many nodes and EP ranks its top-k experts
touch, and how unevenly the ranks are loaded.

DeepEP-style dispatch sends a token once per destination *node* over the inter-node link (to the GPU
with the same local index there) and once per destination *rank* over NVLink (from that proxy, or
directly inside the own node). So the bytes are set by distinct nodes and distinct ranks, not by k.

Models (E experts, k per token, R EP ranks of E/R experts, N nodes of G ranks):
- ``uniform``: the k experts are a uniform random k-subset of E. A group of g experts is touched
  with probability ``1 - C(E-g, k) / C(E, k)``.
- ``node-limited:M``: M of the N nodes are chosen uniformly, then a uniform k-subset of their
  ``M*E/N`` experts (DeepSeek-V3's node/group-limited routing with balanced loads).
- ``histogram``: measured loads ``w_e``; expert e is chosen with marginal ``p_e = min(1, k*w_e/sum w)``,
  independently (an approximation: the true top-k is without replacement); the busiest rank sets the
  imbalance.
"""

from __future__ import annotations

import json
import math
from math import comb
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .cluster import read_text_file


class Routing(NamedTuple):
    """A parsed routing model. ``kind``: uniform / node-limited / histogram; ``max_nodes`` for
    node-limited; ``loads`` (float64 ``[E]`` or ``[layers, E]``) for histogram."""

    kind: str
    max_nodes: int | None = None
    loads: np.ndarray | None = None

    def describe(self) -> str:
        if self.kind == "node-limited":
            return f"node-limited:{self.max_nodes}"
        return self.kind


class Spread(NamedTuple):
    """Expected per-token fan-out of one MoE layer on one EP group.

    nodes / ranks: distinct destination nodes / EP ranks; remote_nodes: nodes other than the
    sender's (inter-node copies); nvlink_copies: NVLink copies (distinct ranks minus the one reached
    without an NVLink hop: the sender itself, or the same-index proxy on a remote node);
    imbalance: busiest rank's expert load / mean (>= 1).
    """

    nodes: float
    ranks: float
    remote_nodes: float
    nvlink_copies: float
    imbalance: float


def parse_routing(spec: str | Routing | None, max_nodes_per_token: int | None = None) -> Routing:
    """``"uniform"``, ``"node-limited:M"``, ``"histogram:PATH"`` (JSON list, or list of per-layer lists;
    ``.npy``; ``.pt``) or a ``Routing``. None: node-limited when the model sets ``max_nodes_per_token``."""
    if isinstance(spec, Routing):
        return spec
    if spec is None:
        return Routing("node-limited", max_nodes_per_token) if max_nodes_per_token else Routing("uniform")
    if not isinstance(spec, str):
        raise TypeError(f"routing must be a str or Routing, got {type(spec).__name__}")
    if spec == "uniform":
        return Routing("uniform")
    if spec.startswith("node-limited:"):
        try:
            m = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"routing {spec!r}: expected node-limited:M with an int M") from None
        if m < 1:
            raise ValueError(f"routing {spec!r}: M must be >= 1")
        return Routing("node-limited", m)
    if spec.startswith("histogram:"):
        return Routing("histogram", loads=load_histogram(spec.split(":", 1)[1]))
    raise ValueError(f"routing must be 'uniform', 'node-limited:M' or 'histogram:PATH', got {spec!r}")


def load_histogram(path: str | Path) -> np.ndarray:
    """Expert loads, float64 ``[E]`` or ``[layers, E]`` (e.g. ``torch.stack`` of each layer's
    ``moekit.routing.balance.ExpertLoad.total``, saved with ``torch.save``). ``ValueError`` naming the
    file for anything else (missing, a directory, unreadable, not a numeric array, a ``.pt`` that does
    not hold one tensor)."""
    p = Path(path)
    what = "routing histogram"
    if not p.exists() or p.is_dir() or p.suffix not in (".npy", ".pt"):
        text = read_text_file(p, what)
        try:
            return _check_loads(np.asarray(json.loads(text), dtype=np.float64))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{what} {str(p)!r}: expected a JSON list of loads (or a list per layer): "
                             f"{' '.join(str(e).split())}") from None
    try:
        if p.suffix == ".npy":
            a = np.load(p, allow_pickle=False)
        else:
            import torch

            a = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(a, torch.Tensor):
                raise ValueError(f"holds a {type(a).__name__}, not a tensor")
            if a.is_complex() or a.dtype == torch.bool:
                raise ValueError(f"holds a {a.dtype} tensor, not a real one")
            a = a.detach().double().numpy()
    except ValueError as e:
        raise ValueError(f"{what} {str(p)!r}: {' '.join(str(e).split())}") from None
    except Exception as e:  # unpickling / zip / OS errors: all mean "not a saved array"
        raise ValueError(f"{what} {str(p)!r}: not a readable {p.suffix} array ({type(e).__name__})") from None
    try:
        return _check_loads(a)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} {str(p)!r}: {e}") from None


def _check_loads(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim not in (1, 2) or a.size == 0:
        raise ValueError(f"expert-load histogram must be [E] or [layers, E], got shape {a.shape}")
    if (a < 0).any() or not np.isfinite(a).all() or (np.atleast_2d(a).sum(-1) <= 0).any():
        raise ValueError("expert-load histogram must be finite, >= 0 and no layer all zero")
    return a


def _p_touch(e: int, g: int, k: int) -> float:
    """P(a uniform k-subset of e items meets a fixed group of g of them)."""
    return 1.0 - comb(e - g, k) / comb(e, k)


def sampling_imbalance(tokens: int, top_k: int, ep: int) -> float:
    """Busiest rank's load / mean when ``tokens`` tokens each pick ``top_k`` experts, balanced in
    expectation: the per-rank row counts are close to Poisson with mean ``mu = tokens * top_k / ep``, and
    the largest of ``ep`` such counts is about ``mu + sqrt(2 mu ln ep)`` (the Gaussian extreme-value
    estimate). A micro-batch is a sample: even perfectly balanced routing leaves its busiest rank
    ``1 + sqrt(2 ln(ep) / mu)`` times the mean (1.13 for DeepSeek-V3's 4096 tokens on EP64)."""
    if ep <= 1 or tokens <= 0:
        return 1.0
    mu = tokens * top_k / ep
    return 1.0 + math.sqrt(2.0 * math.log(ep) / mu)


def expected_spread(routing: Routing, num_experts: int, top_k: int, ep: int, gpus_per_node: int,
                    tokens: int | None = None) -> Spread:
    """The fan-out of one token among ``ep`` ranks (``ep/gpus_per_node`` nodes, at least 1).

    ``tokens``: the micro-batch size; when given, the uniform and node-limited models carry the
    ``sampling_imbalance`` of that many tokens (a histogram carries its own)."""
    if num_experts % ep:
        raise ValueError(f"ep ({ep}) must divide the number of routed experts ({num_experts})")
    g = min(ep, gpus_per_node)
    n = max(ep // gpus_per_node, 1)
    per_rank, per_node = num_experts // ep, num_experts // n
    if routing.kind == "histogram":
        loads = routing.loads
        if loads.shape[-1] != num_experts:
            raise ValueError(f"histogram has {loads.shape[-1]} experts, the model {num_experts}")
        if loads.ndim == 2:  # per layer: average the layers' spreads (each layer waits for its own busiest rank)
            per = [expected_spread(Routing("histogram", loads=row), num_experts, top_k, ep, gpus_per_node)
                   for row in loads]
            return Spread(*(float(np.mean([sp[i] for sp in per])) for i in range(5)))
        p = np.minimum(1.0, top_k * loads / loads.sum())
        miss = 1.0 - p
        ranks_hit = 1.0 - miss.reshape(ep, per_rank).prod(1)
        nodes_hit = 1.0 - miss.reshape(n, per_node).prod(1)
        rank_load = loads.reshape(ep, per_rank).sum(1)
        ranks, nodes = float(ranks_hit.sum()), float(nodes_hit.sum())
        imbalance = float(rank_load.max() / rank_load.mean())
    else:
        if routing.kind == "node-limited" and routing.max_nodes < n:
            m = routing.max_nodes
            pool = m * per_node
            if top_k > pool:
                raise ValueError(f"routing node-limited:{m}: top-k ({top_k}) exceeds the {pool} experts of {m} nodes")
            nodes = m * _p_touch(pool, per_node, top_k)
            ranks = m * g * _p_touch(pool, per_rank, top_k)
        else:
            nodes = n * _p_touch(num_experts, per_node, top_k)
            ranks = ep * _p_touch(num_experts, per_rank, top_k)
        imbalance = sampling_imbalance(tokens, top_k, ep) if tokens is not None else 1.0
    return Spread(nodes, ranks, nodes * (n - 1) / n, ranks * (g - 1) / g, imbalance)
