"""Collective error reporting: a status word that travels with the counts (or in-band with the rows).

A rank that finds a problem in its own arguments does not raise at once (the other ranks would hang
in the next collective). It encodes the problem as a few integers, takes part in the exchange with
empty rows, and after the exchange *every* rank renders the same message from the same integers and
raises it. The lowest failing rank wins when several fail.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import NamedTuple

import torch


class Code(enum.IntEnum):
    OK = 0
    X_TYPE = 1
    X_NDIM = 2
    X_DTYPE = 3
    FP8_DATA_DTYPE = 4
    FP8_SCALES = 5
    IDX_NDIM = 6
    IDX_DTYPE = 7
    W_SHAPE = 8
    W_DTYPE = 9
    NUM_TOKENS = 10
    IDX_RANGE = 11
    NUM_EXPERTS = 12
    FP8_HIDDEN = 13
    ALIGNMENT = 14
    HANDLE_TOKENS = 15
    HANDLE_ROUTING = 16
    HANDLE_EXPERTS = 17
    DEVICE = 18
    CX_NDIM = 19
    CX_DTYPE = 20
    CX_ROWS = 21
    CX_HIDDEN = 22
    MISMATCH = 23
    EMPTY_HIDDEN = 24
    IDX_MISSING = 25
    HANDLE_HIDDEN = 26
    HANDLE_FP8 = 27
    HANDLE_TOPK = 28
    HANDLE_WEIGHTS = 29
    LL_CAPACITY = 30
    LL_COMBINE_X = 31
    LL_ROUTING = 32
    LL_HANDLE = 33
    LAYOUT_IN_RANK = 34
    LAYOUT_EXPERTS = 35
    LAYOUT_MISMATCH = 36
    W_WITHOUT_IDX = 37
    WORST_TOKENS = 38
    WORST_OVERFLOW = 39
    CW_WEIGHTS = 40
    CW_BIAS = 41
    DENSE = 42  # a = argument (ARGS), b = 0 sparse layout / 1 meta device
    EXPERTS_LARGE = 43  # a = num_experts (clamped to int64)
    EXCEPTION = 44  # a = exception type (EXCEPTION_TYPES); its text travels separately (moekit.ep.guard)
    HANDLE_TYPE = 45  # a = what was passed (HANDLE_KINDS), b = what the call needs
    HANDLE_FOREIGN = 46
    HANDLE_STALE = 47  # a = field (IDENTITY_FIELDS), b = the majority's value, c = the value on `rank`
    OP_MISMATCH = 48  # a = the majority's call, b = the call on `rank` (CALLS)
    LAYER_HIDDEN = 49  # a = hidden_size, b = the last dim given, c = its ndim
    HEAP_CAPACITY = 64  # the symmetric transport's receive slot is too small (numbered apart on purpose)


# Dtypes are sent as their index in this table.
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float64,
           torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "another dtype"


class DispatchMeta(NamedTuple):
    """The ints of a dispatch that must agree across ranks, sent in its counts exchange in this order;
    Code.MISMATCH names a field by its index here (a = field id, b = value on rank 0, c = value on `rank`).
    The normal dispatch leaves ``capacity`` 0, the low-latency one ``num_topk`` and ``has_weights``."""

    hidden: int = 0
    x_dtype: int = 0  # dtype_code of x's dtype (bfloat16 for an FP8 pair)
    num_experts: int = 0
    num_topk: int = 0
    fp8: int = 0  # 1: the rows travel as FP8
    has_weights: int = 0
    capacity: int = 0  # num_max_dispatch_tokens_per_rank
    dequantize: int = 0  # 1: FP8 rows dequantized on arrival (differentiable): sizes the backward's rows


META_INTS = len(DispatchMeta._fields)
# What an error message calls each DispatchMeta field.
_META_NAMES = dict(hidden="hidden size", x_dtype="x dtype (bfloat16 for an FP8 pair)", num_experts="num_experts",
                   num_topk="num_topk (K)", fp8="fp8 (x is an FP8 pair or fp8=True)",
                   has_weights="topk_weights given", capacity="num_max_dispatch_tokens_per_rank",
                   dequantize="dequantize (with FP8 rows)")
MISMATCH_FIELDS = [_META_NAMES[f] for f in DispatchMeta._fields]


# Arguments named by Code.DENSE.
ARGS = ["x", "topk_idx", "topk_weights", "combine's x", "the scales of an FP8 pair x"]
# Exception types carried by Code.EXCEPTION (any other: RuntimeError).
EXCEPTION_TYPES = [RuntimeError, ValueError, TypeError, MemoryError, NotImplementedError, IndexError, KeyError,
                   AssertionError, OverflowError, ZeroDivisionError]
# What a handle argument was (Code.HANDLE_TYPE).
HANDLE_KINDS = ["a DispatchHandle (from Buffer.dispatch)", "a LowLatencyHandle (from Buffer.low_latency_dispatch)",
                "None", "another object"]
# Identity of a handle, compared across ranks before any row moves (Code.HANDLE_STALE).
IDENTITY_FIELDS = ["Buffer call that made it (#)", "mode (0 normal, 1 low-latency)", "Buffer (group/layout key)"]
# Collective calls of a Buffer, compared across ranks (Code.OP_MISMATCH).
CALLS = ["dispatch", "dispatch (cached, with a handle)", "combine", "low_latency_dispatch", "low_latency_combine",
         "MoE.forward", "MoE.load_state_dict", "Buffer.agree"]


def exception_code(err: BaseException) -> int:
    for i, t in enumerate(EXCEPTION_TYPES):
        if type(err) is t:
            return i
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return EXCEPTION_TYPES.index(MemoryError)
    for i, t in enumerate(EXCEPTION_TYPES):
        if isinstance(err, t):
            return i
    return 0


def _mismatch(a: int, b: int, c: int) -> str:
    b_s, c_s = (dtype_name(b), dtype_name(c)) if DispatchMeta._fields[a] == "x_dtype" else (str(b), str(c))
    return f"{MISMATCH_FIELDS[a]} differs between ranks: rank 0 passes {b_s}, it passes {c_s}"


# code -> (exception type, message). A message is a str.format template of a, b, c (and a_dtype, c_dtype: their
# dtype_name), or a function of (a, b, c) where it says more than their values; a type that depends on them
# (NUM_EXPERTS, EXCEPTION) is a function of (a, b, c) too. One entry a code, in code order.
_MESSAGES: dict[Code, tuple[type[Exception] | Callable[[int, int, int], type[Exception]],
                            str | Callable[[int, int, int], str]]] = {
    Code.X_TYPE: (TypeError, "x must be a tensor [T, H] or an (fp8 data [T, H], scales [T, ceil(H/128)]) pair"),
    Code.X_NDIM: (ValueError, "x must be 2-D [num_tokens, hidden], got a {a}-D tensor"),
    Code.X_DTYPE: (TypeError, "x must be bfloat16, float16 or float32, got {a_dtype}"),
    Code.FP8_DATA_DTYPE: (TypeError, "the data of an FP8 pair x must be a 2-D float8_e4m3fn tensor, got {a_dtype}"),
    Code.FP8_SCALES: (ValueError, "the scales of an FP8 pair x must be float32 [num_tokens, ceil(hidden/128)] = "
                                  "[{a}, {b}], got {c_dtype} with a different shape or dtype"),
    Code.IDX_NDIM: (ValueError, "topk_idx must be 2-D [num_tokens, num_topk] with num_topk >= 1, got {a}-D"),
    Code.IDX_DTYPE: (TypeError, "topk_idx must be int64, got {a_dtype}"),
    Code.W_SHAPE: (ValueError, "topk_weights must have the shape of topk_idx [{a}, {b}]"),
    Code.W_DTYPE: (TypeError, "topk_weights must be float32, got {a_dtype}"),
    Code.NUM_TOKENS: (ValueError, "num_tokens differs between x ({a}) and topk_idx ({b})"),
    Code.IDX_RANGE: (ValueError, "topk_idx values must lie in [-1, num_experts={b}), found {a}"),
    Code.NUM_EXPERTS: (lambda a, b, c: TypeError if c else ValueError,
                       lambda a, b, c: "num_experts must be an int (python or numpy), got another type" if c else
                       f"num_experts ({a}) must be a positive multiple of the number of ranks ({b})"),
    Code.FP8_HIDDEN: (ValueError, "fp8=True needs a hidden size that is a multiple of 128, got {a}"),
    Code.ALIGNMENT: (ValueError, "expert_alignment must be >= 1, got {a}"),
    Code.HANDLE_TOKENS: (ValueError, "handle is from another layout: it was made for {a} tokens, x has {b}"),
    Code.HANDLE_ROUTING: (ValueError, "handle is from another layout: topk_idx sends tokens to other ranks than the "
                                      "handle's"),
    Code.HANDLE_EXPERTS: (ValueError, "handle is from another layout: it was made for num_experts={a}, got {b}"),
    Code.DEVICE: (ValueError, "x, topk_idx and topk_weights must be on the same device"),
    Code.CX_NDIM: (ValueError, "combine's x must be 2-D [num_recv_tokens, hidden], got a {a}-D tensor"),
    Code.CX_DTYPE: (TypeError, "combine's x must be bfloat16, float16 or float32, got {a_dtype}"),
    Code.CX_ROWS: (ValueError, "combine's x must have the handle's {b} received rows, got {a}"),
    Code.CX_HIDDEN: (ValueError, "combine's x must have the dispatched hidden size {b}, got {a}"),
    Code.MISMATCH: (ValueError, _mismatch),
    Code.EMPTY_HIDDEN: (ValueError, "x must have a hidden size >= 1"),
    Code.IDX_MISSING: (ValueError, "topk_idx and topk_weights may be None only with a handle"),
    Code.HANDLE_HIDDEN: (ValueError, "handle is from another layout: it was made for hidden size {a}, x has {b}"),
    Code.HANDLE_FP8: (ValueError, lambda a, b, c: "handle's rows are fixed by the dispatch that made it, " + (
        "an FP8 dispatch: pass an FP8 pair or fp8=True" if a else
        "a float dispatch: pass a float x without fp8 (or dispatch anew with fp8=True)")),
    Code.HANDLE_TOPK: (ValueError, "handle is from another layout: it was made for num_topk={a}, topk_idx has {b}"),
    Code.HANDLE_WEIGHTS: (ValueError, "handle was made by a dispatch without topk_weights: it cannot carry "
                                      "topk_weights"),
    Code.LL_CAPACITY: (ValueError, "num_tokens ({a}) exceeds num_max_dispatch_tokens_per_rank ({b})"),
    Code.LL_COMBINE_X: (ValueError, "low_latency_combine's x must be bfloat16, float16 or float32 [num_local_experts="
                                    "{a}, num_ranks * num_max_dispatch_tokens_per_rank={b}, hidden={c}]"),
    Code.LL_ROUTING: (ValueError, "topk_idx and topk_weights must be int64 and float32 [{a}, num_topk] (the "
                                  "dispatch's T)"),
    Code.LL_HANDLE: (TypeError, "handle must be the LowLatencyHandle of a low_latency_dispatch of this Buffer"),
    Code.LAYOUT_IN_RANK: (ValueError, "is_token_in_rank must be a torch.bool tensor [num_tokens={a}, num_ranks={b}] "
                                      "on x's device"),
    Code.LAYOUT_EXPERTS: (ValueError, "num_tokens_per_expert must be an int32/int64 tensor [num_experts] on x's "
                                      "device, num_experts a positive multiple of the number of ranks ({a}) and "
                                      "equal to num_experts when both are given"),
    Code.LAYOUT_MISMATCH: (ValueError, lambda a, b, c: f"{'num_tokens_per_expert' if a else 'is_token_in_rank'} is "
                                                       "not the layout of topk_idx (get_dispatch_layout(topk_idx, "
                                                       "num_experts))"),
    Code.W_WITHOUT_IDX: (ValueError, "topk_weights needs topk_idx: a layout-driven dispatch without topk_idx "
                                     "carries no weights"),
    Code.WORST_TOKENS: (ValueError, "num_worst_tokens must be an int >= 0 (with a handle: 0 or the handle's, {b}), "
                                    "got {a}"),
    Code.WORST_OVERFLOW: (ValueError, "num_worst_tokens ({b}) is too small: this rank receives {a} rows"),
    Code.CW_WEIGHTS: (ValueError, lambda a, b, c: (
        "combine got topk_weights, but the dispatch that made the handle had no topk_weights" if a < 0 else
        f"combine's topk_weights must be float32 [num_recv_tokens={a}, num_topk={b}]")),
    Code.CW_BIAS: (ValueError, "combine's bias must be a tensor or a pair of tensors [num_tokens={a}, hidden={b}] "
                               "of combine's x dtype ({c_dtype})"),
    Code.DENSE: (ValueError, lambda a, b, c: f"{ARGS[a]} must be a dense (strided) tensor with data, got " + (
        "a sparse tensor" if b == 0 else "a tensor on the meta device (it has no data; materialise it first)")),
    Code.EXPERTS_LARGE: (ValueError, "num_experts ({a}) must be < 2**31 (expert ids travel as int32)"),
    Code.EXCEPTION: (lambda a, b, c: EXCEPTION_TYPES[a],
                     lambda a, b, c: f"{EXCEPTION_TYPES[a].__name__} while preparing its part of the call"),
    Code.HANDLE_TYPE: (TypeError, lambda a, b, c: f"handle must be {HANDLE_KINDS[b]}, got {HANDLE_KINDS[a]}"),
    Code.HANDLE_FOREIGN: (ValueError, "handle is from another layout: it was made by a Buffer over another group, "
                                      "node layout or path"),
    Code.HANDLE_STALE: (ValueError, lambda a, b, c: (
        f"handle differs from the other ranks' in the {IDENTITY_FIELDS[a]}: theirs is {b}, this rank's is {c} (a "
        "stale handle from an earlier call, or another Buffer's): every rank must pass the handle of the same call")),
    Code.OP_MISMATCH: (ValueError, lambda a, b, c: (
        f"ranks call different methods: the other ranks call {CALLS[a]}, this rank calls {CALLS[b]} (every rank "
        "must make the same collective calls in the same order)")),
    Code.LAYER_HIDDEN: (ValueError, "MoE: hidden_states must be [..., hidden_size={a}], got a {c}-D tensor ending "
                                    "in {b}"),
    Code.HEAP_CAPACITY: (ValueError, "its rows for rank {c} need {a} rows but the symmetric heap's receive slot "
                                     "holds {b} rows of this size: build the Buffer with a larger heap_bytes"),
}


def _render(code: Code, a: int, b: int, c: int) -> tuple[type[Exception], str]:
    if code not in _MESSAGES:
        raise AssertionError(f"unknown status code {code}")
    exc, message = _MESSAGES[code]
    exc = exc if isinstance(exc, type) else exc(a, b, c)
    if isinstance(message, str):
        return exc, message.format(a=a, b=b, c=c, a_dtype=dtype_name(a), c_dtype=dtype_name(c))
    return exc, message(a, b, c)


class Status(NamedTuple):
    """A problem found on one rank, or ``OK``."""

    code: int = 0
    rank: int = -1
    a: int = 0
    b: int = 0
    c: int = 0

    @property
    def ok(self) -> bool:
        return self.code == 0

    def ints(self) -> list[int]:
        return [int(v) for v in self]


STATUS_INTS = len(Status._fields)  # a status word: code, rank, a, b, c


OK = Status()


def first_failure(statuses) -> Status:
    """The failing status of the lowest rank among ``statuses`` (iterable of 5-int sequences), or OK."""
    worst = OK
    for s in statuses:
        s = Status(*[int(v) for v in s])
        if s.code != 0 and (worst.ok or s.rank < worst.rank):
            worst = s
    return worst


def meta_mismatch(metas) -> Status:
    """``Code.MISMATCH`` for the lowest rank whose arguments (the ints of a :class:`DispatchMeta`, one
    sequence per rank) differ from rank 0's, naming the first differing field; OK when all agree."""
    metas = [[int(v) for v in m] for m in metas]
    for s, row in enumerate(metas):
        for i, (a, b) in enumerate(zip(metas[0], row)):
            if a != b:
                return Status(int(Code.MISMATCH), s, i, a, b)
    return OK


def raise_status(op: str, status: Status, world_size: int) -> None:
    """Raise the exception of a failing ``status`` (identically on every rank); no-op when OK.

    The exception carries the status as ``err.moekit_status`` (``moekit.ep.guard`` adds the text of a
    ``Code.EXCEPTION`` from the failing rank)."""
    if status.ok:
        return
    exc, msg = _render(Code(status.code), status.a, status.b, status.c)
    err = exc(f"moekit.Buffer.{op}: rank {status.rank} of {world_size}: {msg}")
    err.moekit_status = status
    raise err


class InputError(Exception):
    """Internal: carries a Status out of a validation helper."""

    def __init__(self, code: Code, a: int = 0, b: int = 0, c: int = 0):
        super().__init__(code)
        self.code, self.a, self.b, self.c = code, int(a), int(b), int(c)

    def status(self, rank: int) -> Status:
        return Status(int(self.code), rank, self.a, self.b, self.c)


class PeerTimeout(RuntimeError):
    """A bounded wait of moekit's ran out: some peers never arrived (dead, or alive but not calling).

    Raised by every wait of the expert-parallel transports (collective works, symmetric-memory flags)
    once the Buffer's ``timeout`` has passed. ``ranks`` are the group ranks that did not arrive (empty
    when the transport cannot tell which); ``op`` is the call that waited. After a timeout the group's
    state is unknown: the process group (and the Buffer) must be rebuilt.
    """

    def __init__(self, op: str, ranks, timeout_s: float, detail: str = "", lost: bool = False):
        self.op, self.ranks, self.timeout_s = op, tuple(int(r) for r in ranks), float(timeout_s)
        who = f"rank(s) {list(self.ranks)}" if self.ranks else "some peer(s)"
        how = ("did not arrive: a peer's connection closed (dead process)" if lost else
               f"did not arrive within {self.timeout_s:g} s (dead, or not calling {op})")
        msg = (f"{op}: {who} {how}; "
               "the process group must be rebuilt (destroy_process_group + init_process_group, then a new Buffer)")
        super().__init__(msg + (f" [{detail}]" if detail else ""))
