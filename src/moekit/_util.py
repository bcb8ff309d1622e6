"""Small helpers with one home: ceil-division, rounding up, and the positive-int argument check.

Torch-free, so that every layer (``kernels``, ``ep``, ``plan``, ``config``) can import it.
"""

from __future__ import annotations

from typing import Any


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``b > 0``), without floats."""
    return -(-a // b)


def round_up(x: int, m: int) -> int:
    """``x`` rounded up to a multiple of ``m`` (``m > 0``)."""
    return cdiv(x, m) * m


def check_positive_int(name: str, v: Any, *, none_ok: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``v`` is an int ``>= 1`` (``bool`` is refused; ``None``
    passes when ``none_ok``)."""
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {v!r}")
