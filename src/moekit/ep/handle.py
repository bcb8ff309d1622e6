"""DispatchHandle: everything a dispatch learnt about where rows go, reused by combine and cached dispatch.

Flat path (one stage): rank s sends token t to every rank holding one of its experts, rows in
token order per destination; the receiver gets them ordered by source rank, then token.

Two-stage path (node-aware), rank (n, l) = node n, local index l:
  stage 1 (inter-node group of local index l): token t goes once to each destination node n', to
  rank (n', l) — the *forwarder*; rows per node in token order.
  stage 2 (intra-node group of node n'): the forwarder sends each received row to the ranks of its
  node that hold one of the token's experts. The receiver reorders rows to (source rank, token).
"""

from __future__ import annotations

import dataclasses

import torch

from ..dist import NodeLayout
from .errors import META_INTS, STATUS_INTS
from .fp8 import num_scale_cols, quantize_1x128
from .guard import ID_INTS
from .wire import Chunks, RowFormat


def dispatch_row_format(dtype: torch.dtype, hidden: int, fp8: bool, k: int, weights: bool) -> RowFormat:
    """The row of a dispatch: x (``dtype``, ``hidden``), then FP8 scales, int32 expert ids and fp32 weights
    when present. Every transport and every rank builds it from agreed values only (the bytes must match)."""
    spec = [("x", dtype, hidden)]
    if fp8:
        spec.append(("scales", torch.float32, num_scale_cols(hidden)))
    if k:
        spec.append(("idx", torch.int32, k))
    if weights:
        spec.append(("w", torch.float32, k))
    return RowFormat(spec)


def dispatch_fields(info, fp8: bool, x_dtype: torch.dtype, idx: torch.Tensor,
                    weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The fields of the rows of :func:`dispatch_row_format`: x of ``info`` (a ``checks.XInfo``) as FP8 (an FP8
    pair's own data and scales, else quantized per 1x128 tile) or in ``x_dtype``, the int32 expert ids ``idx``,
    and the fp32 ``weights`` when given."""
    if fp8:
        data, scales = (info.data, info.scales) if info.is_pair else quantize_1x128(info.data.detach())
        fields = {"x": data, "scales": scales}
    else:
        fields = {"x": info.data.detach().to(x_dtype)}  # another float dtype travels in x_dtype
    fields["idx"] = idx
    if weights is not None:
        fields["w"] = weights.detach()
    return fields


@dataclasses.dataclass(eq=False)
class HierPlan:
    s1_send_counts: list[int]  # [N] rows to the forwarder on each node
    s1_recv_counts: list[int]  # [N] rows from rank (n, my local) for my node
    s1_send_token: torch.Tensor  # [S1] token of each stage-1 row (node-major, token order)
    s2_send_counts: list[int]  # [G] rows forwarded to each rank of my node
    s2_recv_counts: list[int]  # [G] rows from each forwarder of my node
    final_index: torch.Tensor  # [M] stage-2 received data row of each output row (output = source, token order)
    s2_send_row: torch.Tensor | None = None  # [S2] stage-1 received row of each forwarded row (set after stage 1)
    _final_inverse: torch.Tensor | None = None

    @property
    def final_inverse(self) -> torch.Tensor:
        """[M] output row of each stage-2 received row (the inverse permutation of ``final_index``)."""
        if self._final_inverse is None:
            inv = torch.empty_like(self.final_index)
            inv[self.final_index] = torch.arange(self.final_index.numel(), device=inv.device)
            self._final_inverse = inv
        return self._final_inverse


@dataclasses.dataclass(eq=False)
class DispatchHandle:
    """Opaque to users: pass it to ``combine`` or to a later ``dispatch(..., handle=handle)``.

    Host-side counts are python lists; index tensors live on the device of the dispatched ``x``.
    Everything that sizes a later exchange (T, H, ``x_dtype``, FP8 or not, K, weights given: the
    ``dispatch_format``) was agreed by all ranks in the dispatch's counts exchange, so calls that reuse
    the handle (combine, cached dispatch, backward) size their rows identically on every rank whatever
    the arguments of that call.
    """

    key: tuple  # identifies the Buffer's group and node layout
    rank: int
    node_layout: NodeLayout
    num_experts: int
    num_tokens: int  # T of the dispatched x
    hidden: int
    x_dtype: torch.dtype  # wire dtype of combine / backward / float cached dispatch (bf16 after a pair dispatch)
    is_token_in_rank: torch.Tensor  # [T, R] bool
    num_recv_tokens: int  # M
    num_recv_tokens_per_expert_list: list[int]  # aligned counts per local expert
    send_counts: list[int]  # [R] flat: rows to each rank
    recv_counts: list[int]  # [R] flat: rows from each rank
    send_token: torch.Tensor  # [S] flat: token of each sent row (rank-major, token order)
    dispatch_format: RowFormat
    hier: HierPlan | None = None
    # The dispatch's routing, sent again by a cached dispatch that passes none (the row size is fixed).
    topk_idx: torch.Tensor | None = None  # [T, K] int32 global expert ids
    topk_weights: torch.Tensor | None = None  # [T, K] float32, when the dispatch had weights
    # > 0: the dispatch returned fixed-size outputs of this many rows (DeepEP's num_worst_tokens); combine
    # then takes that many rows (only the first num_recv_tokens are sent).
    num_worst_tokens: int = 0
    # Identity (with ``key``): the number of the Buffer call that made it; compared across ranks before
    # any row of a combine / cached dispatch moves (moekit.ep.guard), so a stale handle is an error.
    seq: int = 0

    @property
    def num_ranks(self) -> int:
        return self.node_layout.world_size

    @property
    def fp8(self) -> bool:
        """Whether the dispatch (and so a cached dispatch) sends FP8 rows."""
        return any(f.name == "scales" for f in self.dispatch_format.fields)

    @property
    def has_weights(self) -> bool:
        return any(f.name == "w" for f in self.dispatch_format.fields)

    @property
    def hierarchical(self) -> bool:
        return self.hier is not None


# Counts message, one int64 row per destination d, sent by every source s.
MSG_STATUS = slice(0, STATUS_INTS)
MSG_ROWS = STATUS_INTS  # tokens s -> d
MSG_NODE_ROWS = MSG_ROWS + 1  # tokens s -> node(d)
MSG_META = slice(MSG_NODE_ROWS + 1, MSG_NODE_ROWS + 1 + META_INTS)  # the DispatchMeta ints (must agree across ranks)
MSG_LOCAL = MSG_META.stop  # + l': tokens s -> (node(d), l'), for l' < G
# Then (token, k) pairs s -> each expert of d, when d holds at most MSG_MAX_EXPERTS experts; beyond
# that the per-expert counts take an all-reduce instead. The width must not depend on arguments that
# could differ between ranks (a mismatched all-to-all hangs), hence a fixed cap.
MSG_MAX_EXPERTS = 32
# Last columns: the call's identity (moekit.ep.guard.ID_INTS: call, handle's call number, mode, Buffer key),
# so that a rank calling another method, or passing another call's handle, is reported, not mismatched.
MSG_ID = slice(-ID_INTS, None)


def msg_width(ranks_per_node: int) -> int:
    return MSG_LOCAL + ranks_per_node + MSG_MAX_EXPERTS + ID_INTS


def counts_message(in_rank: torch.Tensor, node_layout: NodeLayout, per_expert: torch.Tensor) -> torch.Tensor:
    """The count part of the message [R, W] (status and meta columns left zero); ``per_expert`` [E]."""
    r, g, n = node_layout.world_size, node_layout.ranks_per_node, node_layout.num_nodes
    per_rank = in_rank.sum(0, dtype=torch.int64)  # [R]
    per_node = in_rank.view(-1, n, g).any(2).sum(0, dtype=torch.int64)  # [N]
    msg = torch.zeros(r, msg_width(g), dtype=torch.int64, device=in_rank.device)
    msg[:, MSG_ROWS] = per_rank
    msg[:, MSG_NODE_ROWS] = per_node.repeat_interleave(g)
    msg[:, MSG_LOCAL:MSG_LOCAL + g] = per_rank.view(n, g).repeat_interleave(g, dim=0)
    local = per_expert.numel() // r
    if local <= MSG_MAX_EXPERTS:
        msg[:, MSG_LOCAL + g:MSG_LOCAL + g + local] = per_expert.view(r, local)
    return msg


def experts_in_message(num_experts: int, num_ranks: int) -> bool:
    return num_experts // num_ranks <= MSG_MAX_EXPERTS


def flat_send_plan(in_rank: torch.Tensor) -> tuple[Chunks, torch.Tensor]:
    """``(rows per rank, token of each row)`` in rank-major, token order."""
    nz = in_rank.t().nonzero()  # [S, 2] (rank, token), sorted
    return Chunks(in_rank.sum(0).tolist()), nz[:, 1].contiguous()


def hier_plan(in_rank: torch.Tensor, recv_msg: list[list[int]], node_layout: NodeLayout, rank: int) -> HierPlan:
    """Stage counts and indices from my routing and the received counts messages (``recv_msg[s]``)."""
    g, n = node_layout.ranks_per_node, node_layout.num_nodes
    me_local = node_layout.local_of(rank)
    in_node = in_rank.view(-1, n, g).any(2)  # [T, N]
    nz = in_node.t().nonzero()
    s1_send_counts = in_node.sum(0).tolist()
    # Sources of my stage 1: the ranks with my local index.
    s1_recv_counts = [recv_msg[node_layout.rank_of(nn, me_local)][MSG_NODE_ROWS] for nn in range(n)]
    s2_send_counts = [sum(recv_msg[node_layout.rank_of(nn, me_local)][MSG_LOCAL + lp] for nn in range(n))
                      for lp in range(g)]
    # c[nn][l]: rows from source (nn, l) that end on me; forwarder l sends them to me node-major.
    c = [[recv_msg[node_layout.rank_of(nn, l)][MSG_ROWS] for l in range(g)] for nn in range(n)]
    s2_recv_counts = [sum(c[nn][l] for nn in range(n)) for l in range(g)]
    device = in_rank.device
    ct = torch.tensor(c, dtype=torch.int64, device=device).view(n, g)
    chunk_start = torch.cumsum(ct.sum(0), 0) - ct.sum(0)  # [G] start of forwarder l's rows
    within = torch.cumsum(ct, 0) - ct  # [N, G] start of source (nn, l) inside that chunk
    start = (chunk_start.unsqueeze(0) + within).flatten()  # [R] in source-rank order
    counts = ct.flatten()
    total = int(sum(sum(row) for row in c))
    offs = torch.arange(total, device=device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    final_index = start.repeat_interleave(counts) + offs
    return HierPlan(Chunks(s1_send_counts), Chunks(s1_recv_counts), nz[:, 1].contiguous(), Chunks(s2_send_counts),
                    Chunks(s2_recv_counts), final_index)


def stage2_rows(recv_topk_global: torch.Tensor, node_layout: NodeLayout, rank: int,
                experts_per_rank: int) -> torch.Tensor:
    """Forwarder: stage-1 row of each stage-2 row, local-rank-major (``[S2]``), from the rows' global expert ids."""
    g = node_layout.ranks_per_node
    node = node_layout.node_of(rank)
    idx = recv_topk_global.long()  # [M1, K]
    dest = torch.where(idx >= 0, idx // experts_per_rank, -1)
    local = torch.where(dest // g == node, dest - node * g, g)  # spare column g: elsewhere or none
    hit = torch.zeros(idx.shape[0], g + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(1, local, True)
    return hit[:, :g].t().nonzero()[:, 1].contiguous()
