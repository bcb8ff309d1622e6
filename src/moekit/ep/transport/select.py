"""``Buffer(transport=...)``: which transport a Buffer uses, and why."""

from __future__ import annotations

import torch

from ...dist import NodeLayout
from .base import Transport
from .collective import CollectiveTransport
from .torch_dist import Comm

TRANSPORTS = ("auto", "collective", "symmetric")


def make_transport(kind: str, comm: Comm, layout: NodeLayout, node_groups=None, *, num_sms: int = 20,
                   device: torch.device | None = None) -> Transport:
    """The Transport of a Buffer. ``kind``: one of :data:`TRANSPORTS` (see ``Buffer``'s docstring)."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    if kind == "symmetric":
        raise ValueError("transport='symmetric' is not available in this build")
    return CollectiveTransport(comm, layout, node_groups)
