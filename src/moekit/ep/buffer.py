"""moekit.Buffer: expert-parallel dispatch/combine (DeepEP V1 "normal mode" semantics) on any
torch.distributed backend, flat or node-aware two-stage.

Shape legend: T = tokens on this rank, H = hidden, K = experts per token, E = experts, R = ranks,
N = nodes, G = ranks per node, M = rows received by this rank (one per (source token, this rank)).

Protocol of one dispatch: (1) local checks; (2) counts exchange — one small all-to-all whose rows
carry the status word, the counts (per rank, per node, per expert) and the arguments that must agree
across ranks; every rank raises the same error if any rank failed (more than 32 experts per rank: the
per-expert counts take an extra all-reduce); (3) one (flat) or two (two-stage) all-to-alls of packed
rows. combine and cached dispatch skip (2): their status words travel in-band as one status row per
chunk. See docs/ep.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import dist as mdist
from . import checks
from . import handle as hmod
from .autograd import Backward, CombineFn, DispatchFn
from .errors import OK, Code, InputError, Status, dtype_code, first_failure, meta_mismatch, raise_status
from .event import EventOverlap
from .fp8 import FP8_DTYPE, num_scale_cols, quantize_1x128
from .handle import DispatchHandle
from .layout import DispatchLayout, get_dispatch_layout, token_ranks, tokens_per_expert
from .low_latency import LowLatencyMode
from .stats import TrafficStats
from .transport import Comm, Rows, Transfer, nccl
from .transport.select import make_transport
from .wire import Chunks, RowFormat


class DispatchOutput(NamedTuple):
    """Result of :meth:`Buffer.dispatch`."""

    recv_x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # [M, H], or (e4m3 [M, H], fp32 scales [M, H/128])
    recv_topk_idx: torch.Tensor | None  # [M, K] int64 local expert ids, -1 for experts on other ranks
    recv_topk_weights: torch.Tensor | None  # [M, K] float32, 0 where recv_topk_idx is -1
    num_recv_tokens_per_expert_list: list[int]  # [E / R] python ints, each rounded up to expert_alignment
    handle: DispatchHandle
    event: EventOverlap


class CombineOutput(NamedTuple):
    """Result of :meth:`Buffer.combine`."""

    combined_x: torch.Tensor  # [T, H], dtype of the combined x
    event: EventOverlap


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class Buffer:
    """Expert-parallel communication buffer over a process group.

    Args:
        group: the expert-parallel process group; ``None`` = the default (world) group. Without
            ``torch.distributed`` initialised the buffer works alone (R = 1) with no communication.
        ranks_per_node: G, ranks per node (consecutive group ranks); default ``LOCAL_WORLD_SIZE`` or R.
        num_sms: DeepEP's SM budget of the communication. Given explicitly on an NCCL group (and a torch
            whose ``ProcessGroupNCCL.Options`` has ``config.max_ctas``), the Buffer creates its own
            communicators with ``max_ctas = num_sms`` (collective over the world); otherwise recorded only.
        hierarchical: ``None`` = two-stage when there are several nodes of several ranks; ``False``
            forces the flat path, ``True`` the two-stage path.
        transport: how rows move (docs/ep.md, "Choosing a transport"). ``"collective"``: torch.distributed
            all-to-alls. ``"symmetric"``: moekit's Triton push kernels (``num_sms`` programs) over a
            symmetric heap shared by the ranks of a node (PyTorch symmetric memory on GPUs, POSIX shared
            memory between CPU processes); between nodes the two-stage path stays collective. ``"auto"``
            (default): symmetric on a GPU group of several ranks where a heap is available inside the node,
            else collective (on the CPU the shared-memory heap runs the kernels in Triton's interpreter: a
            test vehicle, chosen explicitly); ``MOEKIT_TRANSPORT`` overrides it. The choice is in the
            ``transport`` attribute. Construction with ``"symmetric"`` is collective over the node.
        heap_bytes: bytes of each rank's symmetric heap (default 32 MiB; the same on every rank): two receive
            areas of R slots; an exchange whose rows for one rank do not fit a slot raises on every rank.

    Construction is collective when the two-stage path is used (it creates the node sub-groups with
    ``moekit.dist.new_node_groups``) or when ``num_sms`` limits NCCL's CTAs: every rank of the world must
    construct the Buffer then.
    """

    num_sms: int = 20

    def __init__(self, group=None, *, ranks_per_node: int | None = None, num_sms: int | None = None,
                 hierarchical: bool | None = None, transport: str = "auto", heap_bytes: int | None = None):
        if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1):
            raise ValueError(f"num_sms must be a positive int or None, got {num_sms!r}")
        self.group = group
        self.num_ranks = mdist.world_size(group)
        self.rank = mdist.rank(group)
        self.layout = mdist.node_layout(group, ranks_per_node)
        if num_sms is not None:
            self.num_sms = num_sms
        auto = self.layout.num_nodes > 1 and self.layout.ranks_per_node > 1
        self.hierarchical = (auto if hierarchical is None else bool(hierarchical)) and self.num_ranks > 1
        backend = nccl.backend_of(group)
        # An explicit num_sms on NCCL: the Buffer's own communicators, limited to num_sms CTAs.
        self._pg_options = nccl.buffer_pg_options(backend, num_sms) if self.num_ranks > 1 else None
        comm_group = group
        if self._pg_options is not None:
            # Collective over the world (dist.new_group), like the node sub-groups below.
            comm_group = dist.new_group(mdist.global_ranks(group), backend="nccl", pg_options=self._pg_options)
        self._node_groups = mdist.new_node_groups(group, self.layout, self._pg_options) if self.hierarchical else None
        self._msg_device = torch.device("cpu") if backend == "gloo" else torch.device("cuda",
                                                                                     torch.cuda.current_device())
        # The transport (what moves rows); kept as _engine, the name the Buffer always had for it.
        self._engine = make_transport(transport, Comm(comm_group, self.num_ranks, self.rank), self.layout,
                                      self._node_groups, num_sms=self.num_sms, device=self._msg_device,
                                      heap_bytes=heap_bytes, timeout=getattr(self, "timeout", None))
        self.transport = self._engine.name
        self._key = (tuple(mdist.global_ranks(group)), self.layout.ranks_per_node, self.hierarchical)
        self.stats = TrafficStats()
        self._comm_stream = None
        self._backward = Backward(self._engine, self.stats)
        # Low-latency mode: on a host-check backend the sizes and statuses are exchanged before the block
        # (the host reads everything anyway); on a device backend they travel in the block's header.
        self._low_latency = LowLatencyMode(self._engine, self.stats, self._key, self._msg_device.type == "cpu",
                                           self._msg_device)

    @property
    def _ll_host_checks(self) -> bool:
        return self._low_latency.host_checks

    @_ll_host_checks.setter
    def _ll_host_checks(self, value: bool) -> None:  # tests run the device-backend protocol on gloo
        self._low_latency.host_checks = bool(value)

    @classmethod
    def set_num_sms(cls, num_sms: int) -> None:
        """Class-level default of ``num_sms`` (DeepEP's name)."""
        cls.num_sms = int(num_sms)

    # ---- layout --------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> DispatchLayout:
        """Counts of a dispatch of ``topk_idx`` [T, K] int64 (``-1`` = none), without communication.

        Returns ``DispatchLayout(num_tokens_per_rank [R], num_tokens_per_node [N],
        num_tokens_per_expert [E], is_token_in_rank [T, R] bool)``, int64 counts on ``topk_idx.device``.
        Local (raises on this rank only); no host sync.
        """
        return get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.layout.ranks_per_node)

    # ---- dispatch ------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
                 num_experts: int | None, *, fp8: bool = False, expert_alignment: int = 1,
                 async_finish: bool = False, handle: DispatchHandle | None = None) -> DispatchOutput:
        """Send each token once to every rank that holds one of its experts (collective).

        Args:
            x: ``[T, H]`` bf16/fp16/fp32, or an FP8 pair ``(e4m3 [T, H], fp32 scales [T, ceil(H/128)])``.
            topk_idx: ``[T, K]`` int64 expert ids in ``[-1, E)``, ``-1`` = no expert. May be None with a handle.
            topk_weights: ``[T, K]`` float32, or None (then ``recv_topk_weights`` is None).
            num_experts: E, a multiple of R; expert e lives on rank ``e // (E // R)``.
            fp8: quantize a float x per 1x128 tile (power-of-two scales) before sending; H % 128 == 0.
            expert_alignment: each entry of ``num_recv_tokens_per_expert_list`` is rounded up to it.
            async_finish: return at once; ``event.wait()`` / ``event.current_stream_wait()`` completes it.
            handle: from an earlier dispatch with the same routing: skips the counts exchange. The rows keep
                that dispatch's format, agreed by all ranks: FP8 or not must match it; a float x of another
                dtype travels in the handle's dtype and is received in this rank's x dtype; a rank that
                passes no ``topk_idx`` sends the handle's routing again (``recv_topk_idx`` is then None).

        Returns :class:`DispatchOutput`. Received rows are ordered by source rank, then token index.
        ``recv_x`` is an FP8 pair when x is one or ``fp8=True``. Host sync: the counts exchange (none
        with a handle unless ``topk_idx`` is given, which is checked against the handle).
        Differentiable in ``x`` (float x, no fp8) and ``topk_weights``; the backward is collective.
        """
        if handle is not None:
            return self._cached_dispatch(x, topk_idx, topk_weights, num_experts, fp8, async_finish, handle)
        lay, r = self.layout, self.num_ranks
        status, info, k, e = OK, None, 0, 0
        try:
            info, k, e = checks.check_dispatch(x, topk_idx, topk_weights, num_experts, r, fp8, expert_alignment)
        except InputError as err:
            status = err.status(self.rank)
        wire_fp8 = bool(info is not None and (info.is_pair or fp8))
        weights = topk_weights is not None
        msg_dev = self._msg_device
        if status.ok:
            in_rank = token_ranks(topk_idx, e, r)  # [T, R]
            per_expert = tokens_per_expert(topk_idx, e)  # [E]
            msg = hmod.counts_message(in_rank, lay, per_expert).to(msg_dev)
            # The dtype of combine and of later float exchanges on the handle: x's, bf16 for an FP8 pair.
            x_dtype = torch.bfloat16 if info.is_pair else info.data.dtype
            meta = [info.hidden, dtype_code(x_dtype), e, k, int(wire_fp8), int(weights)]
        else:
            msg = torch.zeros(r, hmod.msg_width(lay.ranks_per_node), dtype=torch.int64, device=msg_dev)
            meta = [0] * 6
        msg[:, hmod.MSG_STATUS] = torch.tensor(status.ints(), dtype=torch.int64)
        msg[:, hmod.MSG_META] = torch.tensor(meta, dtype=torch.int64)
        recv_msg = self._engine.comm.exchange_fixed(msg).tolist()  # host sync: counts are needed on the host
        raise_status("dispatch", first_failure(row[hmod.MSG_STATUS] for row in recv_msg), r)
        raise_status("dispatch", meta_mismatch(row[hmod.MSG_META] for row in recv_msg), r)

        epr = e // r
        if hmod.experts_in_message(e, r):
            col = hmod.MSG_LOCAL + lay.ranks_per_node
            received = [sum(row[col + i] for row in recv_msg) for i in range(epr)]
        else:
            # Every (token, k) pair of expert e lands on e's rank: the global sum is what that rank receives.
            total = self._engine.comm.all_reduce_sum(per_expert.to(msg_dev))
            received = total[self.rank * epr:(self.rank + 1) * epr].tolist()
        per_expert_list = [_align(c, expert_alignment) for c in received]
        send_counts, send_token = hmod.flat_send_plan(in_rank)
        recv_counts = Chunks(row[hmod.MSG_ROWS] for row in recv_msg)
        hier = hmod.hier_plan(in_rank, recv_msg, lay, self.rank) if self.hierarchical else None
        fmt = self._dispatch_format(FP8_DTYPE if wire_fp8 else x_dtype, info.hidden, wire_fp8, k, weights)
        h = DispatchHandle(
            key=self._key, rank=self.rank, layout=lay, num_experts=e, num_tokens=info.num_tokens,
            hidden=info.hidden, x_dtype=x_dtype, is_token_in_rank=in_rank, num_recv_tokens=sum(recv_counts),
            num_recv_tokens_per_expert_list=per_expert_list, send_counts=send_counts, recv_counts=recv_counts,
            send_token=send_token, dispatch_format=fmt, hier=hier, topk_idx=topk_idx.to(torch.int32),
            topk_weights=topk_weights.detach().clone() if weights else None)
        return self._dispatch_data(h, info, fp8, topk_idx, topk_weights, async_finish)

    @staticmethod
    def _dispatch_format(dtype: torch.dtype, hidden: int, fp8: bool, k: int, weights: bool) -> RowFormat:
        spec = [("x", dtype, hidden)]
        if fp8:
            spec.append(("scales", torch.float32, num_scale_cols(hidden)))
        if k:
            spec.append(("idx", torch.int32, k))
        if weights:
            spec.append(("w", torch.float32, k))
        return RowFormat(spec)

    def _check_handle(self, handle) -> None:
        # A handle of another Buffer's group cannot even size the exchange: raised locally (every rank
        # that makes this mistake raises; SPMD programs make it on every rank).
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a DispatchHandle from Buffer.dispatch, got {type(handle).__name__}")
        if handle.key != self._key or handle.rank != self.rank:
            raise ValueError("handle is from another layout: it was made by a Buffer over another group, node "
                             f"layout or path (handle: ranks_per_node={handle.layout.ranks_per_node}, "
                             f"world={handle.num_ranks}, two-stage={handle.hierarchical}; this Buffer: "
                             f"ranks_per_node={self.layout.ranks_per_node}, world={self.num_ranks}, "
                             f"two-stage={self.hierarchical})")

    def _cached_dispatch(self, x, topk_idx, topk_weights, num_experts, fp8, async_finish, h: DispatchHandle):
        self._check_handle(h)
        status, info = OK, None
        try:
            # Everything that sizes the rows must match the handle: the peers size theirs from it.
            info = checks.check_x(x)
            if info.num_tokens != h.num_tokens:
                raise InputError(Code.HANDLE_TOKENS, h.num_tokens, info.num_tokens)
            if info.hidden != h.hidden:
                raise InputError(Code.HANDLE_HIDDEN, h.hidden, info.hidden)
            if (info.is_pair or bool(fp8)) != h.fp8:
                raise InputError(Code.HANDLE_FP8, int(h.fp8))
            if fp8 and not info.is_pair and info.hidden % 128 != 0:
                raise InputError(Code.FP8_HIDDEN, info.hidden)
            if topk_idx is not None:
                k = checks.check_routing(topk_idx, topk_weights, info.num_tokens, info.data.device)
                if k != h.topk_idx.shape[1]:
                    raise InputError(Code.HANDLE_TOPK, h.topk_idx.shape[1], k)
                if num_experts is not None and num_experts != h.num_experts:
                    raise InputError(Code.HANDLE_EXPERTS, h.num_experts,
                                     num_experts if isinstance(num_experts, int) else -1)
                checks.check_expert_range(topk_idx, h.num_experts)
                if not torch.equal(token_ranks(topk_idx, h.num_experts, self.num_ranks), h.is_token_in_rank):
                    raise InputError(Code.HANDLE_ROUTING)
                if topk_weights is not None and not h.has_weights:
                    raise InputError(Code.HANDLE_WEIGHTS)
            elif topk_weights is not None:
                raise InputError(Code.IDX_MISSING)
        except InputError as err:
            status = err.status(self.rank)
        if not status.ok:
            # Take part with zero rows of the handle's format (what every peer sends), then raise with them.
            fmt = h.dispatch_format
            fields = {f.name: torch.zeros(h.num_tokens, f.width, dtype=f.dtype, device=h.send_token.device)
                      for f in fmt.fields}
            transfer = self._engine.dispatch("dispatch", h, Rows(fmt, fields, status))
            self.stats.record(transfer.traffic)
            transfer.check()
            raise AssertionError("unreachable: the local status is a failure")
        return self._dispatch_data(h, info, fp8, topk_idx, topk_weights, async_finish)

    def _dispatch_data(self, h: DispatchHandle, info: checks.XInfo, fp8: bool, topk_idx, topk_weights,
                       async_finish: bool) -> DispatchOutput:
        fmt = h.dispatch_format  # agreed by every rank: the same row size everywhere
        device, m, hidden = info.data.device, h.num_recv_tokens, info.hidden
        wire_fp8 = h.fp8
        fields = {}
        if wire_fp8:
            data, scales = (info.data, info.scales) if info.is_pair else quantize_1x128(info.data.detach())
            fields["x"], fields["scales"] = data, scales
        else:
            fields["x"] = info.data.detach().to(h.x_dtype)  # another float dtype travels in the handle's
        fields["idx"] = h.topk_idx if topk_idx is None else topk_idx.to(torch.int32)
        if h.has_weights:
            fields["w"] = h.topk_weights if topk_weights is None else topk_weights.detach()
        out_dtype = FP8_DTYPE if wire_fp8 else info.data.dtype
        recv_x = torch.empty(m, hidden, dtype=out_dtype, device=device)
        recv_scales = torch.empty(m, num_scale_cols(hidden), dtype=torch.float32, device=device) if wire_fp8 else None
        k = fields["idx"].shape[1]
        recv_idx = torch.empty(m, k, dtype=torch.int64, device=device) if topk_idx is not None else None
        recv_w = torch.empty(m, k, dtype=torch.float32, device=device) if topk_weights is not None else None
        epr = h.num_experts // h.num_ranks
        lo = self.rank * epr

        direct = {}  # fields unpacked straight into the returned tensors
        if out_dtype == fmt.fields[0].dtype:
            direct["x"] = recv_x
        if recv_scales is not None:
            direct["scales"] = recv_scales

        @torch.no_grad()
        def post(got: dict[str, torch.Tensor]) -> None:
            if "x" not in direct:
                recv_x.copy_(got["x"])
            if recv_idx is not None:
                local = got["idx"].long() - lo
                mine = (got["idx"] >= 0) & (local >= 0) & (local < epr)
                recv_idx.copy_(torch.where(mine, local, -1))
                if recv_w is not None:
                    recv_w.copy_(torch.where(mine, got["w"], 0.0))

        stage2 = (lambda idx: hmod.stage2_rows(idx, self.layout, self.rank, epr))
        event_box = []

        def run():
            event_box.append(self._launch(
                lambda cpu_async: self._engine.dispatch("dispatch", h, Rows(fmt, fields, OK), async_op=cpu_async,
                                                        stage2_rows=stage2, out=direct),
                post, async_finish, device, [t for t in fields.values()]))
            return recv_x, (recv_idx if recv_idx is not None else torch.empty(0, dtype=torch.int64)), \
                (recv_w if recv_w is not None else torch.empty(0))

        x_grad = not wire_fp8 and info.data.requires_grad
        w_grad = topk_weights is not None and topk_weights.requires_grad
        if torch.is_grad_enabled() and (x_grad or w_grad):
            recv_x, ri, rw = DispatchFn.apply(self._backward, h, run, info.data if not wire_fp8 else None, topk_weights)
            recv_idx = ri if recv_idx is not None else None
            recv_w = rw if recv_w is not None else None
        else:
            run()
        out_x = (recv_x, recv_scales) if wire_fp8 else recv_x
        return DispatchOutput(out_x, recv_idx, recv_w, list(h.num_recv_tokens_per_expert_list), h, event_box[0])

    # ---- combine -------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: DispatchHandle, *, async_finish: bool = False) -> CombineOutput:
        """Sum each token's received rows back to its source rank, in the original token order (collective).

        Args:
            x: ``[M, H]`` bf16/fp16/fp32, rows in the order ``dispatch`` returned them (H = dispatched H).
            handle: the dispatch's handle.
            async_finish: return at once; ``event.wait()`` completes it.

        Returns ``CombineOutput(combined_x [T, H] in x's dtype, event)``; sums in float32. Rows travel in
        the handle's dtype (the dispatched x's dtype, bf16 after an FP8 pair; agreed by all ranks): an x
        of another float dtype is converted to it before sending. The two-stage path sums a node's rows at
        the forwarder first and sends that partial sum in the handle's dtype (as DeepSeek-V3). No host
        sync on a GPU except the status check in ``event.wait()`` (sync mode: at return).
        Differentiable: backward is a dispatch of the gradient (collective).
        """
        self._check_handle(handle)
        status = OK
        try:
            checks.check_combine_x(x, handle.num_recv_tokens, handle.hidden)
        except InputError as err:
            status = err.status(self.rank)
            x = torch.zeros(handle.num_recv_tokens, handle.hidden, dtype=handle.x_dtype,
                            device=handle.send_token.device)
        return self._combine(x, handle, status, async_finish)

    def _combine(self, x: torch.Tensor, h: DispatchHandle, status: Status, async_finish: bool) -> CombineOutput:
        fmt = RowFormat([("x", h.x_dtype, h.hidden)])  # the handle's dtype: the same row size on every rank
        out = torch.empty(h.num_tokens, h.hidden, dtype=x.dtype, device=x.device)

        @torch.no_grad()
        def post(got):
            out.copy_(got["x"])

        event_box = []

        def run():
            fields = {"x": x.detach().to(h.x_dtype)}
            event_box.append(self._launch(
                lambda cpu_async: self._engine.combine("combine", h, Rows(fmt, fields, status), async_op=cpu_async),
                post, async_finish, x.device, [fields["x"]]))  # (the converted copy, if any, is what travels)
            return out

        if torch.is_grad_enabled() and x.requires_grad:
            out = CombineFn.apply(self._backward, h, run, x)
        else:
            run()
        return CombineOutput(out, event_box[0])

    # ---- low-latency mode ------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, use_fp8: bool = True, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Fixed-capacity dispatch with no host synchronisation (collective), DeepEP's low-latency layout.

        Args:
            x: ``[T, H]`` bf16/fp16/fp32 with T <= ``num_max_dispatch_tokens_per_rank`` (= C).
            topk_idx: ``[T, K]`` int64 in ``[-1, E)``, ``-1`` = none.
            num_max_dispatch_tokens_per_rank, num_experts, H, x's dtype and ``use_fp8`` size the exchange:
                they must be the same on every rank.
            use_fp8: send e4m3 with 1x128 power-of-two scales (H % 128 == 0).
            async_finish / return_recv_hook: return at once; ``event.wait()`` or ``hook()`` completes.

        Returns ``LowLatencyDispatchOutput(recv_x [L, R*C, H] (or the FP8 pair, scales [L, R*C, H/128]),
        recv_count [L] int64 on the device, handle, event, hook)``: the rows of local expert e are
        packed at the front of ``recv_x[e]`` ordered by source rank then token; the rest is zero.
        Not differentiable. Bad input on one rank raises the same error on every rank (docs/ep.md): on
        gloo before anything is sent (a host check), on a GPU from the status words of the block, read
        on the host when the call completes (``hook()`` / ``event.wait()``, or at return without them:
        the only host sync). Traffic: every rank sends every rank ``L * C`` rows, used or not.
        """
        return self._low_latency.dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                          use_fp8=use_fp8, async_finish=async_finish,
                                          return_recv_hook=return_recv_hook)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle, *,
                            async_finish: bool = False, return_recv_hook: bool = False):
        """Weighted combine of the low-latency layout (collective, no host sync).

        Args:
            x: ``[L, R*C, H]`` bf16/fp16/fp32 expert outputs in ``low_latency_dispatch``'s packed layout;
                rows travel in the dispatched x's dtype (another float dtype is converted).
            topk_idx, topk_weights: the ``[T, K]`` routing of the dispatch (int64, float32).

        Returns ``LowLatencyCombineOutput(combined_x [T, H] = Σ_k topk_weights[t, k] * out[t, k] (fp32
        accumulation, x's dtype), event, hook)``. Errors as in ``low_latency_dispatch``, always from the
        block's status rows (its size comes from the handle alone).
        """
        return self._low_latency.combine(x, topk_idx, topk_weights, handle, async_finish=async_finish,
                                         return_recv_hook=return_recv_hook)

    # ---- launching -----------------------------------------------------------------------------
    def _comm_stream_for(self, device: torch.device):
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream(device=device)
        return self._comm_stream

    def _launch(self, start, post, async_finish: bool, device: torch.device, inputs) -> EventOverlap:
        """Run an exchange: ``start(cpu_async)`` → a :class:`Transfer`; ``post`` gets its unpacked fields.

        Unpacking writes into tensors that autograd may already have handed out (async): never recorded.
        """
        if async_finish and device.type == "cuda":
            # GPU: everything on the communication stream; the host only enqueues.
            stream = self._comm_stream_for(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            for t in inputs:
                t.record_stream(stream)
            with torch.cuda.stream(stream):
                transfer: Transfer = start(False)
                with torch.no_grad():
                    post(transfer.unpack())
                event = torch.cuda.Event()
                event.record(stream)
            self.stats.record(transfer.traffic)
            return EventOverlap(cuda_event=event, check=transfer.check)
        transfer = start(async_finish)
        self.stats.record(transfer.traffic)

        @torch.no_grad()
        def done():
            post(transfer.wait())
        if async_finish:
            return EventOverlap(finish=done)
        done()
        return EventOverlap()
