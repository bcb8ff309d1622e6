"""One executor for every schedule: runs a rank's op list (``moekit.schedule.program``) on its local modules.

The public classes (``DualPipe``, ``DualPipeV``, ``OneFOneB``) only name a stage graph and how many
modules a rank holds; everything else — micro-batching, p2p, loss, zero-bubble weight gradients,
overlapped F&B pairs, recording — lives here, with its state per instance and per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..schedule import (
    Op,
    PhaseRecord,
    Simulation,
    StageLinks,
    check_schedule,
    microbatches_per_direction,
    simulate,
    stage_graph,
)
from . import p2p as _p2p
from .utils import WeightGradStore, backward_chunk, gather, scatter


@dataclasses.dataclass
class _StepState:
    training: bool
    return_outputs: bool
    criterion: Callable | None
    p2p: _p2p.P2P | None
    inputs_mb: list  # micro-batches of the direction fed on this rank
    labels_mb: list
    stage_inputs: dict = dataclasses.field(default_factory=dict)  # (module, mb) -> inputs kept for backward
    stage_outputs: dict = dataclasses.field(default_factory=dict)  # (module, mb) -> outputs kept for backward
    local_act: dict = dataclasses.field(default_factory=dict)  # (module, mb) -> inputs from my other module
    local_grad: dict = dataclasses.field(default_factory=dict)  # (module, mb) -> output grads from it
    losses: dict = dataclasses.field(default_factory=dict)  # mb -> loss
    outputs: dict = dataclasses.field(default_factory=dict)  # mb -> returned outputs
    live: int = 0
    peak: int = 0


class PipelineSchedule(nn.Module):
    """Base of the pipeline schedules: ``modules`` of this rank, ``step`` runs one batch through the pipe.

    Args:
        modules: this rank's stage modules (``num_modules`` of them: a sequence, ``nn.Sequential`` or
            ``nn.ModuleList``; a single module for 1F1B).
        batch_dim: the dimension along which ``step`` splits inputs/labels into micro-batches.
        process_group: the pipeline's group (default: the world; none needed for a single rank).
        rank_mapping: ``rank_mapping[group_rank]`` is that rank's pipeline rank (default: identity).
        record: keep a ``PhaseRecord`` per op of the last step in ``records``.
        timeout: seconds, the bound of every host wait on a message of the step (gloo; NCCL: its watchdog);
            a neighbour that never sends raises ``moekit.ep.PeerTimeout`` naming its pipeline rank.

    Subclasses set ``kind`` (see ``moekit.schedule.stage_graph``) and ``num_modules``.
    """

    kind: str = ""
    num_modules: int = 2

    def __init__(self, modules, batch_dim: int = 0, process_group: dist.ProcessGroup | None = None,
                 rank_mapping: list[int] | None = None, *, record: bool = False, timeout: float = 300.0) -> None:
        super().__init__()
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        self.timeout = float(timeout)  # bound of every host wait on a pipeline message (moekit.ep.PeerTimeout)
        if isinstance(modules, nn.Module) and (self.num_modules == 1
                                               or not isinstance(modules, (nn.ModuleList, nn.Sequential))):
            modules = [modules]
        modules = list(modules)
        if len(modules) != self.num_modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(f"{type(self).__name__} takes {self.num_modules} nn.Module(s) per rank, "
                             f"got {[type(m).__name__ for m in modules]}")
        self.module = nn.ModuleList(modules)
        # The classmethod hook of DeepSeek's package: used for F&B pairs when both modules share a type.
        self.overlapped_forward_backward = (len(modules) == 2 and type(modules[0]) is type(modules[1])
                                            and callable(getattr(type(modules[0]), "overlapped_forward_backward",
                                                                 None)))
        self.batch_dim = batch_dim
        if dist.is_available() and dist.is_initialized():
            self.group = process_group or dist.group.WORLD
            self.num_ranks = dist.get_world_size(self.group)
            group_rank = dist.get_rank(self.group)
        else:
            if process_group is not None:
                raise ValueError("process_group given but torch.distributed is not initialised")
            self.group, self.num_ranks, group_rank = None, 1, 0
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        if sorted(rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of range({self.num_ranks}), got {rank_mapping}")
        self.rank = rank_mapping[group_rank]
        self._group_rank_of = [0] * self.num_ranks
        for g, r in enumerate(rank_mapping):
            self._group_rank_of[r] = g
        self.is_first_rank = self.rank == 0
        self.is_last_rank = self.rank == self.num_ranks - 1
        if self.kind == "dualpipe" and self.num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of ranks, got {self.num_ranks}; "
                             f"use DualPipeV for an odd count")
        self.graph: dict = stage_graph(self.kind, self.num_ranks)
        self.record = record
        self.records: list[PhaseRecord] = []
        self.peak_activations = 0
        self.p2p_tensor_shapes: list[tuple[int, ...]] | None = None
        self.p2p_tensor_dtype: torch.dtype | None = None
        # None: post p2p ops in the one global order on backends that need it (all but gloo); True/False
        # forces it (tests run the strict order on gloo too).
        self.p2p_strict_order: bool | None = None
        self._plans: dict[int, Simulation] = {}

    # -- configuration -------------------------------------------------------------------------

    def set_p2p_tensor_shapes(self, shapes) -> None:
        """Shapes of the tensors this pipeline's stages send (overrides the module-level default)."""
        self.p2p_tensor_shapes = _p2p.normalize_shapes(shapes)

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        """Dtype of the tensors this pipeline's stages send (overrides the module-level default)."""
        self.p2p_tensor_dtype = _p2p.normalize_dtype(dtype)

    def links(self, module: int) -> StageLinks:
        return self.graph[(self.rank, module)]

    @property
    def device(self) -> torch.device:
        for t in self.module.parameters():
            return t.device
        for t in self.module.buffers():
            return t.device
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- the step ------------------------------------------------------------------------------

    def step(self, *inputs: torch.Tensor | None, num_chunks: int = 0, criterion: Callable | None = None,
             labels: Sequence[torch.Tensor | None] = (), return_outputs: bool = False):
        """Run one batch of ``num_chunks`` micro-batches through the pipeline: forward, and backward
        too unless grad mode is off (``torch.no_grad()``: an inference step).

        Arguments:
            *inputs: the batch, only on the rank(s) where a direction starts; split into micro-batches
                along ``batch_dim`` with ``tensor_split``. Other ranks pass nothing.
            num_chunks: number of micro-batches in the step (see the subclass for the minimum).
            criterion: ``criterion(*outputs, *labels) -> scalar loss`` of one micro-batch; needed for
                training on the rank(s) where a direction ends.
            labels: tensors split like ``inputs``, on the rank(s) where a direction ends.
            return_outputs: also return the last stage's outputs (detached).

        Returns ``(loss, outputs)``: on a rank where a direction ends, ``loss`` is the ``[micro-batches]``
        tensor of per-micro-batch losses (``None`` without ``criterion``) and ``outputs`` the outputs
        concatenated along ``batch_dim`` (a tensor if the stage returns one, else a tuple), or ``None``
        unless ``return_outputs``; on other ranks ``(None, None)``. Parameter gradients accumulate into
        ``.grad`` as with ``backward``. Synchronises the host with p2p receives on gloo (not on NCCL).
        """
        shapes = self.p2p_tensor_shapes or _p2p.default_p2p_tensor_shapes()
        dtype = self.p2p_tensor_dtype or _p2p.default_p2p_tensor_dtype()
        if self.num_ranks > 1 and (shapes is None or dtype is None):
            raise ValueError("p2p tensor shapes and dtype are not set: call set_p2p_tensor_shapes(...) and "
                             "set_p2p_tensor_dtype(...) (module-level defaults or on this pipeline) before step")
        check_schedule(self.kind, self.num_ranks, num_chunks, ranks_arg="num_ranks", microbatches_arg="num_chunks")
        training = torch.is_grad_enabled()
        mine = [self.links(m) for m in range(self.num_modules)]
        ends = [m for m, lk in enumerate(mine) if lk.next is None]
        starts = [m for m, lk in enumerate(mine) if lk.prev is None]
        if training and ends and criterion is None:
            raise ValueError(f"rank {self.rank} holds the last stage of a direction: a training step needs criterion")
        nmb = microbatches_per_direction(self.kind, num_chunks)
        plan = self._plans.get(num_chunks)
        if plan is None:
            plan = self._plans[num_chunks] = simulate(self.kind, self.num_ranks, num_chunks)
        comm = None
        if self.num_ranks > 1:
            # gloo keeps the two directions of a pair apart, so receives may be posted ahead of the
            # global order; NCCL (one stream per pair) and unknown backends follow it strictly.
            strict = self.p2p_strict_order
            if strict is None:
                strict = dist.get_backend(self.group) != "gloo"
            comm = _p2p.P2P(self.group, self.rank, self._group_rank_of, plan.sends, shapes, dtype,
                            self.device, backward=training, strict=strict, timeout=self.timeout)
        st = _StepState(training=training, return_outputs=return_outputs, criterion=criterion, p2p=comm,
                        inputs_mb=scatter(inputs, nmb, self.batch_dim) if starts else [],
                        labels_mb=scatter(tuple(labels), nmb, self.batch_dim) if ends else [])
        self._shapes, self._dtype = shapes, dtype
        self.records = []
        WeightGradStore.clear()
        try:
            for op in plan.programs[self.rank]:
                self._run(op, st)
            if comm is not None:
                comm.finish()
            assert WeightGradStore.funcs_queue.empty() and not WeightGradStore.cache
        finally:
            WeightGradStore.clear()
        if training:
            self.peak_activations = st.peak
        if not ends:
            return None, None
        loss = torch.stack([st.losses[mb] for mb in range(nmb)]) if criterion is not None else None
        outputs = None
        if return_outputs:
            outputs = gather([st.outputs[mb] for mb in range(nmb)], self.batch_dim)
            if len(outputs) == 1:
                outputs = outputs[0]
        return loss, outputs

    # -- ops -----------------------------------------------------------------------------------

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # recording times GPU work, at the cost of overlap
        return time.time()

    @contextlib.contextmanager
    def _phase(self, op: Op):
        """Times the compute part of ``op`` as one PhaseRecord (when recording); fetch/emit stay outside."""
        if not self.record:
            yield
            return
        t0 = self._now()
        yield
        self.records.append(PhaseRecord(self.rank, op.kind, op.chunk, op.mb, t0, self._now(),
                                        microbatch_b=op.mb_b, chunk_b=op.chunk_b))

    def _run(self, op: Op, st: _StepState) -> None:
        if not st.training and op.kind in ("B", "W"):
            return
        if op.kind == "FB" and not st.training:
            op = Op("F", op.chunk, op.mb)
        if op.kind == "F":
            fetched = self._fetch_forward(st, op.chunk, op.mb)
            with self._phase(op):
                out, loss = self._compute_forward(st, op.chunk, *fetched)
            self._emit_forward(st, op.chunk, op.mb, out, loss)
        elif op.kind == "B":
            fetched = self._fetch_backward(st, op.chunk, op.mb)
            with self._phase(op):
                self._compute_backward(*fetched, zb=op.split)
            self._emit_backward(st, op.chunk, op.mb)
        elif op.kind == "W":
            with self._phase(op):
                WeightGradStore.pop()
        else:
            assert op.kind == "FB", op
            fwd = self._fetch_forward(st, op.chunk, op.mb)
            bwd = self._fetch_backward(st, op.chunk_b, op.mb_b)
            with self._phase(op):
                if self.overlapped_forward_backward:
                    m0 = self.module[op.chunk]
                    inputs0, criterion0, labels0 = fwd
                    loss1, outputs1, grads1 = bwd
                    out, loss = type(m0).overlapped_forward_backward(
                        m0, inputs0, criterion0, labels0, self.module[op.chunk_b], loss1, outputs1, grads1)
                    out = [out] if isinstance(out, torch.Tensor) else list(out)
                else:
                    out, loss = self._compute_forward(st, op.chunk, *fwd)
                    self._compute_backward(*bwd, zb=False)
            self._emit_forward(st, op.chunk, op.mb, out, loss)
            self._emit_backward(st, op.chunk_b, op.mb_b)

    def _fetch_forward(self, st: _StepState, m: int, mb: int):
        lk = self.links(m)
        if lk.prev is None:
            x = list(st.inputs_mb[mb])
        elif lk.prev[0] == self.rank:
            x = st.local_act.pop((m, mb))
        else:
            x = st.p2p.recv(("F", lk.prev, mb))
            if st.training:
                for t in x:
                    t.requires_grad_()
        if st.training:
            st.stage_inputs[(m, mb)] = x
        if lk.next is None and st.criterion is not None:
            return x, st.criterion, list(st.labels_mb[mb])
        return x, None, []

    def _compute_forward(self, st, m, x, criterion, labels):
        out = self.module[m](*x)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        loss = criterion(*out, *labels) if criterion is not None else None
        return out, loss

    def _emit_forward(self, st: _StepState, m: int, mb: int, out: list[torch.Tensor], loss) -> None:
        lk = self.links(m)
        if st.training:
            st.live += 1
            st.peak = max(st.peak, st.live)
        if lk.next is None:
            if loss is not None:
                st.losses[mb] = loss
            if st.return_outputs:
                st.outputs[mb] = [o.detach() for o in out]
            return
        if st.training:
            st.stage_outputs[(m, mb)] = out
        if lk.next[0] == self.rank:
            st.local_act[(lk.next[1], mb)] = [o.detach().requires_grad_(st.training) for o in out]
        else:
            self._check_sendable(m, out)
            st.p2p.send(("F", (self.rank, m), mb), out, free=st.training)

    def _check_sendable(self, m: int, out: list[torch.Tensor]) -> None:
        if len(out) != len(self._shapes):
            raise ValueError(f"stage (rank {self.rank}, module {m}) returned {len(out)} tensors, "
                             f"but the p2p shapes name {len(self._shapes)}: {self._shapes}")
        for i, (o, s) in enumerate(zip(out, self._shapes)):
            if not isinstance(o, torch.Tensor) or tuple(o.shape) != s or o.dtype != self._dtype:
                got = f"shape {tuple(o.shape)} of {o.dtype}" if isinstance(o, torch.Tensor) else type(o).__name__
                raise ValueError(f"stage (rank {self.rank}, module {m}) output {i} is {got}, but p2p tensors are "
                                 f"{s} of {self._dtype} (set_p2p_tensor_shapes / set_p2p_tensor_dtype)")
            if o._base is not None or not o.is_contiguous():
                raise ValueError(f"stage (rank {self.rank}, module {m}) output {i} is a view (or not contiguous); "
                                 f"pipeline stages must return tensors that own their storage, e.g. "
                                 f"`.clone()` / `.contiguous()` the result")

    def _fetch_backward(self, st: _StepState, m: int, mb: int):
        lk = self.links(m)
        if lk.next is None:
            return st.losses[mb], [], []
        outs = st.stage_outputs.pop((m, mb))
        if lk.next[0] == self.rank:
            grads = st.local_grad.pop((m, mb))
        else:
            grads = st.p2p.recv(("B", lk.next, mb))
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        return None, [o for o, _ in pairs], [g for _, g in pairs]

    def _compute_backward(self, loss, outs, grads, zb: bool) -> None:
        WeightGradStore.enabled = zb
        try:
            backward_chunk(loss, outs, grads)
        finally:
            WeightGradStore.enabled = False
        if zb:
            WeightGradStore.flush()

    def _emit_backward(self, st: _StepState, m: int, mb: int) -> None:
        st.live -= 1
        x = st.stage_inputs.pop((m, mb))
        lk = self.links(m)
        if lk.prev is None:
            return
        grads = [t.grad for t in x]
        if lk.prev[0] == self.rank:
            st.local_grad[(lk.prev[1], mb)] = grads
        else:
            grads = [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(x, grads)]
            st.p2p.send(("B", (self.rank, m), mb), grads, free=False)


class DualPipe(PipelineSchedule):
    """DeepSeek-V3's bidirectional pipeline (drop-in for ``dualpipe.DualPipe``), on any device and backend.

    ``modules = (stage r, stage R-1-r)`` of the model on pipeline rank r of R (R even). Half of the
    ``num_chunks`` micro-batches enter at rank 0 and run stages 0..R-1 through module 0 of each rank;
    the other half enter at rank R-1 and run through module 1 of ranks R-1..0. So:

    - ``inputs`` on rank 0 feed direction 0; ``inputs`` on rank R-1 feed direction 1;
    - ``labels`` and the loss on rank R-1 belong to rank 0's inputs, those on rank 0 to rank R-1's;
    - a stage's full gradient is the sum of module 0's on rank r and module 1's on rank R-1-r.

    ``num_chunks`` must be even and >= 2R. Bubble: (R/2-1)(F&B+B-3W), activations held: R+1 micro-batches.
    ``rank_mapping[group_rank]`` gives a group rank's pipeline rank. ``record=True`` keeps a
    ``PhaseRecord`` per op of the last step in ``records`` (on CUDA it synchronises around each op).
    """

    kind = "dualpipe"
    num_modules = 2


class DualPipeV(PipelineSchedule):
    """DualPipe "cut in half" (drop-in for ``dualpipe.DualPipeV``): 2R stages on R ranks, in a V.

    ``modules = (stage r, stage 2R-1-r)`` on pipeline rank r. Every micro-batch enters at rank 0, goes
    down module 0 of ranks 0..R-1, turns on rank R-1 and comes back up module 1 of ranks R-1..0; so
    ``inputs``, ``labels``, the loss and the outputs all live on rank 0. ``num_chunks >= 2R``. Any R >= 1.
    """

    kind = "dualpipev"
    num_modules = 2


class OneFOneB(PipelineSchedule):
    """The classic one-forward-one-backward schedule, with DualPipe's ``step`` API: the baseline.

    ``modules``: this rank's one stage (a module, or a 1-sequence). Inputs on rank 0; labels, loss and
    outputs on rank R-1. Bubble (R-1)(F+B); activations held on rank 0: R micro-batches.
    """

    kind = "1f1b"
    num_modules = 1
