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

import torch
import torch.distributed as dist

from .. import dist as mdist
from .._util import check_positive_int, round_up
from . import checks
from . import handle as hmod
from .autograd import Backward, CombineFn, DispatchFn
from .dispatcher import BackwardHook, CombineOutput, DispatchOutput, WeightedCombineOutput
from .errors import OK, Code, DispatchMeta, InputError, Status, dtype_code, meta_mismatch, raise_status
from .event import EventOverlap
from .fp8 import FP8_DTYPE, dequantize_1x128, num_scale_cols
from .guard import Failure, Guard, handle_kind, identity_mismatch
from .handle import DispatchHandle
from .layout import DispatchLayout, get_dispatch_layout, token_ranks, tokens_per_expert
from .low_latency import LowLatencyMode
from .stats import TrafficStats
from .transport import Comm, Rows, Transfer, nccl
from .transport.select import make_transport
from .wire import Chunks, RowFormat


def _destination_marks(is_token_in_rank: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, R]`` int64 stand-in expert ids of a dispatch without ``topk_idx``: column r holds the first
    expert of rank r where the token goes there, else -1, so rows route (and forward) like expert ids."""
    r = is_token_in_rank.shape[1]
    first = torch.arange(r, device=is_token_in_rank.device) * (num_experts // r)  # [R]
    return torch.where(is_token_in_rank, first, -1)


def _padded_rows(rows: int, m: int, tail: tuple, dtype: torch.dtype, device, fill) -> torch.Tensor:
    """``[rows, *tail]`` output whose first ``m`` rows the exchange writes; the rest is ``fill``."""
    out = torch.empty(rows, *tail, dtype=dtype, device=device)
    if rows > m:
        out[m:].view(torch.uint8 if dtype == FP8_DTYPE else dtype).fill_(fill)
    return out


def _worst_status(h: DispatchHandle, rank: int) -> tuple[Status, int]:
    """``(status, output rows)`` of a dispatch along ``h``: WORST_OVERFLOW when this rank receives more rows
    than ``h.num_worst_tokens`` (sent in-band, so every rank raises; the outputs are then big enough)."""
    w, m = h.num_worst_tokens, h.num_recv_tokens
    if w and m > w:
        return Status(int(Code.WORST_OVERFLOW), rank, m, w), m
    return OK, max(w, m)


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
        timeout: seconds that any wait of a collective call may last (default 300 s, well under gloo's
            and NCCL's 30-minute group default); past it, or when a peer's connection is lost, the call
            raises :class:`moekit.ep.PeerTimeout` naming the ranks that did not arrive, and the Buffer
            refuses further calls (the process group must be rebuilt). NCCL's stream-ordered
            all-to-alls are bounded by the process group's own timeout instead (docs/ep.md, "Faults").
        transport: how rows move (docs/ep.md, "Choosing a transport"). ``"collective"``: torch.distributed
            all-to-alls. ``"symmetric"``: moekit's heap protocol over a symmetric heap shared by the ranks of
            a node — on GPUs the Triton push kernels (``num_sms`` programs) over PyTorch symmetric memory, on
            CPU processes ``num_sms`` native worker threads over ``/dev/shm`` (``transport_channel``); between
            nodes the two-stage path stays collective. ``"auto"`` (default): symmetric for a group of several
            ranks where a heap is available inside the node (GPUs and CPU processes alike), else
            collective; ``MOEKIT_TRANSPORT`` overrides it. The choice is in the ``transport`` attribute.
            Construction with ``"symmetric"`` is collective over the node.
        heap_bytes: bytes of each rank's symmetric heap (the same on every rank; default 1 GiB for a sparse
            ``/dev/shm`` heap, 32 MiB otherwise): two receive areas of R slots; an exchange whose rows for one
            rank do not fit a slot raises on every rank.
        check_handles: exchange a small status + handle-identity message before the rows of a combine,
            cached dispatch or low-latency combine, so that a stale, foreign or mismatched handle (or
            ranks calling different methods) is a collective ``ValueError`` instead of a mismatched
            all-to-all. ``None`` = on for host-check backends (gloo: no host sync to lose), off on
            device backends (it would add a host sync to combine).

    Construction is collective when the two-stage path is used (it creates the node sub-groups with
    ``moekit.dist.new_node_groups``) or when ``num_sms`` limits NCCL's CTAs: every rank of the world must
    construct the Buffer then.
    """

    num_sms: int = 20

    def __init__(self, group=None, *, ranks_per_node: int | None = None, num_sms: int | None = None,
                 hierarchical: bool | None = None, timeout: float = 300.0, check_handles: bool | None = None,
                 transport: str = "auto", heap_bytes: int | None = None):
        check_positive_int("num_sms", num_sms, none_ok=True)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.group = group
        self.num_ranks = mdist.world_size(group)
        self.rank = mdist.rank(group)
        lay = self.node_layout = mdist.node_layout(group, ranks_per_node)
        if num_sms is not None:
            self.num_sms = num_sms
        auto = lay.num_nodes > 1 and lay.ranks_per_node > 1
        self.hierarchical = (auto if hierarchical is None else bool(hierarchical)) and self.num_ranks > 1
        backend = nccl.backend_of(group)
        # An explicit num_sms on NCCL: the Buffer's own communicators, limited to num_sms CTAs.
        self._pg_options = nccl.buffer_pg_options(backend, num_sms) if self.num_ranks > 1 else None
        comm_group = group
        if self._pg_options is not None:
            # Collective over the world (dist.new_group), like the node sub-groups below.
            comm_group = dist.new_group(mdist.global_ranks(group), backend="nccl", pg_options=self._pg_options)
        self._node_groups = mdist.new_node_groups(group, lay, self._pg_options) if self.hierarchical else None
        self._key = (tuple(mdist.global_ranks(group)), lay.ranks_per_node, self.hierarchical)
        self._guard = Guard(self._key, self.rank, self.num_ranks, self.timeout)
        self._msg_device = torch.device("cpu") if backend == "gloo" else torch.device("cuda",
                                                                                     torch.cuda.current_device())
        # The transport (what moves rows); kept as _engine, the name the Buffer always had for it.
        self._engine = make_transport(transport, Comm(comm_group, self.num_ranks, self.rank, self.timeout,
                                                      self._guard.on_fail),
                                      lay, self._node_groups, num_sms=self.num_sms, device=self._msg_device,
                                      heap_bytes=heap_bytes, timeout=self.timeout)
        self.transport = self._engine.name
        self.stats = TrafficStats()
        self._comm_stream = None
        self._backward = Backward(self._engine, self._launch, self._guard)
        # Low-latency mode: on a host-check backend the sizes and statuses are exchanged before the block
        # (the host reads everything anyway); on a device backend they travel in the block's header.
        self._low_latency = LowLatencyMode(self._engine, self.stats, self._key, self._msg_device.type == "cpu",
                                           self._msg_device, self._guard, hmod.msg_width(lay.ranks_per_node))
        self._check_handles = self._ll_host_checks if check_handles is None else bool(check_handles)

    @property
    def layout(self) -> mdist.NodeLayout:
        """The old name of :attr:`node_layout` (read-only), kept for code that reads it; "layout" otherwise
        means a dispatch layout (:meth:`get_dispatch_layout`)."""
        return self.node_layout

    @property
    def transport_channel(self):
        """The symmetric transport's heap :class:`~moekit.ep.transport.symmetric.Channel` (its executor, K,
        ``last_workers``), or None on the collective transport."""
        return getattr(self._engine, "channel", None)

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
        return get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.node_layout.ranks_per_node)

    # ---- dispatch ------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None,
                 num_experts: int | None, *, fp8: bool = False, expert_alignment: int = 1,
                 async_finish: bool = False, handle: DispatchHandle | None = None,
                 is_token_in_rank: torch.Tensor | None = None, num_tokens_per_expert: torch.Tensor | None = None,
                 num_worst_tokens: int = 0, dequantize: bool = False,
                 backward_hook: BackwardHook | None = None) -> DispatchOutput:
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
            is_token_in_rank: ``[T, R]`` bool, and ``num_tokens_per_expert``: ``[E]`` int32/int64, a layout as
                ``get_dispatch_layout`` returns it. With ``topk_idx=None`` (and no handle) they drive the
                dispatch alone (DeepEP's dispatch "without top-k"): token t goes to every rank r with
                ``is_token_in_rank[t, r]``; ``num_experts`` may be None (then E = ``num_tokens_per_expert``'s
                length); ``recv_topk_idx`` / ``recv_topk_weights`` are None and ``topk_weights`` must be None.
                The rows then carry R int32 destination marks instead of K expert ids (the two-stage path
                forwards by them). With ``topk_idx`` they must be its layout (checked: one host sync).
            num_worst_tokens: > 0: fixed-size outputs of that many rows (DeepEP's name): the received rows
                first, then zero rows (``recv_topk_idx`` -1, ``recv_topk_weights`` 0), and
                ``num_recv_tokens_per_expert_list`` is ``[]``; combine then takes ``[num_worst_tokens, H]``.
                A rank that receives more rows raises on every rank (from the in-band status of the data
                exchange). On this collective transport the all-to-all's split sizes still come from the host
                (one host sync, as without it): the shapes are fixed, the host wait is not removed.
            dequantize: with ``fp8`` and a float x, ``recv_x`` is the received rows dequantized to x's dtype
                ``[M, H]`` (for ``moekit.MoE``), differentiable in x with a straight-through gradient: the
                backward combines it home in x's dtype, with the weights' (DeepSeek-V3 §3.3: FP8 dispatch,
                BF16 backward). Must be the same on every rank, all with float x (it sizes the backward's rows).
            backward_hook: how this call's backward completes its transfer (``moekit.ep.dispatcher.
                BackwardHook``; default: at once), e.g. letting other work run while it is in flight.

        Returns :class:`DispatchOutput`. Received rows are ordered by source rank, then token index.
        ``recv_x`` is an FP8 pair when x is one or ``fp8=True`` (without ``dequantize``). Host sync: the counts
        exchange (none with a handle unless ``topk_idx`` is given, which is checked against the handle).
        Differentiable in ``x`` (float x, no fp8 unless ``dequantize``) and ``topk_weights``; the backward is
        collective.
        Faults (docs/ep.md, "Faults"): whatever one rank raises while preparing its part is raised on every
        rank, naming that rank; a wait longer than the Buffer's ``timeout`` raises ``PeerTimeout``.
        """
        if handle is not None:
            return self._cached_dispatch(x, topk_idx, topk_weights, num_experts, fp8, async_finish, handle,
                                         num_worst_tokens, dequantize, backward_hook)
        seq = self._guard.begin("dispatch")
        lay, r = self.node_layout, self.num_ranks
        status, info, k, e = OK, None, 0, 0
        by_layout = topk_idx is None and is_token_in_rank is not None
        out_idx = not by_layout
        weights = topk_weights is not None
        msg_dev = self._msg_device
        try:  # any exception while preparing this rank's part becomes its status (moekit.ep.guard)
            if isinstance(x, Failure):
                raise x.error
            if by_layout:
                info, e = checks.check_layout_dispatch(x, is_token_in_rank, num_tokens_per_expert, topk_weights,
                                                       num_experts, r, fp8, expert_alignment)
                k = r
            else:
                info, k, e = checks.check_dispatch(x, topk_idx, topk_weights, num_experts, r, fp8,
                                                   expert_alignment)
                checks.check_layout_matches(topk_idx, e, r, is_token_in_rank, num_tokens_per_expert)
            checks.check_worst_tokens(num_worst_tokens)
            wire_fp8 = bool(info.is_pair or fp8)
            if by_layout:
                in_rank = is_token_in_rank
                topk_idx = _destination_marks(is_token_in_rank, e)  # [T, R]: routes the rows like expert ids
                per_expert = num_tokens_per_expert.long()  # [E]
            else:
                in_rank = token_ranks(topk_idx, e, r)  # [T, R]
                per_expert = tokens_per_expert(topk_idx, e)  # [E]
            msg = hmod.counts_message(in_rank, lay, per_expert).to(msg_dev)
            # The dtype of combine and of later float exchanges on the handle: x's, bf16 for an FP8 pair.
            x_dtype = torch.bfloat16 if info.is_pair else info.data.dtype
            meta = DispatchMeta(hidden=info.hidden, x_dtype=dtype_code(x_dtype), num_experts=e, num_topk=k,
                                fp8=int(wire_fp8), has_weights=int(weights),
                                dequantize=int(wire_fp8 and bool(dequantize)))
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            status = self._guard.status_of(err)
            msg = torch.zeros(r, hmod.msg_width(lay.ranks_per_node), dtype=torch.int64, device=msg_dev)
            meta = DispatchMeta()
        msg[:, hmod.MSG_STATUS] = torch.tensor(status.ints(), dtype=torch.int64)
        msg[:, hmod.MSG_META] = torch.tensor(meta, dtype=torch.int64)
        msg[:, hmod.MSG_ID] = torch.tensor(self._guard.identity("dispatch", 0, 0, self._key), dtype=torch.int64)
        comm = self._engine.comm
        recv_msg = comm.exchange_fixed(msg).tolist()  # host sync: counts are needed on the host
        self._guard.raise_first("dispatch", (row[hmod.MSG_STATUS] for row in recv_msg), comm)
        raise_status("dispatch", identity_mismatch([row[hmod.MSG_ID] for row in recv_msg]), r)
        raise_status("dispatch", meta_mismatch(row[hmod.MSG_META] for row in recv_msg), r)

        epr = e // r
        if hmod.experts_in_message(e, r):
            col = hmod.MSG_LOCAL + lay.ranks_per_node
            received = [sum(row[col + i] for row in recv_msg) for i in range(epr)]
        else:
            # Every (token, k) pair of expert e lands on e's rank: the global sum is what that rank receives.
            total = self._engine.comm.all_reduce_sum(per_expert.to(msg_dev))
            received = total[self.rank * epr:(self.rank + 1) * epr].tolist()
        per_expert_list = [round_up(c, expert_alignment) for c in received]
        send_counts, send_token = hmod.flat_send_plan(in_rank)
        recv_counts = Chunks(row[hmod.MSG_ROWS] for row in recv_msg)
        hier = hmod.hier_plan(in_rank, recv_msg, lay, self.rank) if self.hierarchical else None
        fmt = hmod.dispatch_row_format(FP8_DTYPE if wire_fp8 else x_dtype, info.hidden, wire_fp8, k, weights)
        h = DispatchHandle(
            key=self._key, rank=self.rank, node_layout=lay, num_experts=e, num_tokens=info.num_tokens,
            hidden=info.hidden, x_dtype=x_dtype, is_token_in_rank=in_rank, num_recv_tokens=sum(recv_counts),
            num_recv_tokens_per_expert_list=per_expert_list, send_counts=send_counts, recv_counts=recv_counts,
            send_token=send_token, dispatch_format=fmt, hier=hier, topk_idx=topk_idx.to(torch.int32),
            topk_weights=topk_weights.detach().clone() if weights else None, num_worst_tokens=num_worst_tokens,
            seq=seq)
        # (A layout-driven dispatch returns no recv_topk_idx: its marks travel from the handle.)
        return self._dispatch_data(h, info, fp8, topk_idx if out_idx else None, topk_weights, async_finish, dequantize,
                                   backward_hook)

    def _handle_status(self, handle, op: str) -> None:
        """Raise the InputError of a ``handle`` that is not a DispatchHandle of this Buffer's layout."""
        kind = handle_kind(handle)
        if kind != 0:
            raise InputError(Code.HANDLE_TYPE, kind, 0)
        if handle.key != self._key or handle.rank != self.rank:
            raise InputError(Code.HANDLE_FOREIGN)

    def _handle_preflight(self, op: str, call: str, status: Status, handle, mode: int) -> None:
        """Host-check backends: status + handle identity on every rank before any row moves (guard.py).
        Device backends: a rank whose handle cannot size the rows raises locally (its peers then time out)."""
        if self._check_handles:
            ok = handle_kind(handle) == mode
            ident = self._guard.identity(call, handle.seq if ok else -1, mode, handle.key if ok else None)
            self._guard.preflight(op, self._engine.comm, status, ident, hmod.msg_width(self.node_layout.ranks_per_node),
                                  self._msg_device)
        elif status.code in (Code.HANDLE_TYPE, Code.HANDLE_FOREIGN):
            raise_status(op, status, self.num_ranks)

    def _cached_dispatch(self, x, topk_idx, topk_weights, num_experts, fp8, async_finish, h: DispatchHandle,
                         num_worst_tokens=0, dequantize=False, backward_hook=None):
        self._guard.begin("dispatch")
        status, info = OK, None
        try:
            if isinstance(x, Failure):
                raise x.error
            self._handle_status(h, "dispatch")
            checks.check_worst_tokens(num_worst_tokens, h.num_worst_tokens)
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
                e = checks.as_int(num_experts)
                if num_experts is not None and e != h.num_experts:
                    raise InputError(Code.HANDLE_EXPERTS, h.num_experts, -1 if e is None else e)
                checks.check_expert_range(topk_idx, h.num_experts)
                if not torch.equal(token_ranks(topk_idx, h.num_experts, self.num_ranks), h.is_token_in_rank):
                    raise InputError(Code.HANDLE_ROUTING)
                if topk_weights is not None and not h.has_weights:
                    raise InputError(Code.HANDLE_WEIGHTS)
            elif topk_weights is not None:
                raise InputError(Code.IDX_MISSING)
        except Exception as err:  # noqa: BLE001 - reported on every rank
            status = self._guard.status_of(err)
        self._handle_preflight("dispatch", "dispatch (cached, with a handle)", status, h, 0)
        if not status.ok:
            # Take part with zero rows of the handle's format (what every peer sends), then raise with them.
            fmt = h.dispatch_format
            fields = {f.name: torch.zeros(h.num_tokens, f.width, dtype=f.dtype, device=h.send_token.device)
                      for f in fmt.fields}
            transfer = self._engine.dispatch("dispatch", h, Rows(fmt, fields, status))
            self.stats.record(transfer.traffic)
            transfer.check()
            raise AssertionError("unreachable: the local status is a failure")
        return self._dispatch_data(h, info, fp8, topk_idx, topk_weights, async_finish, dequantize, backward_hook)

    def _dispatch_data(self, h: DispatchHandle, info: checks.XInfo, fp8: bool, topk_idx, topk_weights,
                       async_finish: bool, dequantize: bool = False, backward_hook=None) -> DispatchOutput:
        fmt = h.dispatch_format  # agreed by every rank: the same row size everywhere
        device, m, hidden = info.data.device, h.num_recv_tokens, info.hidden
        wire_fp8 = h.fp8
        # num_worst_tokens: outputs of that many rows, the received ones first (see _padded_rows).
        status, rows = _worst_status(h, self.rank)
        weights = (h.topk_weights if topk_weights is None else topk_weights) if h.has_weights else None
        fields = hmod.dispatch_fields(info, wire_fp8, h.x_dtype,
                                      h.topk_idx if topk_idx is None else topk_idx.to(torch.int32), weights)
        out_dtype = FP8_DTYPE if wire_fp8 else info.data.dtype
        k = fields["idx"].shape[1]
        # The returned tensors have `rows` rows (> m with num_worst_tokens); the exchange fills their first m.
        recv_x = _padded_rows(rows, m, (hidden,), out_dtype, device, 0)
        recv_scales = _padded_rows(rows, m, (num_scale_cols(hidden),), torch.float32, device, 0) if wire_fp8 else None
        recv_idx = _padded_rows(rows, m, (k,), torch.int64, device, -1) if topk_idx is not None else None
        recv_w = _padded_rows(rows, m, (k,), torch.float32, device, 0) if topk_weights is not None else None
        # dequantize: the rows as x's dtype (bf16 after a pair), differentiable (straight-through) for a float x.
        deq_dtype = h.x_dtype if info.is_pair else info.data.dtype
        recv_deq = _padded_rows(rows, m, (hidden,), deq_dtype, device, 0) if wire_fp8 and dequantize else None
        vx, vs, vi, vw = (t[:m] if t is not None else None for t in (recv_x, recv_scales, recv_idx, recv_w))
        epr = h.num_experts // h.num_ranks
        lo = self.rank * epr

        direct = {}  # fields unpacked straight into the returned tensors
        if out_dtype == fmt.fields[0].dtype:
            direct["x"] = vx
        if vs is not None:
            direct["scales"] = vs

        @torch.no_grad()
        def post(got: dict[str, torch.Tensor]) -> None:
            if "x" not in direct:
                vx.copy_(got["x"])
            if vi is not None:
                local = got["idx"].long() - lo
                mine = (got["idx"] >= 0) & (local >= 0) & (local < epr)
                vi.copy_(torch.where(mine, local, -1))
                if vw is not None:
                    vw.copy_(torch.where(mine, got["w"], 0.0))
            if recv_deq is not None:
                recv_deq[:m].copy_(dequantize_1x128(vx, vs))

        stage2 = (lambda idx: hmod.stage2_rows(idx, self.node_layout, self.rank, epr))
        event_box = []

        def run():
            event_box.append(self._launch(
                lambda cpu_async: self._engine.dispatch("dispatch", h, Rows(fmt, fields, status), async_op=cpu_async,
                                                        stage2_rows=stage2, out=direct),
                post, async_finish, device, [t for t in fields.values()]))
            return recv_x if recv_deq is None else recv_deq, \
                (recv_idx if recv_idx is not None else torch.empty(0, dtype=torch.int64)), \
                (recv_w if recv_w is not None else torch.empty(0))

        # What the gradient flows to: a float x unless its rows went as FP8 without dequantize (as DeepEP's).
        x_in = info.data if not wire_fp8 or (recv_deq is not None and not info.is_pair) else None
        x_grad = x_in is not None and x_in.requires_grad
        w_grad = topk_weights is not None and topk_weights.requires_grad
        if torch.is_grad_enabled() and (x_grad or w_grad):
            out_x, ri, rw = DispatchFn.apply(self._backward, backward_hook, h, run, x_in, topk_weights)
            recv_idx = ri if recv_idx is not None else None
            recv_w = rw if recv_w is not None else None
        else:
            out_x = run()[0]
        if wire_fp8 and recv_deq is None:
            out_x = (out_x, recv_scales)
        counts = [] if h.num_worst_tokens else list(h.num_recv_tokens_per_expert_list)
        return DispatchOutput(out_x, recv_idx, recv_w, counts, h, event_box[0])

    # ---- combine -------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: DispatchHandle, *, topk_weights: torch.Tensor | None = None,
                bias=None, async_finish: bool = False, backward_hook: BackwardHook | None = None):
        """Sum each token's received rows back to its source rank, in the original token order (collective).

        Args:
            x: ``[M, H]`` bf16/fp16/fp32, rows in the order ``dispatch`` returned them (H = dispatched H).
            handle: the dispatch's handle.
            topk_weights: ``[M, K]`` float32 (e.g. the dispatch's ``recv_topk_weights``), only after a dispatch
                with ``topk_weights``: summed back like x, into ``combined_topk_weights [T, K]`` float32
                (DeepEP's combine). The rows of such a handle always carry K float32 weights (zeros for a
                rank that passes none), so that the row size never depends on this call's arguments.
            bias: ``None``, or one or two ``[T, H]`` tensors of x's dtype added to the combined rows on the
                token's own rank (in float32, before the cast to x's dtype). Not differentiable.
            async_finish: return at once; ``event.wait()`` completes it.
            backward_hook: how this call's backward completes its transfer (as in :meth:`dispatch`).

        Returns ``CombineOutput(combined_x [T, H] in x's dtype, event)``, or with ``topk_weights``
        ``WeightedCombineOutput(combined_x, combined_topk_weights [T, K] float32, event)`` (DeepEP's order);
        sums in float32. After a dispatch with ``num_worst_tokens``, x (and ``topk_weights``) have that many
        rows; only the first ``num_recv_tokens`` are sent. Rows travel in
        the handle's dtype (the dispatched x's dtype, bf16 after an FP8 pair; agreed by all ranks): an x
        of another float dtype is converted to it before sending. The two-stage path sums a node's rows at
        the forwarder first and sends that partial sum in the handle's dtype (as DeepSeek-V3). No host
        sync on a GPU except the status check in ``event.wait()`` (sync mode: at return).
        Differentiable: backward is a dispatch of the gradient (collective).
        """
        self._guard.begin("combine")
        status, bias_parts, k = OK, (), 0
        try:
            if isinstance(x, Failure):
                raise x.error
            self._handle_status(handle, "combine")
            rows = handle.num_worst_tokens or handle.num_recv_tokens
            k = handle.topk_idx.shape[1] if handle.has_weights else 0
            checks.check_combine_x(x, rows, handle.hidden)
            bias_parts = checks.check_combine_extras(topk_weights, bias, rows, k, handle.has_weights,
                                                     handle.num_tokens, handle.hidden, x.dtype, x.device)
        except Exception as err:  # noqa: BLE001 - reported on every rank
            status = self._guard.status_of(err)
        self._handle_preflight("combine", "combine", status, handle, 0)
        if not status.ok:
            x = torch.zeros(handle.num_recv_tokens, handle.hidden, dtype=handle.x_dtype,
                            device=handle.send_token.device)
            topk_weights, bias_parts = None, ()
        m = handle.num_recv_tokens
        if x.shape[0] != m:  # num_worst_tokens: the padding rows stay home
            x = x[:m]
        w_out = None
        if handle.has_weights:
            w_in = topk_weights[:m].detach() if topk_weights is not None else \
                torch.zeros(m, k, dtype=torch.float32, device=x.device)
            w_out = torch.empty(handle.num_tokens, k, dtype=torch.float32, device=x.device)
        out = self._combine(x, handle, status, async_finish, (w_in, w_out) if w_out is not None else None,
                            bias_parts, backward_hook)
        if topk_weights is None:
            return out
        return WeightedCombineOutput(out.combined_x, w_out, out.event)

    def _combine(self, x: torch.Tensor, h: DispatchHandle, status: Status, async_finish: bool,
                 weights=None, bias=(), backward_hook=None) -> CombineOutput:
        # The handle's dtype (and K weights when the dispatch had them): the same row size on every rank.
        fmt = RowFormat([("x", h.x_dtype, h.hidden)] + ([("w", torch.float32, weights[0].shape[1])]
                                                        if weights is not None else []))
        out = torch.empty(h.num_tokens, h.hidden, dtype=x.dtype, device=x.device)

        @torch.no_grad()
        def post(got):
            y = got["x"]
            for b in bias:
                y = y + b.float()
            out.copy_(y)
            if weights is not None:
                weights[1].copy_(got["w"])

        event_box = []

        def run():
            fields = {"x": x.detach().to(h.x_dtype)}
            if weights is not None:
                fields["w"] = weights[0]
            event_box.append(self._launch(
                lambda cpu_async: self._engine.combine("combine", h, Rows(fmt, fields, status), async_op=cpu_async),
                post, async_finish, x.device, [fields["x"]]))  # (the converted copy, if any, is what travels)
            return out

        if torch.is_grad_enabled() and x.requires_grad:
            out = CombineFn.apply(self._backward, backward_hook, h, run, x)
        else:
            run()
        return CombineOutput(out, event_box[0])

    # ---- low-latency mode ------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, use_fp8: bool = True, async_finish: bool = False,
                             return_recv_hook: bool = False, round_scale: bool = True):
        """Fixed-capacity dispatch with no host synchronisation (collective), DeepEP's low-latency layout.

        Args:
            x: ``[T, H]`` bf16/fp16/fp32 with T <= ``num_max_dispatch_tokens_per_rank`` (= C).
            topk_idx: ``[T, K]`` int64 in ``[-1, E)``, ``-1`` = none.
            num_max_dispatch_tokens_per_rank, num_experts, H, x's dtype and ``use_fp8`` size the exchange:
                they must be the same on every rank.
            use_fp8: send e4m3 with 1x128 scales (H % 128 == 0).
            round_scale: the scales are rounded up to powers of two (DeepSeek-V3's recipe, exact to
                dequantize); ``False``: plain ``amax / 448`` (DeepEP's low-latency default).
            async_finish / return_recv_hook: return at once; ``event.wait()`` or ``hook()`` completes.

        Returns ``LowLatencyDispatchOutput(recv_x [L, R*C, H] (or the FP8 pair, scales [L, R*C, H/128]),
        recv_count [L] int64 on the device, handle, event, hook)``: the rows of local expert e are
        packed at the front of ``recv_x[e]`` ordered by source rank then token; the rest is zero.
        Not differentiable. Bad input on one rank raises the same error on every rank (docs/ep.md): on
        gloo before anything is sent (a host check), on a GPU from the status words of the block, read
        on the host when the call completes (``hook()`` / ``event.wait()``, or at return without them:
        the only host sync). Traffic: every rank sends every rank ``L * C`` rows, used or not.
        """
        seq = self._guard.begin("low_latency_dispatch")
        out = self._low_latency.dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                         use_fp8=use_fp8, async_finish=async_finish, return_recv_hook=return_recv_hook,
                                   round_scale=round_scale)
        out.handle.seq = seq  # the handle's identity (guard.py)
        return out

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
        self._guard.begin("low_latency_combine")
        status = OK
        kind = handle_kind(handle)
        if kind != 1:
            status = Status(int(Code.HANDLE_TYPE), self.rank, kind, 1)
        elif handle.key != self._key:
            status = Status(int(Code.HANDLE_FOREIGN), self.rank)
        self._handle_preflight("low_latency_combine", "low_latency_combine", status, handle, 1)
        return self._low_latency.combine(x, topk_idx, topk_weights, handle, async_finish=async_finish,
                                         return_recv_hook=return_recv_hook)

    # ---- faults ---------------------------------------------------------------------------------
    def agree(self, error: BaseException | None, what: str = "Buffer.agree") -> None:
        """Collective: every rank passes its own ``error`` (or None); every rank raises the lowest failing
        rank's error, naming that rank (its type, and its message text), or returns when none failed.

        For checks outside dispatch/combine that one rank may fail (``MoE`` uses it for
        ``load_state_dict``). ``what``: the call named in the message (``errors.CALLS``). One small
        fixed-size exchange (two when a rank failed with a non-moekit exception); a host sync.
        """
        self._guard.begin(what)
        status = OK if error is None else self._guard.status_of(error)
        ident = self._guard.identity(what, 0, 0, self._key)
        self._guard.preflight(what, self._engine.comm, status, ident, hmod.msg_width(self.node_layout.ranks_per_node),
                              self._msg_device)

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
