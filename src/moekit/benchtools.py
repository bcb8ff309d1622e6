"""What every benchmark script under ``bench/`` shares: the device/date tag, DeepGEMM's accuracy measure,
ratio formatting and the ``rich`` table, so that all results read alike and carry where they came from."""

from __future__ import annotations

import datetime
import os
import platform as _py_platform

import torch
from rich.table import Table

from . import platform
from .kernels.reference import calc_diff  # noqa: F401  (DeepGEMM's measure, re-exported for bench/)


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def device_tag(extra: str = "") -> str:
    """``"<device>, <SMs or cores>, torch X, triton Y, <date>"`` (+ ``extra``): the line a result carries."""
    p = platform.info()
    if p.backend == "cpu":
        where = f"CPU {_py_platform.processor() or _py_platform.machine()}, {os.cpu_count()} cores"
    else:
        where = f"{p.device_name}, {p.sm_count} SMs"
    tag = f"{where}, torch {torch.__version__}, triton {p.triton_version}, {today()}"
    return f"{tag}, {extra}" if extra else tag


def ratio(value: float, base: float) -> str:
    """``value / base`` as ``"1.23x"`` (``"n/a"`` when the baseline is zero)."""
    return f"{value / base:.2f}x" if base else "n/a"


def table(title: str, columns: list[str]) -> Table:
    """A ``rich`` table with the first column left-justified and the rest right-justified (numbers)."""
    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    return t
