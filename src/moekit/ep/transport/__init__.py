"""How rows move between ranks. ``torch_dist``: torch.distributed collectives (gloo, NCCL, RCCL)."""

from .torch_dist import Comm

__all__ = ["Comm"]
