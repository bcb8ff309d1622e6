"""Small helpers with one home: ceil-division, rounding up, and the (positive-)int argument checks.

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


def is_int(v: Any, minimum: int | None = None) -> bool:
    """Whether ``v`` is an int (``bool`` is not, though Python makes it a subclass), ``>= minimum`` when given.
    For checks that report otherwise than by ``ValueError`` (moekit.ep's collective status codes)."""
    return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)


def check_positive_int(name: str, v: Any, *, none_ok: bool = False, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``v`` is an int ``>= minimum`` (``bool`` is refused; ``None``
    passes when ``none_ok``). The message says "a positive int", or "an int >= minimum" for another minimum."""
    if v is None and none_ok:
        return
    if not is_int(v, minimum):
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}{' or None' if none_ok else ''}, got {v!r}")
