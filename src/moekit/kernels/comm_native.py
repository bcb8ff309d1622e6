"""The native CPU executor of the heap protocol: the row copies of :mod:`moekit.kernels.comm` done by
``num_workers`` threads with torch's native copies, the flags through real atomics.

The protocol (heap layout, parities, exchange numbers, capacity, status rows) lives in one place,
:class:`moekit.ep.transport.symmetric.Channel`; it calls an *executor* for the four steps. The Triton
kernels of :mod:`moekit.kernels.comm` are the executor on GPUs (and in the interpreter tests); this one
runs them on CPU processes that map each other's heaps (``/dev/shm``), at memory speed:

* ``push_rows``: K = ``num_workers`` threads (the SM budget ``num_sms`` on cores: DeepSeek-V3 gave 20 of
  132 SMs to communication, moekit gives K threads of a rank's process). Worker p copies rows ``p, p + K,
  ...`` groups of chunk d — one contiguous share of it — straight into rank d's receive slot with
  ``torch.index_select(..., out=peer view)`` (one copy, GIL released), then sets its flag ``[parity, s, p]``
  in rank d's heap with a release store (:mod:`moekit.kernels.atomics`). Returns once queued (no wait).
* ``wait``: acquire loads of this rank's flags until all ``R * K`` read the exchange number.
* ``notify`` / ``combine_rows``: the plain-torch references of :mod:`moekit.kernels.comm` (the same
  float32 additions in the same rank order, so results stay bitwise equal to the collective transport).

``last_workers`` is the number of distinct worker threads that ran the last push (tests check it is K).
"""

from __future__ import annotations

import queue
import threading

import torch

from . import atomics
from .comm import notify_reference


class NativeExecutor:
    """K worker threads moving rows between heaps mapped in this process.

    Args:
        peers: ``[R]`` uint8 tensors, rank d's whole heap as mapped here (``Heap.peers``).
        num_workers: K, the exact number of threads that move rows (``num_sms``).
    """

    name = "native"

    def __init__(self, peers: list[torch.Tensor], num_workers: int):
        self.peers, self.num_workers = list(peers), int(num_workers)
        self.last_workers = 0
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._ran: set[int] = set()
        self._queues = [queue.SimpleQueue() for _ in range(self.num_workers)]
        self._threads = [threading.Thread(target=self._loop, args=(q,), daemon=True, name=f"moekit-comm-{p}")
                         for p, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def _loop(self, q: queue.SimpleQueue) -> None:
        while True:
            task = q.get()
            if task is None:
                return
            try:
                task()
            except BaseException as err:  # noqa: BLE001 - surfaced by the next wait
                self._error = err

    def close(self) -> None:
        for q in self._queues:
            q.put(None)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def raise_error(self) -> None:
        """Re-raise an exception a worker hit (once)."""
        err, self._error = self._error, None
        if err is not None:
            raise RuntimeError(f"moekit: a communication worker failed: {err}") from err

    # ---- push ---------------------------------------------------------------------------------
    def push_rows(self, src: torch.Tensor, idx: torch.Tensor, counts: list[int], dst_byte_off: int,
                  flag_word_off: int, seq: int, me: int) -> None:
        """Chunk d (rows ``src[idx[sum(counts[:d]):...]]``, ``src`` [n, rb] uint8) into rank d's heap at byte
        ``dst_byte_off``, then words ``flag_word_off + p`` of rank d's heap := ``seq`` (release), one per
        worker p. ``me``: this rank (workers start at the next rank, so that ranks do not all write to rank 0
        first). Queued to the K workers; returns at once."""
        r, k, rb = len(self.peers), self.num_workers, src.shape[1]
        offs = [0]
        for c in counts:
            offs.append(offs[-1] + c)
        self._ran = set()
        order = [(me + 1 + i) % r for i in range(r)]

        def work(p: int) -> None:
            for d in order:
                n = counts[d]
                lo, hi = n * p // k, n * (p + 1) // k  # worker p's contiguous share of chunk d
                if hi > lo:
                    dst = self.peers[d][dst_byte_off + lo * rb:dst_byte_off + hi * rb].view(hi - lo, rb)
                    torch.index_select(src, 0, idx[offs[d] + lo:offs[d] + hi], out=dst)
                heap = self.peers[d]
                atomics.store_release(heap.data_ptr() + 4 * (flag_word_off + p), seq)
            with self._lock:
                self._ran.add(threading.get_ident())
                self.last_workers = len(self._ran)

        for p, q in enumerate(self._queues):
            q.put(lambda p=p: work(p))

    # ---- wait ---------------------------------------------------------------------------------
    def ready(self, flags: torch.Tensor, seq: int, done: list[bool]) -> list[bool]:
        """One acquire read of the ``[R, K]`` int32 ``flags`` (this rank's, in its heap) of the sources not yet
        ``done``; returns which sources have all K flags at ``seq``."""
        self.raise_error()
        base, k = flags.data_ptr(), flags.shape[1]
        out = []
        for s, ok in enumerate(done):
            if not ok:
                row = base + 4 * s * k
                ok = all(atomics.load_acquire(row + 4 * p) == seq for p in range(k))
            out.append(ok)
        return out

    # ---- notify / combine: the references, on the calling thread -------------------------------------
    def notify(self, is_token_in_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return notify_reference(is_token_in_rank)

    def combine_rows(self, rows: torch.Tensor, pos: torch.Tensor, slot_rows: int) -> torch.Tensor:
        """:func:`moekit.kernels.comm.combine_rows`: chunk d's rows are contiguous in slot d and belong to the
        tokens with ``pos[:, d] >= 0`` in token order, so each chunk is added with one ``index_add_`` in rank
        order d = 0, 1, ... (for every token the same float32 additions in the same order as the reference)."""
        t, r = pos.shape
        out = torch.zeros(t, rows.shape[1], dtype=torch.float32, device=rows.device)
        for d in range(r):
            toks = (pos[:, d] >= 0).nonzero().squeeze(1)
            n = toks.numel()
            if n:
                out.index_add_(0, toks, rows[d * slot_rows + 1:d * slot_rows + 1 + n].float())
        return out
