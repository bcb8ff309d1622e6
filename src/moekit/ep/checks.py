"""Argument checks of dispatch/combine. They raise :class:`InputError` (a status code + ints), never a
plain exception, so that the Buffer can report the problem collectively instead of hanging its peers.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .._util import is_int
from .errors import Code, InputError, dtype_code
from .fp8 import FP8_DTYPE, num_scale_cols
from .layout import token_ranks, tokens_per_expert

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class XInfo(NamedTuple):
    data: torch.Tensor  # [T, H]
    scales: torch.Tensor | None  # [T, ceil(H/128)] fp32 for an FP8 pair
    num_tokens: int
    hidden: int

    @property
    def is_pair(self) -> bool:
        return self.scales is not None


MAX_EXPERTS = 2**31  # expert ids travel as int32 (the rows' routing columns)
_INT64_MAX = 2**63 - 1


def check_dense(t, arg: int) -> None:
    """``t`` (if a tensor) must be strided and hold data: a sparse or meta tensor would fail later, in the
    middle of the call's preparation (``arg``: index into ``errors.ARGS``)."""
    if not isinstance(t, torch.Tensor):
        return
    if t.layout != torch.strided:
        raise InputError(Code.DENSE, arg, 0)
    if t.is_meta:
        raise InputError(Code.DENSE, arg, 1)


def as_int(v) -> int | None:
    """A python int from an int-like value (``numbers.Integral``: python or numpy ints, not bool), else None."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        return None
    return int(v)


def _clamp(v: int) -> int:
    return max(-_INT64_MAX, min(_INT64_MAX, v))


def _dtype_of(t) -> int:
    return dtype_code(t.dtype) if isinstance(t, torch.Tensor) else dtype_code(None)


def check_x(x) -> XInfo:
    if isinstance(x, (tuple, list)):
        if len(x) != 2 or not all(isinstance(t, torch.Tensor) for t in x):
            raise InputError(Code.X_TYPE)
        data, scales = x
        check_dense(data, 0)
        check_dense(scales, 4)
        if data.dim() != 2 or data.dtype != FP8_DTYPE:
            raise InputError(Code.FP8_DATA_DTYPE, _dtype_of(data))
        t, h = data.shape
        if h < 1:
            raise InputError(Code.EMPTY_HIDDEN)
        if scales.dtype != torch.float32 or tuple(scales.shape) != (t, num_scale_cols(h)):
            raise InputError(Code.FP8_SCALES, t, num_scale_cols(h), _dtype_of(scales))
        if scales.device != data.device:
            raise InputError(Code.DEVICE)
        return XInfo(data, scales, t, h)
    return check_float_x(x)


def check_float_x(x) -> XInfo:
    """``x`` must be a ``[T, H]`` bf16/fp16/fp32 tensor with H >= 1."""
    if not isinstance(x, torch.Tensor):
        raise InputError(Code.X_TYPE)
    check_dense(x, 0)
    if x.dim() != 2:
        raise InputError(Code.X_NDIM, x.dim())
    if x.dtype not in FLOAT_DTYPES:
        raise InputError(Code.X_DTYPE, dtype_code(x.dtype))
    if x.shape[1] < 1:
        raise InputError(Code.EMPTY_HIDDEN)
    return XInfo(x, None, x.shape[0], x.shape[1])


def check_routing(topk_idx, topk_weights, num_tokens: int, device: torch.device) -> int:
    """Shape/dtype checks of ``topk_idx`` [T, K] int64 and ``topk_weights`` [T, K] fp32 (or None); returns K."""
    if not isinstance(topk_idx, torch.Tensor):
        raise InputError(Code.IDX_DTYPE, dtype_code(None))
    check_dense(topk_idx, 1)
    check_dense(topk_weights, 2)
    if topk_idx.dim() != 2 or topk_idx.shape[1] < 1:
        raise InputError(Code.IDX_NDIM, topk_idx.dim())
    if topk_idx.dtype != torch.int64:
        raise InputError(Code.IDX_DTYPE, dtype_code(topk_idx.dtype))
    if topk_idx.shape[0] != num_tokens:
        raise InputError(Code.NUM_TOKENS, num_tokens, topk_idx.shape[0])
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor):
            raise InputError(Code.W_DTYPE, dtype_code(None))
        if topk_weights.dtype != torch.float32:
            raise InputError(Code.W_DTYPE, dtype_code(topk_weights.dtype))
        if topk_weights.shape != topk_idx.shape:
            raise InputError(Code.W_SHAPE, *topk_idx.shape)
        if topk_weights.device != device:
            raise InputError(Code.DEVICE)
    if topk_idx.device != device:
        raise InputError(Code.DEVICE)
    return topk_idx.shape[1]


def check_alignment(expert_alignment) -> None:
    """``expert_alignment``: an int (``numbers.Integral``) >= 1."""
    a = as_int(expert_alignment)
    if a is None or a < 1:
        raise InputError(Code.ALIGNMENT, 0 if a is None else _clamp(a))


def check_num_experts(num_experts, num_ranks: int) -> int:
    """E: an int (python, numpy, any ``numbers.Integral``), positive, a multiple of R, < 2**31; returns it
    as a python int."""
    e = as_int(num_experts)
    if e is None:
        raise InputError(Code.NUM_EXPERTS, 0, num_ranks, 1)
    if e <= 0 or e % num_ranks != 0:
        raise InputError(Code.NUM_EXPERTS, _clamp(e), num_ranks)
    if e >= MAX_EXPERTS:
        raise InputError(Code.EXPERTS_LARGE, _clamp(e))
    return e


def check_expert_range(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Values in [-1, E). One host sync (two scalars)."""
    if topk_idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack(list(topk_idx.aminmax())).tolist())
    if lo < -1:
        raise InputError(Code.IDX_RANGE, lo, num_experts)
    if hi >= num_experts:
        raise InputError(Code.IDX_RANGE, hi, num_experts)


def check_dispatch(x, topk_idx, topk_weights, num_experts, num_ranks: int, fp8: bool,
                   expert_alignment) -> tuple[XInfo, int, int]:
    """All checks of a dispatch without a handle; returns ``(x info, K, E)``."""
    info = check_x(x)
    if topk_idx is None:
        raise InputError(Code.IDX_MISSING)
    k = check_routing(topk_idx, topk_weights, info.num_tokens, info.data.device)
    e = check_num_experts(num_experts, num_ranks)
    check_expert_range(topk_idx, e)
    if fp8 and not info.is_pair and info.hidden % 128 != 0:
        raise InputError(Code.FP8_HIDDEN, info.hidden)
    check_alignment(expert_alignment)
    return info, k, e


def check_combine_x(x, num_rows: int, hidden: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(Code.CX_DTYPE, dtype_code(None))
    check_dense(x, 3)
    if x.dim() != 2:
        raise InputError(Code.CX_NDIM, x.dim())
    if x.dtype not in FLOAT_DTYPES:
        raise InputError(Code.CX_DTYPE, dtype_code(x.dtype))
    if x.shape[0] != num_rows:
        raise InputError(Code.CX_ROWS, x.shape[0], num_rows)
    if x.shape[1] != hidden:
        raise InputError(Code.CX_HIDDEN, x.shape[1], hidden)
    return x


# ---- layout-driven dispatch, num_worst_tokens, combine's weights and bias (DeepEP's normal-mode arguments) ----

def check_layout(is_token_in_rank, num_tokens_per_expert, num_experts, num_tokens: int, num_ranks: int,
                 device: torch.device) -> int:
    """``is_token_in_rank`` [T, R] bool and ``num_tokens_per_expert`` [E] int32/int64; returns E (from the
    argument ``num_experts`` when given, else from ``num_tokens_per_expert``)."""
    if not isinstance(is_token_in_rank, torch.Tensor) or is_token_in_rank.dtype != torch.bool \
            or tuple(is_token_in_rank.shape) != (num_tokens, num_ranks) or is_token_in_rank.device != device:
        raise InputError(Code.LAYOUT_IN_RANK, num_tokens, num_ranks)
    per_expert = num_tokens_per_expert
    if not isinstance(per_expert, torch.Tensor) or per_expert.dtype not in (torch.int32, torch.int64) \
            or per_expert.dim() != 1 or per_expert.numel() == 0 or per_expert.numel() % num_ranks \
            or per_expert.device != device \
            or (num_experts is not None and num_experts != per_expert.numel()):
        raise InputError(Code.LAYOUT_EXPERTS, num_ranks)
    return per_expert.numel()


def check_layout_dispatch(x, is_token_in_rank, num_tokens_per_expert, topk_weights, num_experts, num_ranks: int,
                          fp8: bool, expert_alignment) -> tuple[XInfo, int]:
    """All checks of a dispatch driven by a precomputed layout, without ``topk_idx``; returns ``(x info, E)``."""
    info = check_x(x)
    if topk_weights is not None:
        raise InputError(Code.W_WITHOUT_IDX)
    e = check_layout(is_token_in_rank, num_tokens_per_expert, num_experts, info.num_tokens, num_ranks,
                     info.data.device)
    if fp8 and not info.is_pair and info.hidden % 128 != 0:
        raise InputError(Code.FP8_HIDDEN, info.hidden)
    check_alignment(expert_alignment)
    return info, e


def check_layout_matches(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, is_token_in_rank,
                         num_tokens_per_expert) -> None:
    """A layout passed along with a validated ``topk_idx`` must be its layout (one host sync)."""
    if is_token_in_rank is not None:
        check_layout(is_token_in_rank, torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device),
                     None, topk_idx.shape[0], num_ranks, topk_idx.device)
        if not torch.equal(is_token_in_rank, token_ranks(topk_idx, num_experts, num_ranks)):
            raise InputError(Code.LAYOUT_MISMATCH, 0)
    if num_tokens_per_expert is not None:
        check_layout(torch.zeros(topk_idx.shape[0], num_ranks, dtype=torch.bool, device=topk_idx.device),
                     num_tokens_per_expert, num_experts, topk_idx.shape[0], num_ranks, topk_idx.device)
        if not torch.equal(num_tokens_per_expert.long(), tokens_per_expert(topk_idx, num_experts)):
            raise InputError(Code.LAYOUT_MISMATCH, 1)


def check_worst_tokens(num_worst_tokens, handle_value: int | None = None) -> int:
    """An int >= 0; with a handle (``handle_value``) 0 or the handle's own value."""
    bad = not is_int(num_worst_tokens, 0)
    if not bad and handle_value is not None and num_worst_tokens not in (0, handle_value):
        bad = True
    if bad:
        raise InputError(Code.WORST_TOKENS, num_worst_tokens if isinstance(num_worst_tokens, int) else -1,
                         -1 if handle_value is None else handle_value)
    return num_worst_tokens


def check_combine_extras(topk_weights, bias, num_rows: int, num_topk: int, has_weights: bool, num_tokens: int,
                         hidden: int, x_dtype: torch.dtype, device: torch.device) -> tuple:
    """combine's ``topk_weights`` [rows, K] fp32 (only after a dispatch with weights) and ``bias``: None, a
    ``[T, H]`` tensor of x's dtype, or a pair of them. Returns the bias tensors as a tuple."""
    if topk_weights is not None:
        if not has_weights:
            raise InputError(Code.CW_WEIGHTS, -1)
        if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32 \
                or tuple(topk_weights.shape) != (num_rows, num_topk) or topk_weights.device != device:
            raise InputError(Code.CW_WEIGHTS, num_rows, num_topk)
    if bias is None:
        return ()
    parts = tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)
    if not 1 <= len(parts) <= 2 or not all(
            isinstance(b, torch.Tensor) and tuple(b.shape) == (num_tokens, hidden) and b.dtype == x_dtype
            and b.device == device for b in parts):
        raise InputError(Code.CW_BIAS, num_tokens, hidden, dtype_code(x_dtype))
    return parts
