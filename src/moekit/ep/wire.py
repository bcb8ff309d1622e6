"""How rows look on the wire: several fields packed into one uint8 row, plus one status row per chunk.

Every exchange is ONE ``all_to_all_single`` of a ``[rows, row_bytes]`` uint8 tensor. The chunk for
each peer starts with one *status row* (the sender's :class:`~moekit.ep.errors.Status`, so that errors
travel in-band with no extra collective) followed by that peer's data rows.
"""

from __future__ import annotations

import dataclasses

import torch

from .._util import round_up
from .errors import STATUS_INTS, Status

STATUS_BYTES = 8 * STATUS_INTS


def plus_status(counts: list[int]) -> list[int]:
    """Rows per peer on the wire: each chunk's data rows plus its status row."""
    return [c + 1 for c in counts]


def ints_on(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device``, filled by kernels: ``torch.tensor(..., device=cuda)``
    copies from pageable host memory, which synchronises with the host (status words stay sync-free)."""
    out = torch.empty(len(values), dtype=torch.int64, device=device)
    for i, v in enumerate(values):
        out[i] = v
    return out


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    width: int
    offset: int  # bytes from the row start, a multiple of the dtype's size


class RowFormat:
    """Packing of named ``[n, width]`` fields into ``[n, row_bytes]`` uint8 rows.

    ``row_bytes`` = the fields (each aligned to its element size) rounded up to 8 bytes, at least
    ``STATUS_BYTES`` (a status row must fit). This is the per-row byte count of ``Buffer.stats``.
    """

    def __init__(self, spec: list[tuple[str, torch.dtype, int]]):
        off, fields = 0, []
        for name, dtype, width in spec:
            assert width >= 1, (name, width)
            size = torch.empty((), dtype=dtype).element_size()
            off = round_up(off, size)
            fields.append(Field(name, dtype, width, off))
            off += width * size
        self.fields = fields
        self.row_bytes = max(STATUS_BYTES, round_up(off, 8))

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed, strided views ``{name: [n, width]}`` of ``rows`` ``[n, row_bytes]`` uint8."""
        assert rows.dtype == torch.uint8 and rows.shape[1] == self.row_bytes
        out = {}
        for f in self.fields:
            nbytes = f.width * torch.empty((), dtype=f.dtype).element_size()
            out[f.name] = rows[:, f.offset:f.offset + nbytes].view(f.dtype)
        return out


def chunk_positions(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions in a buffer of chunks ``[status, count_0 rows], [status, count_1 rows], ...``.

    ``counts`` [P] int64 → ``(status_pos [P], data_pos [sum(counts)])``; data rows stay in order.
    """
    p = counts.numel()
    peer = torch.repeat_interleave(torch.arange(p, device=counts.device), counts)  # [S]
    starts = torch.cumsum(counts, 0) - counts + torch.arange(p, device=counts.device)
    data_pos = torch.arange(peer.numel(), device=counts.device) + peer + 1
    return starts, data_pos


class Chunks(list):
    """Per-peer row counts (a plain list) that remember their row positions, computed once per device:
    a handle's chunks are reused by every combine / cached dispatch without rebuilding index tensors."""

    def positions(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_positions", {})
        key = str(device)
        if key not in cache:
            cache[key] = chunk_positions(torch.tensor(list(self), dtype=torch.int64, device=device))
        return cache[key]


def positions(counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(counts, Chunks):
        return counts.positions(device)
    return chunk_positions(torch.tensor(counts, dtype=torch.int64, device=device))


def row_table(fmt: RowFormat, fields: dict[str, torch.Tensor], n: int, status: Status | torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """``[n + 1, row_bytes]`` uint8: the n rows of ``fields`` packed once, then the status row (index n), for
    senders that pick (and repeat) rows by index."""
    table = torch.empty(n + 1, fmt.row_bytes, dtype=torch.uint8, device=device)
    views = fmt.views(table[:n])
    for name, t in fields.items():
        views[name].copy_(t)
    table[n].zero_()
    table[n, :STATUS_BYTES].view(torch.int64).copy_(status if isinstance(status, torch.Tensor) else
                                                     ints_on(status.ints(), device))
    return table


def pack(fmt: RowFormat, fields: dict[str, torch.Tensor], counts: list[int], status: Status | torch.Tensor,
         row_index: torch.Tensor | None = None) -> torch.Tensor:
    """Build a send buffer ``[sum(counts) + P, row_bytes]``: for each peer its status row and its rows.

    ``fields[name]`` is ``[n, width]``; ``row_index`` [sum(counts)] selects (and repeats) rows of the
    fields in send order (peer-major); ``None`` sends the n rows in order.
    """
    names = [f.name for f in fmt.fields]
    assert sorted(fields) == sorted(names), (sorted(fields), names)
    device = next(iter(fields.values())).device
    n = next(iter(fields.values())).shape[0]
    if isinstance(status, Status):
        status = ints_on(status.ints(), device)
    if row_index is None:
        # Rows go out in order: write each field straight into the send buffer (one copy, not two).
        assert n == sum(counts), (n, counts)
        status_pos, data_pos = positions(counts, device)
        out = torch.empty(n + len(counts), fmt.row_bytes, dtype=torch.uint8, device=device)
        views = fmt.views(out)
        for name, t in fields.items():
            dst = views[name]
            if dst.dtype.itemsize == 1 and dst.dtype != torch.uint8:  # no float8 index kernels: move bytes
                dst, t = dst.view(torch.uint8), t.view(torch.uint8)
            dst.index_copy_(0, data_pos, t.to(dst.dtype))
        status_rows = torch.zeros(len(counts), fmt.row_bytes, dtype=torch.uint8, device=device)
        status_rows[:, :STATUS_BYTES].view(torch.int64).copy_(status.to(device).expand(len(counts), -1))
        out.index_copy_(0, status_pos, status_rows)
        return out
    table = row_table(fmt, fields, n, status, device)
    status_pos, data_pos = positions(counts, device)
    index = torch.empty(data_pos.numel() + len(counts), dtype=torch.int64, device=device)
    index[status_pos] = n
    index[data_pos] = torch.arange(n, device=device) if row_index is None else row_index
    return table.index_select(0, index)


def read_statuses(buf: torch.Tensor, counts: list[int]) -> list[list[int]]:
    """The status rows of a received buffer, as python ints (a host sync on a GPU)."""
    status_pos, _ = positions(counts, buf.device)
    return buf.index_select(0, status_pos)[:, :STATUS_BYTES].contiguous().view(torch.int64).tolist()


def unpack(fmt: RowFormat, buf: torch.Tensor, counts: list[int], row_index: torch.Tensor | None = None,
           out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Contiguous fields ``{name: [m, width]}`` of the data rows of a received buffer.

    ``row_index`` (optional) reorders/selects data rows (indices into the data rows in buffer order).
    ``out`` (optional): contiguous tensors to write fields into directly (one copy).
    """
    _, data_pos = positions(counts, buf.device)
    if row_index is not None:
        data_pos = data_pos.index_select(0, row_index)
    return select_rows(fmt, buf, data_pos, out)


def select_rows(fmt: RowFormat, buf: torch.Tensor, data_pos: torch.Tensor,
                out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fields ``{name: [m, width]}`` of rows ``data_pos`` of ``buf`` (written into ``out[name]`` where given)."""
    got = {}
    for name, v in fmt.views(buf).items():
        if out is not None and name in out:
            got[name] = torch.index_select(v, 0, data_pos, out=out[name])
        else:
            got[name] = v.index_select(0, data_pos)
    return got


def sum_rows(fmt: RowFormat, buf: torch.Tensor, counts: list[int], index: torch.Tensor,
             rows: int) -> dict[str, torch.Tensor]:
    """``{name: [rows, width]}`` float32: data row i of the received buffer added into row ``index[i]``.

    Status rows are added into a spare row that is dropped, so the strided field views are read
    once, with no gather first.
    """
    status_pos, data_pos = positions(counts, buf.device)
    target = torch.empty(buf.shape[0], dtype=torch.int64, device=buf.device)
    target[status_pos] = rows
    target[data_pos] = index
    out = {}
    for name, v in fmt.views(buf).items():
        acc = torch.zeros(rows + 1, v.shape[1], dtype=torch.float32, device=buf.device)
        out[name] = acc.index_add_(0, target, v.float())[:rows]
    return out


def merged_status(buf: torch.Tensor, counts: list[int], own: Status) -> torch.Tensor:
    """The failing status of the lowest rank among the status rows of ``buf`` and ``own``, on the device.

    Returns ``[STATUS_INTS]`` int64 (``own`` when nothing failed). No host sync: a forwarder passes it on.
    """
    status_pos, _ = positions(counts, buf.device)
    rows = buf.index_select(0, status_pos)[:, :STATUS_BYTES].contiguous().view(torch.int64)  # [P, 5]
    rows = torch.cat([ints_on(own.ints(), buf.device).unsqueeze(0), rows])
    key = torch.where(rows[:, 0] != 0, rows[:, 1], torch.iinfo(torch.int64).max)
    return rows[torch.argmin(key)]


def forward_rows(buf: torch.Tensor, recv_counts: list[int], send_counts: list[int], row_index: torch.Tensor,
                 status: torch.Tensor) -> torch.Tensor:
    """Re-send received rows as they are (no unpacking): a send buffer for ``send_counts`` whose data rows
    are the received data rows ``row_index`` and whose status rows hold ``status``. Overwrites one status
    row of ``buf``."""
    device = buf.device
    r_status, r_data = positions(recv_counts, device)
    buf[r_status[0], :STATUS_BYTES].view(torch.int64).copy_(status)
    s_status, s_data = positions(send_counts, device)
    index = torch.empty(s_data.numel() + len(send_counts), dtype=torch.int64, device=device)
    index[s_status] = r_status[0]
    index[s_data] = r_data.index_select(0, row_index)
    return buf.index_select(0, index)
