"""DeepEP's legacy Python surface on top of :class:`moekit.Buffer`: ``import moekit.compat.deep_ep as deep_ep``.

The names, signatures, argument defaults, tuple orders and dtypes follow ``deep_ep/buffers/legacy.py``,
``deep_ep/utils/event.py`` and ``csrc/legacy/config.hpp`` of deepseek-ai/DeepEP (commit dd758ca,
v2.1.0; docs/compat.md lists what differs and why). Everything here is a translation: the communication
is :class:`moekit.Buffer`'s (any torch.distributed backend, CPU included). What cannot work on this
machine raises an error that names the argument; nothing is silently ignored.

Shape legend: T tokens on this rank, H hidden, K experts per token, E experts, R ranks, N nodes,
L = E / R local experts, M rows received, C = ``num_max_dispatch_tokens_per_rank``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .._util import check_positive_int, is_int, round_up
from ..ep import buffer as _mbuf
from ..ep.event import EventOverlap as _MEvent
from ..ep.fp8 import pack_ue8m0
from ..ep.transport import nccl as _nccl

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "topk_idx_t"]

topk_idx_t = torch.int64  # DeepEP's expert-index dtype (``deep_ep.topk_idx_t``, typically torch.int64)

_NUM_MAX_NVL_PEERS = 8  # DeepEP's compiled-in ranks per NVLink domain (csrc/kernels/legacy/compiled.cuh)
_ALIGN = 128  # DeepEP's buffer alignment in bytes
_MAX_TOPK = _MAX_SCALES = 128  # the worst case DeepEP's buffer-size hints assume
_SOURCE_META_BYTES = 8  # DeepEP's internode per-token source metadata (two int32)


# ---- Config ------------------------------------------------------------------------------------

class Config:
    """DeepEP's performance config of the normal kernels (``deep_ep.Config``).

    ``num_sms`` is the SM budget: where moekit's communication runs as NCCL collectives it caps the
    communicators' CTAs (communicators per budget, created on first use: collective over the world);
    on gloo there are no SMs and it is only recorded (``0`` = the Buffer's own). The chunk
    sizes size DeepEP's ring buffers; moekit streams no chunks, so they only enter the buffer-size
    hints below (which the Buffer checks against ``num_nvl_bytes`` / ``num_rdma_bytes``).
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        args = dict(num_sms=num_sms, num_max_nvl_chunked_send_tokens=num_max_nvl_chunked_send_tokens,
                    num_max_nvl_chunked_recv_tokens=num_max_nvl_chunked_recv_tokens,
                    num_max_rdma_chunked_send_tokens=num_max_rdma_chunked_send_tokens,
                    num_max_rdma_chunked_recv_tokens=num_max_rdma_chunked_recv_tokens)
        for name, v in args.items():
            if not is_int(v):
                raise TypeError(f"Config: {name} must be an int, got {v!r}")
        if num_sms < 0:
            raise ValueError(f"Config: num_sms must be >= 0, got {num_sms}")
        if not 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens:
            raise ValueError("Config: need 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, "
                             f"got {num_max_nvl_chunked_send_tokens} and {num_max_nvl_chunked_recv_tokens}")
        if num_max_rdma_chunked_send_tokens <= 0 or num_max_rdma_chunked_recv_tokens <= 0:
            raise ValueError("Config: the RDMA chunk sizes must be > 0, got "
                             f"{num_max_rdma_chunked_send_tokens} and {num_max_rdma_chunked_recv_tokens}")
        # As DeepEP: the receive chunk rounds up to a multiple of the send chunk, at least twice it.
        rdma_recv = round_up(num_max_rdma_chunked_recv_tokens, num_max_rdma_chunked_send_tokens)
        if num_max_rdma_chunked_send_tokens > rdma_recv // 2:
            raise ValueError("Config: num_max_rdma_chunked_send_tokens must be at most half of "
                             f"num_max_rdma_chunked_recv_tokens (rounded up to it: {rdma_recv}), "
                             f"got {num_max_rdma_chunked_send_tokens}")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}"
                f", num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
                f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
                f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_nvl_bytes`` that DeepEP's normal kernels need for rows of ``hidden_bytes`` over
        ``num_ranks`` ranks (its formula: per channel and NVLink peer, a ring of the receive chunk with
        room for 128 top-k entries and 128 scales per row)."""
        if not (num_ranks < _NUM_MAX_NVL_PEERS or num_ranks % _NUM_MAX_NVL_PEERS == 0):
            raise ValueError(f"num_ranks ({num_ranks}) must be < {_NUM_MAX_NVL_PEERS} or a multiple of it")
        if num_ranks > _NUM_MAX_NVL_PEERS and self.num_sms % 2:
            raise ValueError(f"num_sms ({self.num_sms}) must be even across nodes")
        rdma_ranks = max(num_ranks // _NUM_MAX_NVL_PEERS, 1)
        per = (self.num_sms // 2) * min(num_ranks, _NUM_MAX_NVL_PEERS)  # channels x NVLink peers
        recv = self.num_max_nvl_chunked_recv_tokens
        n = per * (2 * rdma_ranks + 3) * 4
        n += per * recv * (hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * 8 + _MAX_TOPK * 4 + _MAX_SCALES * 4)
        return round_up(n, _ALIGN)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of ``num_rdma_bytes`` DeepEP's internode kernels need (0 within one NVLink domain)."""
        if num_ranks <= _NUM_MAX_NVL_PEERS:
            return 0
        if num_ranks % _NUM_MAX_NVL_PEERS or self.num_sms % 2:
            raise ValueError(f"num_ranks ({num_ranks}) must be a multiple of {_NUM_MAX_NVL_PEERS} and num_sms "
                             f"({self.num_sms}) even")
        per = (self.num_sms // 2) * (num_ranks // _NUM_MAX_NVL_PEERS)  # channels x RDMA peers
        recv = self.num_max_rdma_chunked_recv_tokens
        n = per * (_NUM_MAX_NVL_PEERS * 2 + 2) * 2 * 4
        n += per * recv * 2 * (hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * 8 + _MAX_TOPK * 4
                               + _MAX_SCALES * 4 + 16)
        return round_up(n, _ALIGN)


# ---- events ------------------------------------------------------------------------------------

class EventHandle:
    """DeepEP's ``EventHandle``: a point on the current stream (a CUDA event on a GPU; on the CPU the
    work before it is already done). ``current_stream_wait()`` makes the current stream wait for it."""

    def __init__(self):
        self._cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda = torch.cuda.Event()
            self._cuda.record(torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        if self._cuda is not None:
            torch.cuda.current_stream().wait_event(self._cuda)


class EventOverlap:
    """DeepEP's ``EventOverlap`` (``deep_ep.utils.event``): the completion of an asynchronous call.

    ``event`` is what the call returned (a moekit :class:`~moekit.ep.EventOverlap` or an
    :class:`EventHandle`); ``current_stream_wait()`` completes it (on a GPU: the current stream waits,
    no host sync; on the CPU: the host waits for the transfer). ``with event: ...`` runs the block
    first and waits at its end. ``extra_tensors`` are kept alive until then, as DeepEP's.
    """

    def __init__(self, event=None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors
        self._release_handle_by_call = False
        self.hook_after_wait: Callable | None = None
        self._after: list[Callable[[], None]] = []  # compat's own steps once the transfer is complete

    def current_stream_wait(self, release_handle: bool = False) -> None:
        if self.event is None:
            raise RuntimeError("EventOverlap.current_stream_wait: this EventOverlap holds no event")
        self.event.current_stream_wait()
        after, self._after = self._after, []
        for fn in after:
            fn()
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait: Callable) -> None:
        if self.hook_after_wait is not None:
            raise RuntimeError("a hook is already registered on this EventOverlap")
        self.hook_after_wait = hook_after_wait

    def __call__(self, release_handle: bool = False) -> EventOverlap:
        self._release_handle_by_call = release_handle
        return self

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_handle_by_call)
        self._release_handle_by_call = False


def _wait_previous(previous_event) -> None:
    # DeepEP makes its kernels wait for previous_event; moekit's transfers start from the current stream,
    # so the current stream waits for it first (the same order, with no host sync).
    if previous_event is None:
        return
    if not isinstance(previous_event, EventOverlap):
        raise TypeError(f"previous_event must be an EventOverlap (e.g. Buffer.capture()), got "
                        f"{type(previous_event).__name__}")
    if previous_event.event is not None:
        previous_event.current_stream_wait()


def _check_alloc(allocate_on_comm_stream: bool, previous_event, async_finish: bool) -> None:
    # DeepEP's rule: tensors owned by the communication stream need an event to order it after.
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True")


# ---- handles -----------------------------------------------------------------------------------

class Handle(tuple):
    """A DeepEP handle: a tuple in DeepEP's field order (so that ``handle[0]`` reads as in DeepEP), that
    also carries the moekit handle (``moekit_handle``) combine and cached dispatch use. Fields moekit has
    no equivalent of (DeepEP's per-channel matrices, send heads, source metadata) are None. The low-latency
    handle's ``[0]`` is DeepEP's ``recv_src_info`` ([L, R*C] int32: the source token index of each row,
    carried on the wire) and ``[1]`` its layout range ([L, R] int64: ``begin << 32 | count`` per source)."""

    moekit_handle: object

    def __new__(cls, fields, moekit_handle):
        self = super().__new__(cls, fields)
        self.moekit_handle = moekit_handle
        return self


def _moekit_handle(handle, what: str):
    if not isinstance(handle, Handle):
        raise TypeError(f"{what}: handle must be a handle returned by this module's Buffer, got "
                        f"{type(handle).__name__}")
    return handle.moekit_handle


# ---- Buffer ------------------------------------------------------------------------------------

def _recommended(table: dict[int, tuple[int, int, int, int]], num_ranks: int) -> Config:
    """The Config of ``table`` (DeepEP's per-rank-count recommendations) for ``num_ranks``, with ``Buffer.num_sms``."""
    if num_ranks not in table:
        raise ValueError(f"num_ranks={num_ranks}: no recommended config (known: {sorted(table)})")
    return Config(Buffer.num_sms, *table[num_ranks])


class Buffer:
    """DeepEP's legacy ``deep_ep.Buffer`` over :class:`moekit.Buffer` (normal and low-latency modes).

    Args (DeepEP's):
        group: the expert-parallel process group (None: the world group; DeepEP requires one). ``comm``
            (an mpi4py communicator) is not supported: passing one raises ValueError.
        num_nvl_bytes: the capacity of the normal kernels' buffer: each dispatch/combine checks
            ``config.get_nvl_buffer_size_hint(H * x.element_size(), R) <= num_nvl_bytes`` and raises a
            ValueError naming ``num_nvl_bytes`` otherwise (never a silent reallocation). A multiple of 128.
        num_rdma_bytes: the same for the internode hint (several nodes) and for low-latency mode
            (``get_low_latency_rdma_size_hint(C, H, R, E) <= num_rdma_bytes``). A multiple of 128.
        low_latency_mode: required for ``low_latency_dispatch`` / ``low_latency_combine`` (as in DeepEP).
        num_qps_per_rank: RDMA queue pairs, > 0; moekit opens none (its transfers are torch.distributed
            collectives), so nothing depends on it.
        allow_nvlink_for_low_latency_mode, allow_mnnvl: permissions; moekit's node layout comes from the
            hardware (hosts and, on GPUs, peer-to-peer domains; ``moekit.dist.hardware_ranks_per_node``).
        explicitly_destroy: ``destroy()`` must then be called (and is allowed only then).
        enable_shrink: rank masking is not supported: True raises ValueError.

    Construction is collective over the group (the node layout is gathered from every rank; on NCCL
    the communicators capped to ``Buffer.num_sms`` CTAs are created collectively over the world).
    """

    num_sms: int = 20

    def __init__(self, group: dist.ProcessGroup | None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None) -> None:
        if comm is not None:
            raise ValueError("comm: mpi4py communicators are not supported; pass a torch.distributed group")
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("group: pass the expert-parallel process group (torch.distributed is not "
                                 "initialised)")
            group = dist.group.WORLD
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not is_int(v, 0) or v % _ALIGN:
                raise ValueError(f"{name} must be an int >= 0 and a multiple of {_ALIGN}, got {v!r}")
        check_positive_int("num_qps_per_rank", num_qps_per_rank)
        if enable_shrink:
            raise ValueError("enable_shrink=True: masking ranks out is not supported by moekit")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        # The capacities decide which calls raise locally: they must agree, checked on every rank.
        mine = (num_nvl_bytes, num_rdma_bytes, bool(low_latency_mode))
        everyone = [None] * self.group_size
        dist.all_gather_object(everyone, mine, group=group)
        for r, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                raise ValueError("num_nvl_bytes, num_rdma_bytes and low_latency_mode must be the same on every "
                                 f"rank: rank 0 passes {everyone[0]}, rank {r} passes {theirs}")
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = False
        self._backend = _nccl.backend_of(group)
        self._built_num_sms = type(self).num_sms
        self._buffer = _mbuf.Buffer(group, num_sms=self._built_num_sms)
        self._combine_buffers: dict[tuple, torch.Tensor] = {}
        self._by_num_sms: dict[int, _mbuf.Buffer] = {}

    # ---- class-level settings -------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: moekit's FP8 paths (which DeepEP builds only for SM90) exist on every device."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM budget of the normal kernels (even, as DeepEP requires) for Buffers built afterwards
        and for ``get_dispatch_config`` / ``get_combine_config``."""
        if not is_int(new_num_sms, 1) or new_num_sms % 2:
            raise ValueError(f"new_num_sms must be a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap at the current point of the current stream (for ``previous_event=``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """The ``num_rdma_bytes`` low-latency mode needs (DeepEP's formula: two send, two receive and two
        signalling buffers for BF16 rows of H, FP8 rows with their scales, and their combine messages)."""
        c, e = num_max_dispatch_tokens_per_rank, num_experts
        scales = hidden // 128
        dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
        combine_msg = scales * 4 + hidden * 2
        send = max(c * dispatch_msg, e * c * combine_msg)
        recv = max(e * c * dispatch_msg, e * c * combine_msg)
        signal = round_up(e * 4, 128)
        total = 2 * (send + recv + signal)
        return (total + _ALIGN) // _ALIGN * _ALIGN  # (DeepEP adds a whole alignment unit)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch config for ``num_ranks`` (2..160 of its table), with ``Buffer.num_sms``."""
        table = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
                 24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
                 96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128),
                 160: (28, 720, 12, 128)}
        return _recommended(table, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine config for ``num_ranks``, with ``Buffer.num_sms``."""
        table = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
                 24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
                 96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}
        return _recommended(table, num_ranks)

    def destroy(self) -> None:
        """Release the buffer (only with ``explicitly_destroy=True``, as DeepEP); later calls raise."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs a Buffer built with explicitly_destroy=True")
        self._live()
        self._buffer, self._combine_buffers, self._by_num_sms = None, {}, {}

    # ---- helpers --------------------------------------------------------------------------------
    def _live(self) -> _mbuf.Buffer:
        if self._buffer is None:
            raise RuntimeError("this Buffer was destroyed")
        return self._buffer

    @property
    def _internode(self) -> bool:
        return self._live().node_layout.num_nodes > 1

    def _buffer_for(self, config: Config) -> _mbuf.Buffer:
        """The moekit.Buffer whose communication uses ``config.num_sms``: on NCCL one per SM budget (its
        communicators capped to that many CTAs; created on first use, collectively over the world, as
        DeepEP requires every rank to pass the same config); elsewhere there are no SMs to budget."""
        buf = self._live()
        if self._backend != "nccl" or config.num_sms in (0, self._built_num_sms):
            return buf
        if config.num_sms not in self._by_num_sms:
            self._by_num_sms[config.num_sms] = _mbuf.Buffer(self.group, num_sms=config.num_sms,
                                                            ranks_per_node=buf.node_layout.ranks_per_node)
        return self._by_num_sms[config.num_sms]  # (its handles are interchangeable: same group and layout)

    def _check_config(self, config, hidden_bytes: int, default: Callable[[int], Config]) -> Config:
        config = default(self.group_size) if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config must be a deep_ep Config, got {type(config).__name__}")
        need = config.get_nvl_buffer_size_hint(hidden_bytes, self.group_size)
        if need > self.num_nvl_bytes:
            raise ValueError(f"num_nvl_bytes={self.num_nvl_bytes} is too small: this call needs {need} "
                             f"(config.get_nvl_buffer_size_hint({hidden_bytes}, {self.group_size}))")
        if self._internode:
            need = config.get_rdma_buffer_size_hint(hidden_bytes, self.group_size)
            if need > self.num_rdma_bytes:
                raise ValueError(f"num_rdma_bytes={self.num_rdma_bytes} is too small: this call needs {need} "
                                 f"(config.get_rdma_buffer_size_hint({hidden_bytes}, {self.group_size}))")
        return config

    def _event(self, moekit_event, extra=None) -> EventOverlap:
        return EventOverlap(moekit_event if moekit_event is not None else _MEvent(), extra)

    # ---- layout ---------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """The layout of a dispatch of ``topk_idx`` (local, no communication).

        Args:
            topk_idx: ``[T, K]`` ``topk_idx_t`` (int64) expert ids, ``-1`` = none.
            num_experts: E, a multiple of R.
            previous_event, async_finish, allocate_on_comm_stream: DeepEP's stream controls (the counts are
                computed on the current stream after ``previous_event``; the returned event is complete).

        Returns ``(num_tokens_per_rank [R] torch.int, num_tokens_per_rdma_rank [N] torch.int or None on one
        node, num_tokens_per_expert [E] torch.int, is_token_in_rank [T, R] torch.bool, event)``. No host sync.
        """
        _check_alloc(allocate_on_comm_stream, previous_event, async_finish)
        _wait_previous(previous_event)
        lay = self._live().get_dispatch_layout(topk_idx, num_experts)
        per_node = lay.num_tokens_per_node.int() if self._internode else None
        return (lay.num_tokens_per_rank.int(), per_node, lay.num_tokens_per_expert.int(), lay.is_token_in_rank,
                self._event(None))

    # ---- normal dispatch / combine --------------------------------------------------------------
    def dispatch(self, x, handle: tuple | None = None, num_tokens_per_rank: torch.Tensor | None = None,
                 num_tokens_per_rdma_rank: torch.Tensor | None = None, is_token_in_rank: torch.Tensor | None = None,
                 num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: EventOverlap | None = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Send each token to the ranks in ``is_token_in_rank`` (collective), DeepEP's normal dispatch.

        Args:
            x: ``[T, H]`` bf16 (fp16/fp32 also work), or an FP8 pair ``(e4m3 [T, H], float scales [T, H/128])``.
            handle: from an earlier dispatch: cached mode (the same routing, no ``topk_idx``/``topk_weights``).
            num_tokens_per_rank ``[R]``, num_tokens_per_rdma_rank ``[N]`` (None on one node),
                is_token_in_rank ``[T, R]`` bool, num_tokens_per_expert ``[E]``: the layout
                (``get_dispatch_layout``); required without a handle. The routing is ``is_token_in_rank``'s;
                with ``topk_idx`` it must be its layout.
            topk_idx: ``[T, K]`` int64 or None (dispatch "without top-k": then no ``recv_topk_*``).
            topk_weights: ``[T, K]`` float32 or None.
            expert_alignment: each ``num_recv_tokens_per_expert_list`` entry is rounded up to a multiple of it.
            num_worst_tokens: > 0: outputs of exactly that many rows (received rows first, ``recv_topk_idx``
                -1 after them) and an empty ``num_recv_tokens_per_expert_list``.
            config, previous_event, async_finish, allocate_on_comm_stream: as DeepEP (see the class and
                docs/compat.md).

        Returns ``(recv_x, recv_topk_idx [M, K] (local expert ids, -1 elsewhere) or None, recv_topk_weights
        [M, K] or None, num_recv_tokens_per_expert_list, handle, event)``; cached mode returns
        ``(recv_x, None, None, None, None, event)``. Rows are ordered by source rank, then token. The
        handle is a tuple in DeepEP's field order: intranode ``(rank_prefix_matrix [R, R] torch.int,
        None, None, None, is_token_in_rank, None)``, internode ``(is_token_in_rank, None, None, None,
        recv_rdma_rank_prefix_sum [N] torch.int or None, None, recv_gbl_rank_prefix_sum [R] torch.int,
        None, None, None)``. Host sync: the counts exchange (as DeepEP without ``num_worst_tokens``).
        Bad input on one rank raises the same error on every rank (moekit.Buffer's status words); a
        missing layout argument or a too small buffer raises locally, before any communication.
        """
        buf = self._live()
        _check_alloc(allocate_on_comm_stream, previous_event, async_finish)
        data = x[0] if isinstance(x, (tuple, list)) else x
        if not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise ValueError("x must be a [num_tokens, hidden] tensor or an (fp8 data, scales) pair")
        buf = self._buffer_for(self._check_config(config, data.shape[1] * data.element_size(),
                                                  self.get_dispatch_config))
        _wait_previous(previous_event)
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (handle=...) takes no topk_idx / topk_weights")
            h = _moekit_handle(handle, "dispatch")
            if isinstance(x, (tuple, list)) != h.fp8:
                # DeepEP's cached dispatch may switch between BF16 and FP8 rows; a moekit handle fixes its
                # row format, so this dispatches anew along the handle's routing (the same rows in the
                # same order; one counts exchange more). Every rank must switch alike, as in DeepEP.
                per_expert = torch.zeros(h.num_experts, dtype=torch.int64, device=h.is_token_in_rank.device)
                out = buf.dispatch(x, None, None, None, is_token_in_rank=h.is_token_in_rank,
                                   num_tokens_per_expert=per_expert, async_finish=async_finish,
                                   num_worst_tokens=num_worst_tokens or h.num_worst_tokens)
            else:
                out = buf.dispatch(x, None, None, None, handle=h, async_finish=async_finish,
                                   num_worst_tokens=num_worst_tokens)
            return out.recv_x, None, None, None, None, self._event(out.event)
        missing = [n for n, v in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                                  ("num_tokens_per_expert", num_tokens_per_expert)) if v is None]
        if missing:
            raise ValueError(f"dispatch without a handle needs the layout: {', '.join(missing)} "
                             "(from get_dispatch_layout)")
        if not isinstance(num_tokens_per_rank, torch.Tensor) or tuple(num_tokens_per_rank.shape) != (self.group_size,):
            raise ValueError(f"num_tokens_per_rank must be a [num_ranks={self.group_size}] tensor")
        if self._internode and num_tokens_per_rdma_rank is None:
            raise ValueError("num_tokens_per_rdma_rank is required across nodes (from get_dispatch_layout)")
        num_experts = num_tokens_per_expert.numel() if isinstance(num_tokens_per_expert, torch.Tensor) else None
        out = buf.dispatch(x, topk_idx, topk_weights, num_experts, expert_alignment=expert_alignment,
                           async_finish=async_finish, is_token_in_rank=is_token_in_rank,
                           num_tokens_per_expert=num_tokens_per_expert, num_worst_tokens=num_worst_tokens)
        return (out.recv_x, out.recv_topk_idx, out.recv_topk_weights, out.num_recv_tokens_per_expert_list,
                self._handle(out.handle), self._event(out.event))

    def _handle(self, h) -> Handle:
        device = h.is_token_in_rank.device
        recv = torch.tensor(list(h.recv_counts), dtype=torch.int32, device=device)  # [R] rows from each source
        if not self._internode:
            # rank_prefix_matrix[s, d]: rows sources 0..s send to d (inclusive prefix): every rank's send counts.
            # (gloo gathers host tensors, NCCL device ones)
            on = torch.device("cpu") if self._backend == "gloo" else device
            mine = torch.tensor(list(h.send_counts), dtype=torch.int64, device=on)
            rows = [torch.zeros_like(mine) for _ in range(self.group_size)]
            dist.all_gather(rows, mine, group=self.group)
            prefix = torch.stack(rows).cumsum(0).to(torch.int32).to(device)
            return Handle((prefix, None, None, None, h.is_token_in_rank, None), h)
        rdma = None
        if h.hier is not None:
            rdma = torch.tensor(list(h.hier.s1_recv_counts), dtype=torch.int32, device=device)
            rdma = rdma.cumsum(0, dtype=torch.int32)
        gbl = recv.cumsum(0, dtype=torch.int32)
        return Handle((h.is_token_in_rank, None, None, None, rdma, None, gbl, None, None, None), h)

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: torch.Tensor | None = None, bias=None,
                config: Config | None = None, previous_event: EventOverlap | None = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Sum each token's rows back on its source rank (collective, **without** weights), DeepEP's combine.

        Args:
            x: ``[M, H]`` bf16/fp16/fp32 rows in the dispatch's order (``[num_worst_tokens, H]`` after one).
            handle: the dispatch's handle.
            topk_weights: ``[M, K]`` float32 (the dispatch's ``recv_topk_weights``), summed back likewise.
            bias: None, a ``[T, H]`` tensor or a pair of them, of x's dtype, added to the result.
            config, previous_event, async_finish, allocate_on_comm_stream: as in ``dispatch``.

        Returns ``(combined_x [T, H] x's dtype, combined_topk_weights [T, K] float32 or None, event)``.
        Sums in float32. No host sync beyond moekit.Buffer.combine's status check.
        """
        buf = self._live()
        _check_alloc(allocate_on_comm_stream, previous_event, async_finish)
        h = _moekit_handle(handle, "combine")
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError("x must be a [num_recv_tokens, hidden] tensor")
        buf = self._buffer_for(self._check_config(config, x.shape[1] * x.element_size(), self.get_combine_config))
        _wait_previous(previous_event)
        out = buf.combine(x, h, topk_weights=topk_weights, bias=bias, async_finish=async_finish)
        if topk_weights is None:
            return out.combined_x, None, self._event(out.event)
        return out.combined_x, out.combined_topk_weights, self._event(out.event)

    def internode_dispatch(self, *args, **kwargs):
        """DeepEP's internode entry point: the same as :meth:`dispatch` (moekit picks the path itself)."""
        return self.dispatch(*args, **kwargs)

    def internode_combine(self, *args, **kwargs):
        """DeepEP's internode entry point: the same as :meth:`combine`."""
        return self.combine(*args, **kwargs)

    # ---- low-latency mode -----------------------------------------------------------------------
    def _check_ll(self, what: str, c: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise ValueError(f"{what} needs a Buffer built with low_latency_mode=True")
        need = self.get_low_latency_rdma_size_hint(c, hidden, self.group_size, num_experts)
        if need > self.num_rdma_bytes:
            raise ValueError(f"num_rdma_bytes={self.num_rdma_bytes} is too small for {what}: it needs {need} "
                             f"(get_low_latency_rdma_size_hint({c}, {hidden}, {self.group_size}, {num_experts}))")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP zeroes the low-latency signalling buffers here; moekit's low-latency blocks are fresh per
        call, so this only checks the sizes against the buffer and zeroes the zero-copy combine buffer."""
        self._check_ll("clean_low_latency_buffer", num_max_dispatch_tokens_per_rank, hidden, num_experts)
        buf = self._combine_buffers.get((num_max_dispatch_tokens_per_rank, hidden, num_experts))
        if buf is not None:
            buf.zero_()

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Fixed-capacity dispatch into the per-expert layout (collective, no host sync on a GPU).

        Args:
            x: ``[T, H]`` bf16 (fp16/fp32 also work), T <= C = ``num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[T, K]`` int64, ``-1`` = none. num_experts: E.
            cumulative_local_expert_recv_stats: ``[L]`` torch.int, incremented by ``recv_count`` on completion.
            dispatch_wait_recv_cost_stats: not supported (no per-source wait timing): must be None.
            use_fp8: e4m3 rows with 1x128 scales (H % 128 == 0); round_scale: powers of two; use_ue8m0:
                packed UE8M0 exponents (needs round_scale, H % 512 == 0).
            async_finish / return_recv_hook: complete with ``event.current_stream_wait()`` / ``hook()``.

        Returns ``(recv_x, recv_count [L] torch.int, handle, event, hook)``. ``recv_x``: ``[L, R*C, H]`` of
        x's dtype, or with ``use_fp8`` ``(e4m3 [L, R*C, H], scales)``, scales ``[L, R*C, H/128]`` float32
        or with ``use_ue8m0`` ``[L, R*C, H/512]`` torch.int, both column-major in their last two dims (as
        DeepEP). The rows of local expert e are at the front of ``recv_x[e]``, by source rank then token.
        ``handle = (None, layout_range [L, R] int64 = begin << 32 | count per source, C, H, E)``.
        """
        buf = self._live()
        if dispatch_wait_recv_cost_stats is not None:
            raise ValueError("dispatch_wait_recv_cost_stats: per-source wait timing is not available in moekit; "
                             "pass None")
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0=True needs round_scale=True (UE8M0 holds powers of two only)")
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError("x must be a [num_tokens, hidden] tensor")
        hidden = x.shape[1]
        if use_ue8m0 and hidden % 512:
            raise ValueError(f"use_ue8m0=True packs 4 scales per int: hidden ({hidden}) must be a multiple of 512")
        self._check_ll("low_latency_dispatch", num_max_dispatch_tokens_per_rank, hidden, num_experts)
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            l = num_experts // self.group_size if isinstance(num_experts, int) and self.group_size else -1
            if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int32 or tuple(stats.shape) != (l,):
                raise ValueError(f"cumulative_local_expert_recv_stats must be a torch.int [num_local_experts={l}] "
                                 "tensor")
        out = buf.low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=use_fp8,
                                       async_finish=async_finish, return_recv_hook=return_recv_hook,
                                       round_scale=round_scale)
        r, c = self.group_size, num_max_dispatch_tokens_per_rank
        l = num_experts // r
        device = x.device
        recv_count = torch.empty(l, dtype=torch.int32, device=device)
        layout_range = torch.empty(l, r, dtype=torch.int64, device=device)
        recv_x = out.recv_x
        scales_out = None
        if use_fp8:
            cols = hidden // 512 if use_ue8m0 else hidden // 128
            # Column-major in the last two dims (DeepEP's TMA-friendly layout): [L, cols, R*C] transposed.
            scales_out = torch.empty(l, cols, r * c, dtype=torch.int32 if use_ue8m0 else torch.float32,
                                     device=device).transpose(1, 2)
            recv_x = (out.recv_x[0], scales_out)

        def after() -> None:  # once the rows have arrived
            counts = out.recv_count.to(torch.int32)
            recv_count.copy_(counts)
            per_src = out.handle.counts.t()  # [L, R] rows from each source
            begin = per_src.cumsum(1) - per_src
            layout_range.copy_((begin << 32) | per_src)
            if scales_out is not None:
                s = out.recv_x[1]
                scales_out.copy_(pack_ue8m0(s) if use_ue8m0 else s)
            if stats is not None:
                stats.add_(counts)

        handle = Handle((out.handle.src_info, layout_range, c, hidden, num_experts), out.handle)
        return (recv_x, recv_count, handle, *self._ll_completion(out.event, out.hook, after,
                                                                 async_finish, return_recv_hook))

    def _ll_completion(self, inner_event, inner_hook, after: Callable[[], None], async_finish: bool,
                       return_recv_hook: bool):
        """``(event, hook)`` in DeepEP's form, running ``after`` once the moekit call has completed."""
        if not (async_finish or return_recv_hook):
            after()
            return self._event(None), None
        done = []

        def complete_after():
            if not done:
                done.append(True)
                after()

        event = EventOverlap(inner_event)
        event._after.append(complete_after)
        hook = None
        if return_recv_hook:
            def hook():
                inner_hook()
                complete_after()
        return event, hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None):
        """Weighted combine of the low-latency layout (collective), DeepEP's ``low_latency_combine``.

        Args:
            x: ``[L, R*C, H]`` expert outputs in the dispatch's layout (ignored with ``zero_copy``: the rows
                are those written into ``get_next_low_latency_combine_buffer(handle)``).
            topk_idx, topk_weights: ``[T, K]`` int64 / float32, the dispatch's routing.
            handle: the low-latency dispatch's handle.
            use_logfmt: DeepEP's 10-bit LogFMT wire format is not available: must be False.
            out: ``[T, H]`` tensor to write the result into (returned).
            combine_wait_recv_cost_stats: not supported: must be None.

        Returns ``(combined_x [T, H] = Σ_k w[t, k] · expert_out(t, k), event, hook)``, fp32 accumulation.
        """
        buf = self._live()
        if use_logfmt:
            raise ValueError("use_logfmt=True: DeepEP's LogFMT wire format is not implemented in moekit; pass False")
        if combine_wait_recv_cost_stats is not None:
            raise ValueError("combine_wait_recv_cost_stats: per-source wait timing is not available in moekit; "
                             "pass None")
        h = _moekit_handle(handle, "low_latency_combine")
        _, _, c, hidden, num_experts = handle
        self._check_ll("low_latency_combine", c, hidden, num_experts)
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        res = buf.low_latency_combine(x, topk_idx, topk_weights, h, async_finish=async_finish,
                                      return_recv_hook=return_recv_hook)
        result = res.combined_x
        if out is not None:
            if not isinstance(out, torch.Tensor) or out.shape != result.shape:
                raise ValueError(f"out must be a tensor of shape {list(result.shape)}")
            result = out

        def after() -> None:
            if out is not None:
                out.copy_(res.combined_x)

        return (result, *self._ll_completion(res.event, res.hook, after, async_finish, return_recv_hook))

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The ``[L, R*C, H]`` bf16 tensor that ``low_latency_combine(..., zero_copy=True)`` sends: fill it
        with the expert outputs instead of passing them (one per (C, H, E) on this Buffer)."""
        h = _moekit_handle(handle, "get_next_low_latency_combine_buffer")
        _, _, c, hidden, num_experts = handle
        key = (c, hidden, num_experts)
        if key not in self._combine_buffers:
            self._combine_buffers[key] = torch.zeros(num_experts // self.group_size, self.group_size * c, hidden,
                                                     dtype=torch.bfloat16, device=h.counts.device)
        return self._combine_buffers[key]

    # ---- DeepEP names that have no moekit counterpart -------------------------------------------
    def get_comm_stream(self):
        """Not available: moekit's communication stream is internal to moekit.Buffer."""
        raise NotImplementedError("get_comm_stream: moekit does not expose its communication stream")

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        """Not available: moekit has no raw registered buffer (its transfers allocate per call)."""
        raise NotImplementedError("get_local_buffer_tensor: moekit has no raw NVLink/RDMA buffer to view")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False):
        """Not available: rank masking (``enable_shrink``) is not supported."""
        raise NotImplementedError("low_latency_update_mask_buffer: rank masking (enable_shrink) is not supported")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor):
        """Not available: rank masking (``enable_shrink``) is not supported."""
        raise NotImplementedError("low_latency_query_mask_buffer: rank masking (enable_shrink) is not supported")

    def low_latency_clean_mask_buffer(self):
        """Not available: rank masking (``enable_shrink``) is not supported."""
        raise NotImplementedError("low_latency_clean_mask_buffer: rank masking (enable_shrink) is not supported")
