"""How rows move between ranks, behind one interface (:class:`Transport` → :class:`Transfer`).

``collective``: torch.distributed collectives (gloo, NCCL, RCCL). ``torch_dist.Comm``: one process
group seen from one rank (the collective transport's building block).
"""

from .base import Rows, Transfer, Transport
from .collective import CollectiveTransport, RowEngine
from .torch_dist import Comm

__all__ = ["CollectiveTransport", "Comm", "RowEngine", "Rows", "Transfer", "Transport"]
