"""The cost model: FLOPs, bytes and seconds of one layer for one micro-batch on one GPU.

Per token, forward, matmul FLOPs are ``2*m*n*k`` counted on the weights a token meets:
- MLA attention projections: ``H*q_lora + q_lora*nh*(dn+dr) + H*(kv_lora+dr) + kv_lora*nh*(dn+dv) + nh*dv*H``
  (``H*nh*(dn+dr)`` for Q when ``q_lora_rank`` is None), times 2.
- attention core (causal, mean context ``(S+1)/2``): ``2*nh*((dn+dr) + dv) * (S+1)/2``.
- gate ``2*H*E``; dense MLP ``6*H*I_dense``; shared experts ``6*H*I*n_shared``; routed ``6*H*I*k``.
- output head ``2*H*V`` (+ the MTP blocks, each a MoE layer + a ``2H -> H`` projection + the head).
Backward: linear layers cost 2x forward (input grads = 1x, weight grads = 1x); the attention core
2x forward, all input grads. Memory-bound work (norms, residuals, SwiGLU, FP8 quantisation,
permutation) is charged at HBM speed from a byte count per token (``_elementwise_bytes``).

Compute runs on ``sms - comm_sms`` SMs (the communication kernels keep theirs for the whole step, as
DeepSeek-V3 does), so GEMM and attention rates scale by ``(sms - k)/sms``; HBM-bound work does not.

An op of the pipeline (F, B, W or an F&B pair over a stage's layers) is a greedy schedule of the
layers' pieces on one compute and one comm stream (``two_stream``); ``StageCosts`` is the cost model
the schedule simulator (``moekit.schedule.simulate``) asks for those op timings.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from ..config import MoEConfig
from ..schedule.simulator import OpTiming
from .cluster import ClusterSpec
from .spread import Spread


class TokenFlops(NamedTuple):
    """Forward FLOPs per token of one layer (the routed part counted at the sender's token)."""

    attn_linear: float
    attn_core: float
    gate: float
    mlp: float  # dense MLP, or the shared experts of a MoE layer
    routed: float


def layer_token_flops(cfg: MoEConfig, seq_len: int, dense: bool) -> TokenFlops:
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = (h * cfg.q_lora_rank + cfg.q_lora_rank * nh * (dn + dr)) if cfg.q_lora_rank else h * nh * (dn + dr)
    kv = h * (cfg.kv_lora_rank + dr) + cfg.kv_lora_rank * nh * (dn + dv)
    attn_linear = 2.0 * (q + kv + nh * dv * h)
    attn_core = 2.0 * nh * (dn + dr + dv) * (seq_len + 1) / 2
    if dense:
        return TokenFlops(attn_linear, attn_core, 0.0, 6.0 * h * cfg.intermediate_size, 0.0)
    i = cfg.moe_intermediate_size
    return TokenFlops(attn_linear, attn_core, 2.0 * h * cfg.n_routed_experts, 6.0 * h * i * cfg.n_shared_experts,
                      6.0 * h * i * cfg.num_experts_per_tok)


def layer_params(cfg: MoEConfig, dense: bool) -> tuple[float, float]:
    """(non-expert, routed-expert) parameter counts of one layer (norms included, biases none)."""
    f = layer_token_flops(cfg, 1, dense)
    non_expert = (f.attn_linear + f.gate + f.mlp) / 2 + 2 * cfg.hidden_size
    return non_expert, f.routed / 2 / cfg.num_experts_per_tok * cfg.n_routed_experts


def _elementwise_bytes(cfg: MoEConfig, dense: bool, fp8: bool) -> float:
    """HBM bytes per token of one layer's forward memory-bound ops (a documented estimate)."""
    h = cfg.hidden_size
    b = 2 * 2 * h * 2  # two RMSNorms, read + write bf16
    b += 2 * 3 * h * 2  # two residual adds, 2 reads + 1 write
    b += 2 * 2 * cfg.kv_lora_rank + 2 * 2 * (cfg.q_lora_rank or 0)  # latent norms
    if dense:
        rows, inter = 1, cfg.intermediate_size
    else:
        rows, inter = cfg.num_experts_per_tok + cfg.n_shared_experts, cfg.moe_intermediate_size
        b += 2 * cfg.num_experts_per_tok * h * 2 * 2  # permute in, un-permute + weighted sum out
    b += rows * 3 * inter * 2  # SwiGLU: read gate+up, write act
    if fp8:  # quantise every GEMM input: read bf16, write fp8 (+ scales, negligible)
        b += 3 * (h + rows * h + rows * inter + cfg.num_attention_heads * cfg.v_head_dim)
    return float(b)


def _recompute_bytes(cfg: MoEConfig, dense: bool, fp8: bool) -> float:
    """HBM bytes per token that selective recomputation moves again: the four RMSNorms (read + write
    bf16), SwiGLU (read gate+up, write the output), and re-quantising the recomputed GEMM inputs."""
    h, lat = cfg.hidden_size, cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
    rows, inter = (1, cfg.intermediate_size) if dense else \
        (cfg.num_experts_per_tok + cfg.n_shared_experts, cfg.moe_intermediate_size)
    b = 2 * 2 * h * 2 + 2 * 2 * lat + rows * 3 * inter * 2
    if fp8:
        b += 3 * (h + lat + rows * inter)
    return float(b)


class Piece(NamedTuple):
    """One sub-phase of an op: ``stream`` 0 = compute, 1 = communication; ``seconds``."""

    stream: int
    seconds: float


class LayerTimes(NamedTuple):
    """Seconds of one layer, one micro-batch, one GPU (compute at ``comm_sms`` SMs taken).

    attn_f / mlp_f: forward compute before / after dispatch (attention + gate; shared + routed
    experts, or the dense MLP). *_bi: input-gradient backward; *_w: weight-gradient backward.
    dispatch_f / combine_f / dispatch_b / combine_b: EP communication (``dispatch_b`` is the
    gradient of combine, sent along the dispatch direction; ``combine_b`` the gradient of dispatch).
    """

    attn_f: float
    mlp_f: float
    attn_bi: float
    mlp_bi: float
    attn_w: float
    mlp_w: float
    dispatch_f: float
    combine_f: float
    dispatch_b: float
    combine_b: float
    recompute: float = 0.0  # compute seconds rerun in the backward (selective recomputation)
    recompute_full: bool = False  # the backward first reruns the whole forward, communication included

    def forward(self) -> list[Piece]:
        if self.dispatch_f == 0 and self.combine_f == 0:
            return [Piece(0, self.attn_f + self.mlp_f)]
        return [Piece(0, self.attn_f), Piece(1, self.dispatch_f), Piece(0, self.mlp_f), Piece(1, self.combine_f)]

    def backward(self, with_w: bool) -> list[Piece]:
        mlp = self.mlp_bi + (self.mlp_w if with_w else 0.0)
        attn = self.attn_bi + (self.attn_w if with_w else 0.0)
        # Selective recomputation runs where its outputs are needed: mostly the MLA up-projections, just
        # before the attention backward (the layer's last piece), so it is charged there.
        attn += self.recompute
        pre = self.forward() if self.recompute_full else []
        if self.dispatch_b == 0 and self.combine_b == 0:
            return pre + [Piece(0, mlp + attn)]
        return pre + [Piece(1, self.dispatch_b), Piece(0, mlp), Piece(1, self.combine_b), Piece(0, attn)]

    def pair(self) -> tuple[float, float]:
        """(compute, comm) seconds of this layer's forward + full backward, recomputation included."""
        f, b = self.forward(), self.backward(True)
        return (sum(x.seconds for x in f + b if x.stream == 0), sum(x.seconds for x in f + b if x.stream == 1))

    def weight(self) -> float:
        return self.attn_w + self.mlp_w


class CommBytes(NamedTuple):
    """Bytes one GPU sends per micro-batch for one MoE layer, by link: dispatch / combine, NVLink / inter-node."""

    dispatch_intra: float
    dispatch_inter: float
    combine_intra: float
    combine_inter: float


def comm_bytes(cfg: MoEConfig, tokens: int, spread: Spread, fp8_dispatch: bool) -> CommBytes:
    """Expected bytes under ``spread`` (with the busiest rank's ``imbalance`` applied)."""
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    meta = k * (8 + 4)  # top-k ids (int64) + weights (fp32)
    disp = (h + h // 128 * 4 if fp8_dispatch else 2 * h) + meta  # FP8 data + fp32 1x128 scales, or bf16
    comb_ = 2 * h  # combine stays bf16
    s = tokens * spread.imbalance
    return CommBytes(s * spread.nvlink_copies * disp, s * spread.remote_nodes * disp,
                     s * spread.nvlink_copies * comb_, s * spread.remote_nodes * comb_)


class CommTimes(NamedTuple):
    """Seconds of one transfer: at link speed, SM-limited, and the max of both (what it takes)."""

    link: float
    sm_limited: float
    time: float


def transfer_time(intra: float, inter: float, cluster: ClusterSpec, comm_sms: int) -> CommTimes:
    """NVLink and inter-node transfers run concurrently (DeepEP forwards while it receives); every
    byte on either link passes through the comm kernel's SMs at ``comm_gbps_per_sm`` each."""
    if intra + inter > 0 and comm_sms < 1:
        raise ValueError(f"comm_sms must be >= 1 to move {intra + inter:.3g} bytes, got {comm_sms}")
    link = max(intra / (cluster.nvlink_gbps * cluster.nvlink_efficiency * 1e9),
               inter / (cluster.internode_gbps * cluster.internode_efficiency * 1e9))
    sm = (intra + inter) / (comm_sms * cluster.comm_gbps_per_sm * 1e9) if intra + inter > 0 else 0.0
    return CommTimes(link, sm, max(link, sm))


class Rates(NamedTuple):
    gemm: float  # FLOP/s
    attn: float  # FLOP/s
    hbm: float  # bytes/s


def rates(cluster: ClusterSpec, gemm_dtype: str, comm_sms: int) -> Rates:
    """Achievable rates with ``comm_sms`` SMs taken by communication."""
    share = (cluster.sms - comm_sms) / cluster.sms
    if gemm_dtype == "fp8":
        gemm = cluster.fp8_tflops * cluster.fp8_gemm_efficiency
    else:
        gemm = cluster.bf16_tflops * cluster.bf16_gemm_efficiency
    return Rates(gemm * 1e12 * share, cluster.bf16_tflops * cluster.attention_efficiency * 1e12 * share,
                 cluster.hbm_tbps * cluster.hbm_efficiency * 1e12)


class ComputeParts(NamedTuple):
    """Forward compute seconds of one layer for one micro-batch, by part (at ``comm_sms`` SMs taken)."""

    attn_linear: float  # MLA projections + gate GEMMs
    attn_core: float  # softmax(QK^T)V, bf16
    mlp: float  # dense MLP, or shared experts
    routed: float  # routed experts (times the busiest rank's imbalance)
    elementwise: float  # memory-bound ops at HBM speed


def compute_parts(cfg: MoEConfig, cluster: ClusterSpec, *, tokens: int, seq_len: int, dense: bool, imbalance: float,
                  gemm_dtype: str, comm_sms: int) -> ComputeParts:
    r = rates(cluster, gemm_dtype, comm_sms)
    f = layer_token_flops(cfg, seq_len, dense)
    return ComputeParts(tokens * (f.attn_linear + f.gate) / r.gemm, tokens * f.attn_core / r.attn,
                        tokens * f.mlp / r.gemm, tokens * f.routed * imbalance / r.gemm,
                        _elementwise_bytes(cfg, dense, gemm_dtype == "fp8") * tokens / r.hbm)


def recompute_flops(cfg: MoEConfig) -> float:
    """Forward FLOPs per token that selective recomputation reruns: the MLA up-projections (q_b from
    the q latent, kv_b from the kv latent), DeepSeek-V3 sec. 3.2.3."""
    nh, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_up = cfg.q_lora_rank * nh * (dn + dr) if cfg.q_lora_rank else 0
    return 2.0 * (q_up + cfg.kv_lora_rank * nh * (dn + dv))


def layer_times(cfg: MoEConfig, cluster: ClusterSpec, *, tokens: int, seq_len: int, dense: bool,
                spread: Spread | None, fp8_dispatch: bool, gemm_dtype: str, comm_sms: int,
                recompute: str = "none") -> LayerTimes:
    """Seconds of one transformer layer for ``tokens`` tokens (one micro-batch) on one GPU.

    ``spread`` None (or a dense layer): no EP communication (EP = 1). ``recompute``: "none",
    "selective" (the up-projection GEMMs and the norm/SwiGLU memory traffic rerun before the backward)
    or "full" (the whole forward, EP communication included, reruns)."""
    imb = spread.imbalance if spread is not None and not dense else 1.0
    c = compute_parts(cfg, cluster, tokens=tokens, seq_len=seq_len, dense=dense, imbalance=imb,
                      gemm_dtype=gemm_dtype, comm_sms=comm_sms)
    mlp = c.mlp + c.routed
    # Elementwise work: ~40% around attention, ~60% around the MLP; backward reads/writes ~2x.
    attn_f, mlp_f = c.attn_linear + c.attn_core + 0.4 * c.elementwise, mlp + 0.6 * c.elementwise
    attn_bi, mlp_bi = c.attn_linear + 2 * c.attn_core + 0.8 * c.elementwise, mlp + 1.2 * c.elementwise
    attn_w, mlp_w = c.attn_linear, mlp
    rc = 0.0
    if recompute == "selective":
        r = rates(cluster, gemm_dtype, comm_sms)
        rc = tokens * (recompute_flops(cfg) / r.gemm + _recompute_bytes(cfg, dense, gemm_dtype == "fp8") / r.hbm)
    full = recompute == "full"
    if dense or spread is None:
        return LayerTimes(attn_f, mlp_f, attn_bi, mlp_bi, attn_w, mlp_w, 0.0, 0.0, 0.0, 0.0, rc, full)
    fwd = comm_bytes(cfg, tokens, spread, fp8_dispatch)
    d_f = transfer_time(fwd.dispatch_intra, fwd.dispatch_inter, cluster, comm_sms).time
    c_f = transfer_time(fwd.combine_intra, fwd.combine_inter, cluster, comm_sms).time
    # Backward: the gradient of combine travels like a dispatch (FP8 in DeepSeek-V3's recipe when
    # FP8 dispatch is on), the gradient of dispatch like a combine (bf16).
    return LayerTimes(attn_f, mlp_f, attn_bi, mlp_bi, attn_w, mlp_w, d_f, c_f, d_f, c_f, rc, full)


def head_times(cfg: MoEConfig, cluster: ClusterSpec, *, tokens: int, gemm_dtype: str, comm_sms: int,
               recompute: str = "none") -> LayerTimes:
    """Output head + cross-entropy (the head GEMM in the GEMM dtype; softmax at HBM speed)."""
    r = rates(cluster, gemm_dtype, comm_sms)
    g = tokens * 2.0 * cfg.hidden_size * cfg.vocab_size / r.gemm
    sm = tokens * cfg.vocab_size * 4 * 3 / r.hbm  # fp32 logits: write, read for softmax, write grads
    return LayerTimes(g + sm, 0.0, g + sm, 0.0, g, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, recompute == "full")


def step_flops_per_token(cfg: MoEConfig, seq_len: int, mtp_depth: int = 0) -> float:
    """Model FLOPs per token of one training step (3x forward, no recomputation), for MFU."""
    total = 0.0
    for i in range(cfg.num_hidden_layers + mtp_depth):
        f = layer_token_flops(cfg, seq_len, dense=i < cfg.first_k_dense_replace)
        total += sum(f)
    total += (1 + mtp_depth) * 2.0 * cfg.hidden_size * cfg.vocab_size
    total += mtp_depth * 2.0 * 2 * cfg.hidden_size * cfg.hidden_size
    return 3.0 * total


# ---------------------------------------------------------------------------------------------
# Op timings of pipeline stages (the simulator's cost model)


def two_stream(chains: Sequence[Sequence[Piece]]) -> OpTiming:
    """Greedy list schedule of independent chains on one compute and one comm stream.

    Each chain's pieces run in order; at every step the piece that can start first runs (ties: the
    earlier chain). Returns the makespan and the busy / overlapped seconds."""
    ready = [0.0] * len(chains)
    idx = [0] * len(chains)
    free = [0.0, 0.0]
    spans: list[list[tuple[float, float]]] = [[], []]
    while True:
        best, best_t = -1, 0.0
        for c, chain in enumerate(chains):
            if idx[c] < len(chain):
                t = max(ready[c], free[chain[idx[c]].stream])
                if best < 0 or t < best_t:
                    best, best_t = c, t
        if best < 0:
            break
        p = chains[best][idx[best]]
        end = best_t + p.seconds
        if p.seconds > 0:
            spans[p.stream].append((best_t, end))
        free[p.stream] = ready[best] = end
        idx[best] += 1
    dur = max(ready) if ready else 0.0
    comp = sum(e - s for s, e in spans[0])
    comm = sum(e - s for s, e in spans[1])
    return OpTiming(dur, comp, comm, _overlap(spans[1], spans[0]), tuple(spans[1]))


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted lists of disjoint intervals."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            tot += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


class StageCosts:
    """Costs from per-stage lists of ``LayerTimes`` (forward order). Cached per op signature."""

    def __init__(self, stages: Sequence[Sequence[LayerTimes]]) -> None:
        self.stages = [tuple(s) for s in stages]
        self.op = lru_cache(maxsize=None)(self._op)  # type: ignore[method-assign]

    def _op(self, kind: str, stage: int, split: bool, stage_b: int | None) -> OpTiming:
        return _stage_op(kind, self.stages[stage], split, self.stages[stage_b] if stage_b is not None else None)


@lru_cache(maxsize=65536)
def _stage_op(kind: str, stage: tuple[LayerTimes, ...], split: bool,
              stage_b: tuple[LayerTimes, ...] | None) -> OpTiming:
    """One op's timing from the layers of its stage(s); shared by every plan whose stages hold the same
    layers (the search builds many)."""
    def fwd(st: tuple[LayerTimes, ...]) -> list[Piece]:
        return [p for lt in st for p in lt.forward()]

    def bwd(st: tuple[LayerTimes, ...], with_w: bool) -> list[Piece]:
        return [p for lt in reversed(st) for p in lt.backward(with_w)]

    if kind == "F":
        return two_stream([fwd(stage)])
    if kind == "B":
        return two_stream([bwd(stage, not split)])
    if kind == "W":
        t = sum(lt.weight() for lt in stage)
        return OpTiming(t, t, 0.0, 0.0)
    assert kind == "FB"
    return two_stream([fwd(stage), bwd(stage_b, True)])
