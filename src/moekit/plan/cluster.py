"""``ClusterSpec`` (the machines) and ``ParallelPlan`` (how a model is laid out on them), with presets
and YAML/JSON loading.

Units: bandwidths in GB/s (1e9 bytes/s) per GPU and per direction, compute in TFLOP/s (1e12) dense,
HBM in TB/s. Efficiencies are the achievable fractions of those peaks; their defaults and the public
figures behind them are listed in docs/planner.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from ..schedule import SCHEDULES, check_schedule

RECOMPUTE = ("none", "selective", "full")

# Ceilings on sizes, so that a typo (``--num-microbatches 1e8``) is refused with a reason instead of
# running for minutes or exhausting memory. The simulator costs ~20 us and ~1 kB per op on this
# 2-core machine (the 2,048-GPU DeepSeek-V3 step: ~6k ops in 0.1-0.2 s), so 500k ops is ~10 s / ~0.5 GB.
MAX_SIM_OPS = 500_000
_MAX_INT = {"num_nodes": 1 << 20, "gpus_per_node": 1024, "sms": 1024}  # the SM sweep walks 1..sms-1


def check_int(name: str, v: Any, lo: int = 1, hi: int | None = None) -> int:
    """``v`` as an int in ``[lo, hi]``; ``ValueError``/``TypeError`` naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi:,}]"
        raise ValueError(f"{name} must be {rng}, got {v!r}")
    return v


def check_float(name: str, v: Any, *, positive: bool, what: str | None = None) -> float:
    """``v`` as a finite real number, ``> 0`` (``positive``) or ``>= 0``; errors name ``name``."""
    what = what or ("a finite number > 0" if positive else "a finite number >= 0")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be {what}, got {v!r} ({type(v).__name__})")
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return float(v)


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
    bf16_gemm_efficiency: float = 0.80  # ~790 of 989 TFLOP/s: bf16 8192^3 GEMM measured on an H200
    attention_efficiency: float = 0.50  # BF16 attention core (assumed; FlashAttention-class kernels)
    hbm_efficiency: float = 0.90  # ~4.3 of 4.8 TB/s: device-to-device copy measured on an H200
    nvlink_efficiency: float = 0.95  # DeepEP intranode 153-158 of ~160 GB/s
    internode_efficiency: float = 0.92  # DeepEP internode 43-46 (first README) .. 58 GB/s of ~50
    comm_gbps_per_sm: float = 10.5  # bytes (IB + NVLink) one SM moves in a comm kernel; see docs
    p2p_latency_us: float = 10.0  # fixed cost of one pipeline send

    def __post_init__(self) -> None:
        for f in ("num_nodes", "gpus_per_node", "sms"):
            check_int(f"ClusterSpec.{f}", getattr(self, f), 1, _MAX_INT[f])
        if self.sms < 2:
            raise ValueError(f"ClusterSpec.sms must be >= 2 (one for comm, one for compute), got {self.sms}")
        for f in ("nvlink_gbps", "internode_gbps", "bf16_tflops", "hbm_tbps", "hbm_gb", "comm_gbps_per_sm"):
            check_float(f"ClusterSpec.{f}", getattr(self, f), positive=True)
        if self.fp8_tflops is not None:
            check_float("ClusterSpec.fp8_tflops", self.fp8_tflops, positive=True, what="> 0 or None")
        for f in ("fp8_gemm_efficiency", "bf16_gemm_efficiency", "attention_efficiency", "hbm_efficiency",
                  "nvlink_efficiency", "internode_efficiency"):
            v = getattr(self, f)
            check_float(f"ClusterSpec.{f}", v, positive=True, what="in (0, 1.5]")
            if v > 1.5:
                raise ValueError(f"ClusterSpec.{f} must be in (0, 1.5], got {v!r}")
        check_float("ClusterSpec.p2p_latency_us", self.p2p_latency_us, positive=False)
        if not isinstance(self.name, str):
            raise TypeError(f"ClusterSpec.name must be a str, got {type(self.name).__name__}")

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def replace(self, **changes: Any) -> ClusterSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, /, **overrides: Any) -> ClusterSpec:
        """A GPU (``h800``, ``h100``, ``h200``, ``b200``, ``gb200``, ``gb300``, ``mi300x``: one node, or an
        NVL72 rack), ``GPUxN`` for N of them (``h800x2048`` is DeepSeek-V3's cluster), or a named size."""
        return cls(**{**_preset_fields(name), "name": name, **overrides})

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


# GPU presets. Rates are dense (no sparsity) peaks from the vendors' datasheets; NVLink is per GPU and
# per direction (half the datasheet's bidirectional figure); internode is one NIC per GPU. A preset
# ``NAME`` is one node of ``gpus_per_node``; ``NAMExG`` (e.g. ``gb200x256``) is G GPUs of it.
_GPUS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 report (arXiv 2412.19437) sec. 3.1: H800 nodes of 8, NVLink ~160 GB/s, IB ~50 GB/s per
    # GPU; compute and HBM as the H100 SXM (NVIDIA H100 datasheet).
    "h800": dict(num_nodes=1, gpus_per_node=8, nvlink_gbps=160.0, internode_gbps=50.0, sms=132,
                 bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tbps=3.35, hbm_gb=80.0),
    # NVIDIA H100 SXM datasheet: 989 / 1979 TFLOP/s dense BF16 / FP8, 80 GB at 3.35 TB/s, NVLink 900 GB/s
    # (both directions); ConnectX-7 400 Gb/s per GPU (DGX H100).
    "h100": dict(num_nodes=1, gpus_per_node=8, nvlink_gbps=450.0, internode_gbps=50.0, sms=132,
                 bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tbps=3.35, hbm_gb=80.0),
    # NVIDIA H200 datasheet: H100 compute, 141 GB at 4.8 TB/s.
    "h200": dict(num_nodes=1, gpus_per_node=8, nvlink_gbps=450.0, internode_gbps=50.0, sms=132,
                 bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tbps=4.8, hbm_gb=141.0),
    # NVIDIA DGX B200 datasheet (8 GPUs: 72 PFLOP/s FP8 with sparsity -> 4.5 dense per GPU; BF16 half
    # that; 1,440 GB HBM3e at 64 TB/s; NVLink 5 1.8 TB/s per GPU; 8x ConnectX-7 400 Gb/s). 148 SMs.
    "b200": dict(num_nodes=1, gpus_per_node=8, nvlink_gbps=900.0, internode_gbps=50.0, sms=148,
                 bf16_tflops=2250.0, fp8_tflops=4500.0, hbm_tbps=8.0, hbm_gb=180.0),
    # NVIDIA GB200 NVL72 datasheet (72 GPUs: FP8 720 PFLOP/s and BF16 360 PFLOP/s with sparsity -> 5.0 /
    # 2.5 dense per GPU; HBM3e 186 GB at 8 TB/s per GPU; NVLink 1.8 TB/s per GPU across the rack;
    # ConnectX-7 400 Gb/s per GPU). The NVLink domain is the rack, so a "node" here is 72 GPUs.
    "gb200": dict(num_nodes=1, gpus_per_node=72, nvlink_gbps=900.0, internode_gbps=50.0, sms=148,
                  bf16_tflops=2500.0, fp8_tflops=5000.0, hbm_tbps=8.0, hbm_gb=186.0),
    # NVIDIA GB300 NVL72 datasheet: dense FP8 as GB200 (5 PFLOP/s per GPU; Blackwell Ultra adds FP4, not
    # FP8), 288 GB HBM3e at 8 TB/s, NVLink 1.8 TB/s, ConnectX-8 800 Gb/s per GPU. 160 SMs.
    "gb300": dict(num_nodes=1, gpus_per_node=72, nvlink_gbps=900.0, internode_gbps=100.0, sms=160,
                  bf16_tflops=2500.0, fp8_tflops=5000.0, hbm_tbps=8.0, hbm_gb=288.0),
    # AMD Instinct MI300X datasheet: 1307.4 / 2614.9 TFLOP/s dense BF16 / FP8, 192 GB HBM3 at 5.3 TB/s,
    # 304 CUs, Infinity Fabric: 7 links x 64 GB/s per direction, one to each peer of an 8-GPU node; EP
    # traffic goes to all 7 peers at once, so the aggregate 448 GB/s is the figure used; 400 Gb/s NIC.
    "mi300x": dict(num_nodes=1, gpus_per_node=8, nvlink_gbps=64.0 * 7, internode_gbps=50.0, sms=304,
                   bf16_tflops=1307.4, fp8_tflops=2614.9, hbm_tbps=5.3, hbm_gb=192.0),
}


def _sized(gpu: str, num_gpus: int) -> dict[str, Any]:
    """``num_gpus`` of ``gpu``. An NVL72 job whose size is not a multiple of 72 uses 64 GPUs of each rack
    (a power-of-two EP group then stays inside one NVLink domain)."""
    base = dict(_GPUS[gpu])
    g = base["gpus_per_node"]
    if g == 72 and num_gpus % 72 and num_gpus % 64 == 0:
        g = 64
    if num_gpus < g:
        g = num_gpus
    elif num_gpus % g:
        raise ValueError(f"cluster {gpu}x{num_gpus}: {num_gpus} GPUs is not a whole number of {g}-GPU nodes")
    base["gpus_per_node"], base["num_nodes"] = g, num_gpus // g
    return base


CLUSTER_PRESETS: dict[str, dict[str, Any]] = {
    **_GPUS,
    "h800x2048": _sized("h800", 2048),  # DeepSeek-V3's cluster
    "h200x8": _sized("h200", 8),
    "h100x64": _sized("h100", 64),
    "h100x1024": _sized("h100", 1024),
    "b200x256": _sized("b200", 256),
    "gb200x256": _sized("gb200", 256),  # 4 NVL72 racks, 64 GPUs of each (Megatron-Core's 256-GPU runs)
    "gb300x256": _sized("gb300", 256),
}
_SIZED = re.compile(r"^([a-z0-9]+)x([0-9]+)$")


def _preset_fields(name: str) -> dict[str, Any]:
    if name in CLUSTER_PRESETS:
        return CLUSTER_PRESETS[name]
    m = _SIZED.match(name)
    if m and m.group(1) in _GPUS:
        n = int(m.group(2))
        if not 1 <= n <= 1 << 20:
            raise ValueError(f"cluster {name!r}: GPU count must be in [1, {1 << 20:,}], got {n}")
        return _sized(m.group(1), n)
    raise ValueError(f"unknown cluster preset {name!r}; choose from {sorted(CLUSTER_PRESETS)} or GPUxN "
                     f"with GPU in {sorted(_GPUS)}")


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
    (DeepSeek-V3's multi-token prediction) on the last stage. ``recompute``: activation recomputation
    (``plan/memory.py``). Sizes have ceilings (``MAX_SIM_OPS`` and the like) so that a typo is refused
    with a reason rather than simulated for minutes.
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
    recompute: str = "none"  # "none" | "selective" (DeepSeek-V3 sec. 3.2.3) | "full" (see plan/memory.py)

    def __post_init__(self) -> None:
        for f, hi in (("pp", 4096), ("ep", 1 << 16), ("seq_len", 1 << 20), ("micro_batch", 1 << 16)):
            check_int(f"ParallelPlan.{f}", getattr(self, f), 1, hi)
        for f, hi in (("dp", 1 << 20), ("global_batch", 1 << 34), ("num_microbatches", MAX_SIM_OPS)):
            if getattr(self, f) is not None:
                try:
                    check_int(f"ParallelPlan.{f}", getattr(self, f), 1, hi)
                except ValueError as e:
                    if f != "num_microbatches" or getattr(self, f) < 1:
                        raise
                    raise ValueError(f"{e}: more would take over ~10 s and ~0.5 GB to simulate") from None
        check_int("ParallelPlan.mtp_depth", self.mtp_depth, 0, 64)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ParallelPlan.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "dualpipe" and self.pp % 2:
            raise ValueError(f"ParallelPlan: dualpipe needs an even pp, got pp={self.pp}")
        if self.comm_sms != "auto":
            if isinstance(self.comm_sms, str):
                raise ValueError(f"ParallelPlan.comm_sms must be a positive int or 'auto', got {self.comm_sms!r}")
            check_int("ParallelPlan.comm_sms", self.comm_sms, 1, _MAX_INT["sms"])
        if self.gemm_dtype not in ("fp8", "bf16"):
            raise ValueError(f"ParallelPlan.gemm_dtype must be 'fp8' or 'bf16', got {self.gemm_dtype!r}")
        if not isinstance(self.fp8_dispatch, bool):
            raise TypeError(f"ParallelPlan.fp8_dispatch must be a bool, got {self.fp8_dispatch!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"ParallelPlan.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.routing is not None and not isinstance(self.routing, str):
            raise TypeError(f"ParallelPlan.routing must be a str or None, got {self.routing!r}")

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
        ops = self.pp * n * (3 if self.schedule != "1f1b" else 2)
        if ops > MAX_SIM_OPS:
            raise ValueError(f"num_microbatches ({n:,}) x pp ({self.pp}) is {ops:,} simulated ops; refusing more "
                             f"than {MAX_SIM_OPS:,} (~10 s and ~0.5 GB on a laptop CPU): use a smaller "
                             "global_batch or num_microbatches")
        return ResolvedPlan(self, dp, n)


class ResolvedPlan(NamedTuple):
    """A ``ParallelPlan`` checked against a cluster, with ``dp`` and ``num_microbatches`` filled in."""

    plan: ParallelPlan
    dp: int
    num_microbatches: int


_MAX_FILE_BYTES = 64 << 20
# YAML 1.1 (PyYAML) reads ``1e-9`` as a string because it wants a dot in the mantissa; YAML 1.2 (and
# every JSON reader) reads it as a number. Configs are written by people who expect the latter.
_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


def yaml_loader() -> type:
    """A ``yaml.SafeLoader`` subclass that reads floats as YAML 1.2 does (``1e-9`` is a number, not a string):
    for cluster / plan files and ``moekit plan --set`` values. PyYAML is imported on first use."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # Replace the float resolver by YAML 1.2's; ints still resolve first (same first characters).
    Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
    return Loader


def read_text_file(path: str | Path, what: str) -> str:
    """The text of a small file, or ``ValueError`` saying why not (missing, a directory, too big, binary)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what}: no such file: {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{what}: {str(p)!r} is a directory, not a file")
    try:
        if p.stat().st_size > _MAX_FILE_BYTES:
            raise ValueError(f"{what}: {str(p)!r} is larger than {_MAX_FILE_BYTES >> 20} MB")
        return p.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {str(p)!r} is not a text (UTF-8) file") from None
    except OSError as e:
        raise ValueError(f"{what}: cannot read {str(p)!r}: {e.strerror or e}") from None


def load_file(path: str | Path, what: str = "file") -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file into a dict.

    ``ValueError`` naming ``what`` and the file for anything that is not a readable mapping (missing,
    a directory, malformed YAML/JSON with its line, a list or scalar at the top). YAML numbers follow
    YAML 1.2 (``1e-9`` is a float)."""
    p = Path(path)
    text = read_text_file(p, what)
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=yaml_loader())  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{what}: {str(p)!r} is not valid YAML{where}: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what}: {str(p)!r} is not valid JSON at line {e.lineno}, column {e.colno}: "
                             f"{e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {str(p)!r} must hold a mapping of fields, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{what}: {str(p)!r} has non-string keys {bad[:3]}")
    return data


def load_cluster(name_or_path: str | Path) -> ClusterSpec:
    """A preset name (or ``GPUxN``), or a YAML/JSON file of ``ClusterSpec`` fields (optionally
    ``preset: NAME`` + overrides)."""
    if isinstance(name_or_path, str) and not Path(name_or_path).exists():
        try:
            return ClusterSpec.preset(name_or_path)
        except ValueError as e:
            m = _SIZED.match(name_or_path)
            if name_or_path in CLUSTER_PRESETS or (m and m.group(1) in _GPUS):
                raise
            raise ValueError(f"cluster {str(name_or_path)!r} is neither a preset ({sorted(CLUSTER_PRESETS)}, or "
                             f"GPUxN with GPU in {sorted(_GPUS)}) nor a file") from e
    p = Path(name_or_path)
    d = load_file(p, "cluster")
    d.setdefault("name", p.stem)
    try:
        return ClusterSpec.from_dict(d)
    except (ValueError, TypeError) as e:
        raise type(e)(f"cluster {str(p)!r}: {e}") from None


def load_plan(path: str | Path) -> ParallelPlan:
    """A YAML/JSON file of ``ParallelPlan`` fields."""
    d = load_file(path, "plan")
    names = {f.name for f in dataclasses.fields(ParallelPlan)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"plan {str(path)!r}: unknown ParallelPlan field(s) {unknown}; known: {sorted(names)}")
    try:
        return ParallelPlan(**d)
    except (ValueError, TypeError) as e:
        raise type(e)(f"plan {str(path)!r}: {e}") from None
