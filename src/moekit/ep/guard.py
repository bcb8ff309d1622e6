"""The guard of a Buffer's collective calls: no fault on one rank hangs or aborts the others.

Three mechanisms, one per kind of fault (see docs/ep.md, "Faults"):

1. **Any exception while a rank prepares its part** (validation, allocation, a meta or sparse tensor,
   a device problem, a wrong handle) is turned into that rank's status word (``status_of``): an
   ``InputError`` keeps its code, any other exception becomes ``Code.EXCEPTION`` with its type, and
   the rank still enters the exchange. After the exchange every rank raises the same error
   (``raise_first``); for ``Code.EXCEPTION`` the failing rank's message text follows in one more
   small fixed-size exchange, so every rank shows it.
2. **Handle identity**: every collective call of a Buffer gets a sequence number (the same on every
   rank of an SPMD program); a handle remembers the call that made it and its mode. Calls that reuse
   a handle (combine, cached dispatch, low-latency combine) first exchange a small fixed-size message
   of status + identity (``preflight``) on host-check backends, so a stale, foreign or mismatched
   handle — or ranks calling different methods — is a ``ValueError`` on every rank before any payload
   moves (a payload sized from mismatched handles makes gloo abort the process).
3. **Bounded waits**: every host wait of the transport is bounded by the Buffer's ``timeout``
   (``transport.torch_dist.Comm``). When one runs out or the backend reports a lost peer, ``Watch``
   finds which ranks did not arrive through a side channel — the process group's key-value store:
   each rank that gave up writes one key for the call, waits up to ``min(timeout, 5 s)`` for the keys
   of the others, and names the ranks whose key never came (dead, or alive but not calling) in a
   :class:`~moekit.ep.errors.PeerTimeout`. Nothing is written to the store on the success path. The
   Buffer is then marked broken: its next call raises at once (the group must be rebuilt).
"""

from __future__ import annotations

import collections
import itertools
import time
import zlib
from collections.abc import Iterable

import torch

from .errors import (
    CALLS,
    EXCEPTION_TYPES,
    OK,
    STATUS_INTS,
    Code,
    InputError,
    PeerTimeout,
    Status,
    exception_code,
    first_failure,
    raise_status,
)

# Identity part of a preflight row: call (CALLS index), handle's call number, mode, Buffer key hash.
ID_INTS = 4
TEXT_BYTES = 512  # of the message of a Code.EXCEPTION, exchanged after the status
_instances: dict[int, itertools.count] = {}  # Buffers per key in this process: the store prefix of each


def call_code(name: str) -> int:
    """Index of ``errors.CALLS`` (another name counts as ``"Buffer.agree"``)."""
    return CALLS.index(name) if name in CALLS else CALLS.index("Buffer.agree")


def key_hash(key: tuple) -> int:
    """A hash of a Buffer key that is the same in every process (python's ``hash`` is salted)."""
    return zlib.crc32(repr(key).encode())


class Failure:
    """Passed instead of ``x`` to ``Buffer.dispatch`` / ``combine`` by a caller (the MoE layer) that failed
    before the call: the Buffer reports ``error`` collectively instead of the call's own checks."""

    def __init__(self, error: BaseException):
        self.error = error


def _default_store():
    # The key-value store of the default process group: the side channel of Watch. It is torch's
    # private accessor (no public one exists); without it PeerTimeout cannot name the missing ranks.
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store: the ranks stay unnamed
        return None


class Guard:
    """One per Buffer: call numbers, status words from exceptions, preflights and the timeout watch.

    ``key``: the Buffer's key (its group's global ranks and node layout); ``rank``, ``world``: this rank and
    R in the Buffer's group; ``timeout``: seconds of every wait.
    """

    def __init__(self, key: tuple, rank: int, world: int, timeout: float):
        self.key, self.rank, self.world, self.timeout = key, rank, world, float(timeout)
        self.hash = key_hash(key)
        self.seq = 0  # number of the current (latest) collective call
        self.op = ""
        self.broken: str | None = None
        self._text = ""  # message of this rank's latest Code.EXCEPTION, sent if its status wins
        n = next(_instances.setdefault(self.hash, itertools.count()))
        self._prefix = f"moekit/ep/{self.hash}/{n}"

    # ---- calls -------------------------------------------------------------------------------
    def begin(self, op: str) -> int:
        """Start collective call ``op``; returns its number. Raises PeerTimeout when the group failed."""
        if self.broken is not None:
            raise PeerTimeout(f"moekit.Buffer.{op}", (), self.timeout,
                              detail=f"this Buffer's group already failed: {self.broken}")
        self.seq += 1
        self.op = op
        return self.seq

    def status_of(self, err: BaseException) -> Status:
        """This rank's status word for an exception raised while preparing its part."""
        if isinstance(err, Failure):
            err = err.error
        if isinstance(err, InputError):
            return err.status(self.rank)
        self._text = f"{type(err).__name__}: {err}"
        return Status(int(Code.EXCEPTION), self.rank, exception_code(err))

    def raise_first(self, op: str, statuses: Iterable, comm) -> None:
        """Raise the lowest failing rank's status (every rank alike); with ``Code.EXCEPTION``, first
        exchange that rank's message text over ``comm`` (collective: every rank gets here)."""
        s = first_failure(statuses)
        if s.ok:
            return
        if s.code == Code.EXCEPTION:
            text = self._exchange_text(s.rank, comm)
            exc = EXCEPTION_TYPES[s.a]
            err = exc(f"moekit.Buffer.{op}: rank {s.rank} of {self.world}: raised while preparing its part of the "
                      f"call: {text}")
            err.moekit_status = s
            raise err
        raise_status(op, s, self.world)

    def _exchange_text(self, src: int, comm) -> str:
        mine = self._text if src == self.rank else ""
        raw = mine.encode()[:TEXT_BYTES]
        row = torch.zeros(TEXT_BYTES, dtype=torch.uint8)
        row[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else row[:0]
        msg = row.unsqueeze(0).expand(self.world, -1).contiguous()
        got = comm.exchange_fixed(msg)
        return bytes(got[src].tolist()).rstrip(b"\0").decode(errors="replace")

    # ---- handle calls ------------------------------------------------------------------------
    def identity(self, call: str, handle_seq: int, mode: int, key: tuple | None) -> list[int]:
        return [call_code(call), int(handle_seq), int(mode), key_hash(key) if key is not None else -1]

    def preflight(self, op: str, comm, status: Status, ident: list[int], width: int, device) -> None:
        """Exchange ``[status | identity]`` rows of ``width`` int64 and raise on every rank if a rank failed,
        calls another method or passes a handle of another call (before any payload moves)."""
        msg = torch.zeros(self.world, width, dtype=torch.int64)
        msg[:, :STATUS_INTS] = torch.tensor(status.ints(), dtype=torch.int64)
        msg[:, width - ID_INTS:] = torch.tensor(ident, dtype=torch.int64)
        got = comm.exchange_fixed(msg.to(device)).tolist()
        self.raise_first(op, (row[:STATUS_INTS] for row in got), comm)
        raise_status(op, identity_mismatch([row[width - ID_INTS:] for row in got]), self.world)

    # ---- bounded waits -----------------------------------------------------------------------
    def on_fail(self, err: BaseException) -> None:
        """Called by the transport when a wait ran out or a peer was lost: raises PeerTimeout."""
        lost = "timed out" not in str(err).lower()
        missing = self._missing()
        detail = str(err).splitlines()[0][:160]
        self.broken = f"call #{self.seq} ({self.op}): rank(s) {list(missing)} did not arrive"
        raise PeerTimeout(f"moekit.Buffer.{self.op or 'call'}", missing, self.timeout, detail=detail,
                          lost=lost) from err

    def _missing(self) -> tuple[int, ...]:
        store = _default_store()
        if store is None or self.world < 2:
            return ()
        base = f"{self._prefix}/gave-up/{self.seq}"
        try:
            store.set(f"{base}/{self.rank}", "1")
            seen = {self.rank}
            deadline = time.monotonic() + min(self.timeout, 5.0)
            while len(seen) < self.world and time.monotonic() < deadline:
                for r in range(self.world):
                    if r not in seen and store.check([f"{base}/{r}"]):
                        seen.add(r)
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store's host may be the dead rank
            return ()
        return tuple(r for r in range(self.world) if r not in seen)


def identity_mismatch(idents: list[list[int]]) -> Status:
    """The lowest rank whose call or handle identity differs from the majority's (rank 0's on a tie), or OK.

    The majority, not rank 0: with one misbehaving rank — rank 0 included — the rank named is the bad one.
    """
    rows = [tuple(int(v) for v in row) for row in idents]
    counts = collections.Counter(rows)
    ref = max(counts, key=lambda r: (counts[r], r == rows[0]))
    for s, row in enumerate(rows):
        if row[0] != ref[0]:
            return Status(int(Code.OP_MISMATCH), s, ref[0], row[0])
        if row[3] != ref[3]:
            return Status(int(Code.HANDLE_FOREIGN), s)
        for field in (1, 2):  # 0 = the handle's call, 1 = its mode (IDENTITY_FIELDS)
            if row[field] != ref[field]:
                return Status(int(Code.HANDLE_STALE), s, field - 1, ref[field], row[field])
    return OK


def handle_kind(handle) -> int:
    """Index of ``errors.HANDLE_KINDS``."""
    from .handle import DispatchHandle
    from .low_latency import LowLatencyHandle

    if isinstance(handle, DispatchHandle):
        return 0
    if isinstance(handle, LowLatencyHandle):
        return 1
    return 2 if handle is None else 3


__all__ = ["Failure", "Guard", "identity_mismatch"]
