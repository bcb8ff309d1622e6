"""NCCL communicators that use at most ``num_sms`` CTAs (DeepEP's ``num_sms``, as an NCCL config).

NCCL >= 2.17 lets a communicator be created with a ``ncclConfig_t``; torch exposes it as
``torch.distributed.ProcessGroupNCCL.Options().config`` (fields ``max_ctas``, ``min_ctas``,
``cga_cluster_size``, ...), passed to ``dist.new_group(..., pg_options=...)``. A Buffer built with an
explicit ``num_sms`` on an NCCL group creates its own communicators with ``max_ctas = num_sms``, so that
its collectives leave the other SMs to the computation they overlap with. Never on gloo (no CTAs), and
never where this torch build has no NCCL config (then the Buffer keeps the caller's group).
"""

from __future__ import annotations

import torch.distributed as dist

from ..._util import check_positive_int


def nccl_options_class():
    """``torch.distributed.ProcessGroupNCCL.Options``, or None when this torch has no NCCL backend."""
    pg = getattr(dist, "ProcessGroupNCCL", None)
    return getattr(pg, "Options", None)


def cta_limited_options(num_sms: int, options_cls=None):
    """NCCL process-group options whose communicators use at most ``num_sms`` CTAs, or None.

    ``options_cls``: the options class (default :func:`nccl_options_class`). Returns None when there is
    none or its ``config`` has no ``max_ctas`` (NCCL < 2.17 builds). ``min_ctas`` is lowered to
    ``num_sms`` when it was set higher (NCCL rejects min > max). Raises ValueError for ``num_sms < 1``.
    """
    check_positive_int("num_sms", num_sms)
    cls = nccl_options_class() if options_cls is None else options_cls
    if cls is None:
        return None
    options = cls()
    config = getattr(options, "config", None)
    if config is None or not hasattr(config, "max_ctas"):
        return None
    config.max_ctas = num_sms
    min_ctas = getattr(config, "min_ctas", None)
    if isinstance(min_ctas, int) and min_ctas > num_sms:
        config.min_ctas = num_sms
    return options


def backend_of(group) -> str:
    """The backend name of ``group`` (``"gloo"`` when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return "gloo"
    return str(dist.get_backend(group)).lower()


def buffer_pg_options(backend: str, num_sms: int | None, options_cls=None):
    """The process-group options of a Buffer's own communicators, or None (it uses the caller's groups):
    None unless ``num_sms`` was given, the backend is NCCL and this torch has an NCCL config."""
    if num_sms is None or backend != "nccl":
        return None
    return cta_limited_options(num_sms, options_cls)
