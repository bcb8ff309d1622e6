"""``ClusterSpec`` (the machines) and ``ParallelPlan`` (how a model is laid out on them), with presets
and YAML/JSON loading.

Units: bandwidths in GB/s (1e9 bytes/s) per GPU and per direction, compute in TFLOP/s (1e12) dense,
HBM in TB/s. Efficiencies are the achievable fractions of those peaks; their defaults and the public
figures behind them are listed in docs/planner.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

from .schedules import SCHEDULES, check_schedule


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    name: str = "custom"
    num_nodes: int = 1
    gpus_per_node: int = 8
    nvlink_gbps: float = 160.0  # intra-node, per GPU, per direction
    internode_gbps: float = 50.0  # per GPU (one NIC per GPU), per direction
    sms: int = 132
    bf16_tflops: float = 989.0
    fp8_tflops: float | None = 1979.0  # None: no FP8 tensor cores
    hbm_tbps: float = 3.35
    hbm_gb: float = 80.0
    # achievable fractions (see docs/planner.md for the figures behind the defaults)
    fp8_gemm_efficiency: float = 0.68  # DeepGEMM on H800, DeepSeek-V3's own GEMM shapes (docs/planner.md)
    bf16_gemm_efficiency: float = 0.80  # ~790 of 989 TFLOP/s measured on an H200 (REFERENCE.md)
    attention_efficiency: float = 0.50  # BF16 attention core (assumed; FlashAttention-class kernels)
    hbm_efficiency: float = 0.90  # ~4.3 of 4.8 TB/s measured copy on an H200 (REFERENCE.md)
    nvlink_efficiency: float = 0.95  # DeepEP intranode 153-158 of ~160 GB/s
    internode_efficiency: float = 0.92  # DeepEP internode 43-46 (first README) .. 58 GB/s of ~50
    comm_gbps_per_sm: float = 10.5  # bytes (IB + NVLink) one SM moves in a comm kernel; see docs
    p2p_latency_us: float = 10.0  # fixed cost of one pipeline send

    def __post_init__(self) -> None:
        for f in ("num_nodes", "gpus_per_node", "sms"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ClusterSpec.{f} must be a positive int, got {v!r}")
        for f in ("nvlink_gbps", "internode_gbps", "bf16_tflops", "hbm_tbps", "hbm_gb", "comm_gbps_per_sm"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"ClusterSpec.{f} must be > 0, got {v!r}")
        if self.fp8_tflops is not None and not self.fp8_tflops > 0:
            raise ValueError(f"ClusterSpec.fp8_tflops must be > 0 or None, got {self.fp8_tflops!r}")
        for f in ("fp8_gemm_efficiency", "bf16_gemm_efficiency", "attention_efficiency", "hbm_efficiency",
                  "nvlink_efficiency", "internode_efficiency"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not 0 < v <= 1.5:
                raise ValueError(f"ClusterSpec.{f} must be in (0, 1.5], got {v!r}")
        if self.p2p_latency_us < 0:
            raise ValueError(f"ClusterSpec.p2p_latency_us must be >= 0, got {self.p2p_latency_us!r}")
        if self.sms < 2:
            raise ValueError(f"ClusterSpec.sms must be >= 2 (one for comm, one for compute), got {self.sms}")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def replace(self, **changes: Any) -> ClusterSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, /, **overrides: Any) -> ClusterSpec:
        """``h800x2048`` (DeepSeek-V3's cluster), ``h200x8``, ``h100x64``."""
        if name not in CLUSTER_PRESETS:
            raise ValueError(f"unknown cluster preset {name!r}; choose from {sorted(CLUSTER_PRESETS)}")
        return cls(**{**CLUSTER_PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterSpec:
        """Build from a mapping; a ``preset`` key starts from that preset. Unknown keys raise ``ValueError``."""
        d = dict(d)
        base = d.pop("preset", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ClusterSpec field(s) {unknown}; known: {sorted(names)}")
        return cls.preset(base, **d) if base else cls(**d)


CLUSTER_PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 report: 2048 H800, 8 per node, NVLink ~160 GB/s, IB ~50 GB/s per GPU.
    "h800x2048": dict(num_nodes=256, gpus_per_node=8, nvlink_gbps=160.0, internode_gbps=50.0, sms=132,
                      bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tbps=3.35),
    # One H200 node (datasheet: NVLink 900 GB/s both directions, HBM 4.8 TB/s).
    "h200x8": dict(num_nodes=1, gpus_per_node=8, nvlink_gbps=450.0, internode_gbps=50.0, sms=132,
                   bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tbps=4.8, hbm_gb=141.0),
    # 8 H100 SXM nodes, one 400 Gb/s NIC per GPU.
    "h100x64": dict(num_nodes=8, gpus_per_node=8, nvlink_gbps=450.0, internode_gbps=50.0, sms=132,
                    bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tbps=3.35),
}


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """How one training step is laid out.

    ``pp`` pipeline ranks (devices); ``dp`` data-parallel replicas of the dense part (None: fill the
    cluster, ``num_gpus // pp``); ``ep`` expert-parallel ranks inside each DP group (``dp % ep == 0``),
    placed on consecutive GPUs of consecutive nodes. ``comm_sms``: SMs given to EP communication
    kernels, or ``"auto"`` (the smallest number that hides communication). ``routing``: ``"uniform"``,
    ``"node-limited:M"``, ``"histogram:PATH"`` or None (node-limited when ``MoEConfig.max_nodes_per_token``
    is set, else uniform). One step processes ``global_batch`` sequences of ``seq_len`` tokens, in
    micro-batches of ``micro_batch`` sequences per DP replica. ``mtp_depth`` extra MoE blocks + head
    (DeepSeek-V3's multi-token prediction) on the last stage.
    """

    pp: int = 1
    ep: int = 1
    dp: int | None = None
    schedule: str = "1f1b"
    comm_sms: int | str = "auto"
    fp8_dispatch: bool = True
    gemm_dtype: str = "fp8"
    routing: str | None = None
    seq_len: int = 4096
    micro_batch: int = 1
    global_batch: int | None = None  # sequences per step; None: 4*pp micro-batches per pipeline
    num_microbatches: int | None = None  # per pipeline; derived from global_batch when None
    mtp_depth: int = 0

    def __post_init__(self) -> None:
        for f in ("pp", "ep", "seq_len", "micro_batch"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ParallelPlan.{f} must be a positive int, got {v!r}")
        for f in ("dp", "global_batch", "num_microbatches"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"ParallelPlan.{f} must be a positive int or None, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ParallelPlan.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "dualpipe" and self.pp % 2:
            raise ValueError(f"ParallelPlan: dualpipe needs an even pp, got pp={self.pp}")
        if not (self.comm_sms == "auto" or (isinstance(self.comm_sms, int) and not isinstance(self.comm_sms, bool)
                                            and self.comm_sms >= 1)):
            raise ValueError(f"ParallelPlan.comm_sms must be a positive int or 'auto', got {self.comm_sms!r}")
        if self.gemm_dtype not in ("fp8", "bf16"):
            raise ValueError(f"ParallelPlan.gemm_dtype must be 'fp8' or 'bf16', got {self.gemm_dtype!r}")
        if self.mtp_depth < 0:
            raise ValueError(f"ParallelPlan.mtp_depth must be >= 0, got {self.mtp_depth}")

    def resolve(self, cluster: ClusterSpec, n_routed_experts: int) -> ResolvedPlan:
        """Check the plan against a cluster and a model; fill ``dp`` and ``num_microbatches``."""
        dp = self.dp if self.dp is not None else cluster.num_gpus // self.pp
        if dp < 1:
            raise ValueError(f"pp ({self.pp}) exceeds the cluster's {cluster.num_gpus} GPUs")
        if self.pp * dp > cluster.num_gpus:
            raise ValueError(f"pp*dp = {self.pp}*{dp} = {self.pp * dp} GPUs asked, but cluster {cluster.name!r} "
                             f"has {cluster.num_gpus}")
        if n_routed_experts % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide the number of routed experts ({n_routed_experts})")
        if dp % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide dp ({dp}): EP groups are carved out of DP replicas")
        g = cluster.gpus_per_node
        if self.ep > g and self.ep % g:
            raise ValueError(f"ep ({self.ep}) larger than a node must be a multiple of gpus_per_node ({g})")
        if self.ep < g and g % self.ep:
            raise ValueError(f"ep ({self.ep}) smaller than a node must divide gpus_per_node ({g})")
        if self.comm_sms != "auto" and self.comm_sms >= cluster.sms:
            raise ValueError(f"comm_sms ({self.comm_sms}) must be < the GPU's SMs ({cluster.sms})")
        if self.gemm_dtype == "fp8" and cluster.fp8_tflops is None:
            raise ValueError(f"gemm_dtype='fp8' but cluster {cluster.name!r} has no FP8 rate (fp8_tflops=None)")
        if self.num_microbatches is not None:
            n = self.num_microbatches
        else:
            gb = self.global_batch if self.global_batch is not None else dp * self.micro_batch * 4 * self.pp
            if gb % (dp * self.micro_batch):
                raise ValueError(f"global_batch ({gb}) must be a multiple of dp*micro_batch "
                                 f"({dp}*{self.micro_batch})")
            n = gb // (dp * self.micro_batch)
        check_schedule(self.schedule, self.pp, n)
        return ResolvedPlan(self, dp, n)


class ResolvedPlan(NamedTuple):
    """A ``ParallelPlan`` checked against a cluster, with ``dp`` and ``num_microbatches`` filled in."""

    plan: ParallelPlan
    dp: int
    num_microbatches: int


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file into a dict; ``ValueError`` if it is not a mapping."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"no such file: {str(p)!r}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def load_cluster(name_or_path: str | Path) -> ClusterSpec:
    """A preset name, or a YAML/JSON file of ``ClusterSpec`` fields (optionally ``preset: NAME`` + overrides)."""
    if isinstance(name_or_path, str) and name_or_path in CLUSTER_PRESETS:
        return ClusterSpec.preset(name_or_path)
    p = Path(name_or_path)
    if not p.exists():
        raise ValueError(f"cluster {str(name_or_path)!r} is neither a preset ({sorted(CLUSTER_PRESETS)}) "
                         "nor a file")
    d = load_file(p)
    d.setdefault("name", p.stem)
    return ClusterSpec.from_dict(d)


def load_plan(path: str | Path) -> ParallelPlan:
    """A YAML/JSON file of ``ParallelPlan`` fields."""
    d = load_file(path)
    names = {f.name for f in dataclasses.fields(ParallelPlan)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown ParallelPlan field(s) {unknown}; known: {sorted(names)}")
    return ParallelPlan(**d)
