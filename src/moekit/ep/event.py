"""EventOverlap: the completion of an asynchronous dispatch/combine (DeepEP's name and methods)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class EventOverlap:
    """Returned by every dispatch/combine. Without ``async_finish`` it is already complete.

    CPU: holds the pending gloo work and a *finish* step (unpacking the received rows into the
    returned tensors); ``wait()`` runs both. GPU: holds a CUDA event recorded on the communication
    stream; ``current_stream_wait()`` makes the current stream wait for it without a host sync.
    The returned tensors must not be read before one of the two is called.
    """

    def __init__(self, works=(), finish: Callable[[], None] | None = None,
                 cuda_event: torch.cuda.Event | None = None, check: Callable[[], None] | None = None):
        self._works = list(works)
        self._finish = finish
        self._cuda_event = cuda_event
        self._check = check  # GPU only: the in-band status check, a host sync, run by wait()

    @property
    def done(self) -> bool:
        return not self._works and self._finish is None and self._check is None

    def wait(self) -> None:
        """Complete the transfer and raise a collective input error if there was one.

        CPU: blocks the host until the rows arrived and are unpacked. GPU: the current stream waits
        for the communication stream, and the host reads the status words (a host sync).
        """
        self._complete()
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)
            check, self._check = self._check, None
            if check is not None:
                self._cuda_event.synchronize()
                check()

    def current_stream_wait(self) -> None:
        """GPU: the current stream waits for the transfer, no host sync (the status check is left to
        ``wait()``; a rank whose own input was bad raises at once). CPU: same as ``wait()``."""
        if self._cuda_event is not None:
            self._complete()
            torch.cuda.current_stream().wait_event(self._cuda_event)
            return
        self.wait()

    def _complete(self) -> None:
        works, self._works = self._works, []
        for w in works:
            w.wait()
        finish, self._finish = self._finish, None
        if finish is not None:
            finish()
