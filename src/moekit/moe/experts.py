"""SwiGLU experts: the shared MLP and the routed experts of one rank, computed as a grouped GEMM.

Shape legend: N = received rows, H = hidden size, I = expert intermediate size, K' = expert slots per
row (K for moekit's Buffer, 1 for a per-(token, expert) dispatcher), E_loc = experts on this rank,
P = (row, expert) pairs that hit a local expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..routing.balance import tokens_per_expert


class MLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: HF's ``DeepseekV3MLP`` (shared experts, dense layers).

    State-dict keys ``gate_proj.weight`` ``[I, H]``, ``up_proj.weight`` ``[I, H]``, ``down_proj.weight`` ``[H, I]``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    compute_dtype: torch.dtype | None = None  # GEMM dtype (weights cast per call); None = the weights' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., H]`` → ``[..., H]``. With ``compute_dtype`` the GEMMs run in it (the weights stay in their
        own dtype, the master copy; the gradients flow back to it) and the result is in x's dtype. Under
        ``torch.autocast`` without ``compute_dtype`` the GEMMs follow autocast, like any linear of the model."""
        cd = self.compute_dtype
        if cd is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        xc = x.to(cd)
        h = F.silu(F.linear(xc, self.gate_proj.weight.to(cd))) * F.linear(xc, self.up_proj.weight.to(cd))
        return F.linear(h, self.down_proj.weight.to(cd)).to(x.dtype)


def swiglu_grouped_torch(x: torch.Tensor, counts: list[int], w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of contiguous per-expert segments: rows ``[sum(counts[:e]), sum(counts[:e+1]))`` go to expert e.

    x: ``[P, H]``; counts: E_loc python ints summing to P; w_gate/w_up: ``[E_loc, I, H]``; w_down:
    ``[E_loc, H, I]``; row_scale: None or ``[P, 1]`` (fp32, the routing weights), multiplied into the
    ``[P, I]`` intermediate before down_proj (``down(s * h) = s * down(h)``, 4x fewer elements than scaling
    the ``[P, H]`` output when H = 4I): the product is fp32, rounded once to x's dtype for the GEMM.
    Returns ``[P, H]`` in x's dtype. Three GEMMs per expert segment, no host sync; empty segments
    still run (0-row GEMMs), so every expert's weights get a (zero) gradient rather than ``None``.
    """
    # unbind, not w[e]: the backward of E selects would allocate and zero a full [E_loc, ...] gradient each.
    wg, wu, wd = w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0)
    segs = torch.split(x, counts)
    if row_scale is None:
        outs = [F.linear(F.silu(F.linear(seg, wg[e])) * F.linear(seg, wu[e]), wd[e]) for e, seg in enumerate(segs)]
    else:
        outs = [F.linear((F.silu(F.linear(seg, wg[e])) * F.linear(seg, wu[e]) * sc).to(seg.dtype), wd[e])
                for e, (seg, sc) in enumerate(zip(segs, torch.split(row_scale, counts)))]
    return torch.cat(outs)


def swiglu_grouped_fp8(x: torch.Tensor, m_indices: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                       w_down: torch.Tensor, caches: dict | None = None) -> torch.Tensor:
    """The same as :func:`swiglu_grouped_torch` through the FP8 grouped GEMM (``m_indices`` ``[P]`` int32,
    the expert of each row, sorted). Forward in FP8 (1x128 activations, 128x128 weights), backward in the
    activations' dtype. ``caches``: ``{"gate"|"up"|"down": FP8WeightCache}`` (filled here when empty), so
    weights are re-quantized only after they change. H and I must be multiples of 128."""
    from ..kernels.fp8_linear import FP8WeightCache, grouped_fp8_linear  # lazy: Triton loads only when used

    c = {} if caches is None else caches
    for name in ("gate", "up", "down"):
        c.setdefault(name, FP8WeightCache())
    h = F.silu(grouped_fp8_linear(x, m_indices, w_gate, weight_cache=c["gate"])) * \
        grouped_fp8_linear(x, m_indices, w_up, weight_cache=c["up"])
    return grouped_fp8_linear(h, m_indices, w_down, weight_cache=c["down"])


class RoutedExperts(nn.Module):
    """The routed experts ``[expert_offset, expert_offset + num_local)`` of this rank, stacked.

    Parameters ``gate_proj`` / ``up_proj`` ``[E_loc, I, H]`` and ``down_proj`` ``[E_loc, H, I]`` (each
    marked ``param.moekit_expert = True``: sharded, not replicated over the EP group). The state dict uses
    HF's per-expert keys with *global* ids (``{i}.gate_proj.weight``, ...): saving gives this rank's
    experts; loading takes this rank's experts from a full or a sharded dict and ignores the others.
    """

    _PROJ = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, num_local: int, expert_offset: int, hidden_size: int, intermediate_size: int,
                 backend: str = "torch", *, device=None, dtype=None):
        super().__init__()
        self.num_local, self.expert_offset, self.backend = num_local, expert_offset, backend
        h, i = hidden_size, intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(num_local, i, h, device=device, dtype=dtype))
        self.up_proj = nn.Parameter(torch.empty(num_local, i, h, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_local, h, i, device=device, dtype=dtype))
        for p in self.parameters():
            p.moekit_expert = True
        self._fp8_caches: dict = {}  # FP8WeightCache per projection (expert_backend="fp8")
        self.compute_dtype: torch.dtype | None = None  # dtype of the torch GEMMs; None = the weights' dtype

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """nn.Linear's default init, each expert from its own generator seeded ``seed + global id``, so that
        a model holds the same experts whatever the EP size."""
        if self.gate_proj.device.type == "meta":
            return
        for j in range(self.num_local):
            g = torch.Generator().manual_seed(seed + self.expert_offset + j)
            for p in (self.gate_proj, self.up_proj, self.down_proj):
                bound = 1.0 / math.sqrt(p.shape[2])
                w = torch.empty(p.shape[1:], dtype=torch.float32).uniform_(-bound, bound, generator=g)
                p[j].copy_(w)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                counts: list[int] | None = None) -> torch.Tensor:
        """``sum_k topk_weights[n, k] * expert_{topk_idx[n, k]}(x[n])`` for every row n.

        x: ``[N, H]``; topk_idx: ``[N, K']`` int64 *local* expert ids, ``-1`` = not here; topk_weights:
        ``[N, K']`` fp32 (0 where -1); counts: the E_loc per-expert pair counts as python ints (the Buffer's
        ``num_recv_tokens_per_expert_list``), or None to count them here (one host sync).
        Returns ``[N, H]`` in x's dtype. The per-row sum runs in fp32. The routing weight multiplies the
        ``[P, I]`` intermediate (fp32 product, see :func:`swiglu_grouped_torch`) on the torch backend, the
        ``[P, H]`` output in fp32 on the fp8 one. When every slot is local (``P = N * K'``) the pairs are put
        back in slot order and summed over K' with fp32 accumulation (no fp32 ``[P, H]`` copy); otherwise an
        fp32 ``index_add_``.
        """
        n, k = topk_idx.shape
        h = x.shape[1]
        if counts is None:
            counts = tokens_per_expert(topk_idx, self.num_local).tolist()
        if len(counts) != self.num_local:
            raise ValueError(f"RoutedExperts: counts has {len(counts)} entries, expected {self.num_local}")
        pairs = sum(counts)
        flat = topk_idx.reshape(-1)
        # Sort the (row, slot) pairs by expert; the -1 slots sort last and are cut off at `pairs`.
        key = torch.where(flat >= 0, flat, self.num_local)
        order = torch.argsort(key, stable=True)[:pairs]  # [P]
        rows = torch.div(order, k, rounding_mode="floor")
        cd = self.compute_dtype
        xs = x[rows].to(self.gate_proj.dtype if cd is None else cd)  # [P, H], contiguous per-expert segments
        scale = topk_weights.reshape(-1)[order].float().unsqueeze(1)  # [P, 1]
        if self.backend == "fp8":
            ys = swiglu_grouped_fp8(xs, key[order].to(torch.int32), self.gate_proj, self.up_proj, self.down_proj,
                                    self._fp8_caches).float() * scale
        elif cd is None:
            ys = swiglu_grouped_torch(xs, counts, self.gate_proj, self.up_proj, self.down_proj, scale)
        else:  # fp32 master weights, GEMMs in the compute dtype (the casts are differentiable)
            ys = swiglu_grouped_torch(xs, counts, self.gate_proj.to(cd), self.up_proj.to(cd), self.down_proj.to(cd),
                                      scale)
        if pairs == n * k:  # every slot local: `order` is a permutation of the N*K' slots
            slots = ys.new_empty(n * k, h).index_copy(0, order, ys)
            return slots.view(n, k, h).sum(1, dtype=torch.float32).to(x.dtype)
        out = torch.zeros(n, h, dtype=torch.float32, device=x.device).index_add_(0, rows, ys.float())
        return out.to(x.dtype)

    def forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        """The experts on ``Buffer.low_latency_dispatch``'s layout: x ``[E_loc, M, H]`` (expert e's rows at the
        front of ``x[e]``, zero rows after) → ``[E_loc, M, H]`` in x's dtype, unweighted (the low-latency
        combine weights and sums). Batched GEMMs over all M rows of every expert, so no host sync; the zero
        rows give zero outputs. Torch backend only."""
        if x.dim() != 3 or x.shape[0] != self.num_local:
            raise ValueError(f"RoutedExperts.forward_packed: x must be [{self.num_local}, M, H], got {list(x.shape)}")
        cd = self.gate_proj.dtype if self.compute_dtype is None else self.compute_dtype
        xc = x.to(cd)
        wg, wu, wd = (getattr(self, name).to(cd) for name in self._PROJ)
        hmid = F.silu(torch.bmm(xc, wg.transpose(1, 2))) * torch.bmm(xc, wu.transpose(1, 2))  # [E_loc, M, I]
        return torch.bmm(hmid, wd.transpose(1, 2)).to(x.dtype)

    # --- HF per-expert state-dict keys -------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for j in range(self.num_local):
            for name in self._PROJ:
                p = getattr(self, name)[j]
                destination[f"{prefix}{self.expert_offset + j}.{name}.weight"] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {f"{self.expert_offset + j}.{name}.weight": (name, j)
                for j in range(self.num_local) for name in self._PROJ}
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest in mine:
                name, j = mine[rest]
                param = getattr(self, name)
                value = state_dict[key]
                if value.shape != param.shape[1:]:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {list(value.shape)}, "
                                      f"the shape in the current model is {list(param.shape[1:])}")
                    continue
                with torch.no_grad():
                    param[j].copy_(value)
            elif strict and not _is_other_expert_key(rest):
                unexpected_keys.append(key)
        for rest in mine:
            if prefix + rest not in state_dict:
                missing_keys.append(prefix + rest)


def _is_other_expert_key(rest: str) -> bool:
    """``"{i}.{gate,up,down}_proj.weight"`` of any expert: other ranks' experts are not unexpected."""
    parts = rest.split(".")
    return len(parts) == 3 and parts[0].isdigit() and parts[1] in RoutedExperts._PROJ and parts[2] == "weight"
