"""``moekit.MoE``: the DeepSeek-V3 MoE block, expert-parallel over a process group and trainable.

Shape legend: T = tokens on this rank, H = hidden size, E = routed experts, K = experts per token,
R = EP size (ranks of ``group``), E_loc = E / R experts on each rank.

Data flow (see docs/moe.md): gate -> Buffer.dispatch -> local experts (grouped over contiguous
per-expert segments) -> Buffer.combine -> + shared experts. World size 1 runs no communication.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from .. import dist as mdist
from ..config import MoEConfig
from ..routing.balance import BiasUpdate, ExpertLoad, attach_aux_loss, sequence_aux_loss, update_bias
from ..routing.gate import Gate
from .experts import MLP, RoutedExperts

# moekit.ep is imported where it is used (a Buffer, R > 1; a fault; an FP8 round trip at R = 1), not here:
# importing any of it loads the Buffer, its transports and Triton (~0.2 s), which a world-size-1 layer
# never needs (`import moekit.moe` loads neither).
if TYPE_CHECKING:
    from ..ep.dispatcher import Dispatcher


def run_steps(steps: Iterator):
    """Run a ``forward_steps``-style generator to its end without overlapping anything; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


class MoE(nn.Module):
    """A DeepSeek-V3 MoE block (HF's ``DeepseekV3MoE``) with its routed experts sharded over ``group``.

    Rank r of ``group`` holds the routed experts ``[r*E/R, (r+1)*E/R)``; the gate and the shared experts
    are replicated (their gradients are per-rank partial sums: all-reduce them over the data-parallel
    ranks, e.g. with :func:`allreduce_replicated_grads`). Construction is collective when R > 1 (it
    creates the :class:`moekit.Buffer`, unless ``buffer`` passes one to share between layers).

    Args:
        config: the model's :class:`MoEConfig` (validated against the EP layout here).
        group: the EP process group; ``None`` = the default group, or no distribution at all.
        ranks_per_node: the node layout for node-limited routing and the Buffer (default: ``moekit.dist``'s).
        buffer: a :class:`moekit.ep.Dispatcher`: any object with moekit's ``dispatch``/``combine`` signature
            (e.g. ``moekit.ep.naive.NaiveBuffer``).
        device, dtype: of the parameters; the gate's bias is always fp32.
        router: a module to use instead of the DeepSeek-V3 :class:`Gate` (``x [T, H] -> GateOutput``, with an
            ``e_score_correction_bias`` ``[E]`` for balancing and a ``reset_parameters()``), e.g. a
            :class:`moekit.routing.routers.LogitsRouter` for the softmax families; it becomes ``self.gate``.
        timeout: seconds, the bound of every wait of the Buffer this layer creates (``moekit.Buffer``'s
            ``timeout``; default 300 s). Ignored when ``buffer`` is given.
        compute_dtype: dtype of the expert GEMMs (routed and shared), overriding ``config.compute_dtype``:
            e.g. fp32 parameters (master weights) with ``torch.bfloat16`` GEMMs. Routing is unchanged (fp32).

    Faults (docs/ep.md, "Faults"): with a ``moekit.Buffer``, an exception raised on one rank before the
    dispatch (the shape check, the gate) or between dispatch and combine (the experts) is reported
    through that call, so every rank raises the same error instead of its peers hanging; so is a
    ``load_state_dict`` whose shapes do not fit on one rank (R > 1: ``load_state_dict`` is collective).

    State-dict keys are HF's: ``gate.weight``, ``gate.e_score_correction_bias``,
    ``experts.{i}.{gate,up,down}_proj.weight`` (this rank's i only; :meth:`full_state_dict` gathers all),
    ``shared_experts.{gate,up,down}_proj.weight``. ``load_state_dict`` takes a full dict on every rank.
    """

    def __init__(self, config: MoEConfig, group: dist.ProcessGroup | None = None, *,
                 ranks_per_node: int | None = None, buffer: Dispatcher | None = None, device=None, dtype=None,
                 timeout: float | None = None, compute_dtype: torch.dtype | str | None = None,
                 router: nn.Module | None = None):
        super().__init__()
        if compute_dtype is not None:
            config = config.replace(compute_dtype=compute_dtype)
        self.config = config
        self.group = group
        self.ep_size, self.ep_rank = mdist.world_size(group), mdist.rank(group)
        node_layout = mdist.node_layout(group, ranks_per_node)
        config.check_ep(self.ep_size, node_layout.ranks_per_node)
        self.node_layout = node_layout
        e = config.n_routed_experts
        self.num_local_experts = e // self.ep_size
        self.expert_offset = self.ep_rank * self.num_local_experts
        self.gate = router if router is not None else Gate(config, num_nodes=node_layout.num_nodes, device=device,
                                                           dtype=dtype)
        self.experts = RoutedExperts(self.num_local_experts, self.expert_offset, config.hidden_size,
                                     config.moe_intermediate_size, config.expert_backend, device=device, dtype=dtype)
        self.shared_experts = (MLP(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size,
                                   device=device, dtype=dtype) if config.n_shared_experts > 0 else None)
        self.experts.compute_dtype = config.compute_dtype
        if self.shared_experts is not None:
            self.shared_experts.compute_dtype = config.compute_dtype
        self.load = ExpertLoad(e, device=device)
        self.aux_loss: torch.Tensor | None = None  # detached sequence aux loss of the latest training forward
        if buffer is None and self.ep_size > 1:
            from ..ep.buffer import Buffer  # (lazy: see the imports)

            buffer = Buffer(group, ranks_per_node=node_layout.ranks_per_node,
                            **({} if timeout is None else {"timeout": timeout}))
        self.buffer = buffer
        self.reset_parameters()
        if self.ep_size > 1:
            self.register_load_state_dict_pre_hook(_collective_load_check)

    @property
    def layout(self) -> mdist.NodeLayout:
        """The old name of :attr:`node_layout` (read-only), kept for code that reads it; "layout" otherwise
        means a dispatch layout (``Buffer.get_dispatch_layout``)."""
        return self.node_layout

    def reset_parameters(self) -> None:
        """Fresh weights from torch's default generator; every rank (and every EP size) gets the same model
        when seeded alike: the routed experts draw from per-expert generators (see ``RoutedExperts``)."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        self.experts.reset_parameters(seed)
        self.gate.reset_parameters()
        if self.shared_experts is not None:
            for lin in (self.shared_experts.gate_proj, self.shared_experts.up_proj, self.shared_experts.down_proj):
                lin.reset_parameters()

    @property
    def local_experts(self) -> range:
        """Global ids of the routed experts on this rank."""
        return range(self.expert_offset, self.expert_offset + self.num_local_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: ``[..., H]`` (``[B, S, H]`` makes the sequence aux loss per sequence of S tokens;
        ``[T, H]`` counts as one sequence). Returns the same shape and dtype.

        Host syncs: the Buffer's counts exchange when R > 1; one count of tokens per expert when R = 1.
        In training with ``seq_aux_loss_alpha > 0`` the aux loss is attached to the output's graph (it
        trains without being added to the user's loss) and kept detached in ``self.aux_loss``.
        """
        return run_steps(self.forward_steps(hidden_states, async_finish=False))

    def forward_steps(self, hidden_states: torch.Tensor, async_finish: bool = True, *,
                      dispatcher: Dispatcher | None = None) -> Iterator:
        """:meth:`forward` as a generator, for schedules that overlap communication with other work.

        With a Buffer and ``async_finish=True`` it yields the ``EventOverlap`` of the dispatch, then that
        of the combine, right after launching each; the caller may compute meanwhile and resumes it, and it
        waits for the event itself. Yields nothing at world size 1 or with ``async_finish=False``.
        ``dispatcher``: moves this forward's rows (and its backward's) instead of ``self.buffer``, which it
        must wrap (e.g. ``moekit.pipeline.MoEStage``'s, which overlaps the backward's transfers); ignored
        at world size 1. Returns (``StopIteration.value``) the output, identical to ``forward``'s.
        """
        shape = hidden_states.shape
        h = self.config.hidden_size
        try:
            if shape[-1] != h:
                raise _hidden_error(h, shape, self._guarded())
            x = hidden_states.reshape(-1, h)
            topk_idx, topk_weights, scores = self.gate(x)  # [T, K], [T, K], [T, E]
        except Exception as err:
            # The peers are in the dispatch: take part with this error, so every rank raises it.
            self._report(err, lambda failure: self.buffer.dispatch(failure, None, None, self.config.n_routed_experts))
        with torch.no_grad():
            self.load.record(topk_idx)
        fp8 = self.config.dispatch_fp8
        cap = self.low_latency_tokens
        if cap is not None and self._low_latency_ok():
            if x.shape[0] > cap:
                raise ValueError(f"MoE: {x.shape[0]} tokens exceed low_latency_tokens ({cap})")
            # Fixed capacity, no host sync (inference only: the low-latency calls are not differentiable).
            d = self.buffer.low_latency_dispatch(x, topk_idx, cap, self.config.n_routed_experts, use_fp8=False)
            expert_out = self.experts.forward_packed(d.recv_x)
            y = self.buffer.low_latency_combine(expert_out, topk_idx, topk_weights.float(), d.handle).combined_x
        elif self.buffer is None:
            # No wire at world size 1; with dispatch_fp8 the experts still see the FP8 round trip (same model
            # at any EP size), with a straight-through gradient as over the wire.
            xe = x + (_fp8_round_trip(x) - x).detach() if fp8 else x
            y = self.experts(xe, topk_idx, topk_weights)
        else:
            buf = self.buffer if dispatcher is None else dispatcher
            kw = dict(async_finish=True) if async_finish else {}
            # dispatch_fp8: the rows travel in FP8 and arrive dequantized to x's dtype, with a straight-through
            # gradient (the backward's combine in x's dtype), as DeepSeek-V3's FP8 dispatch (§3.3).
            d = buf.dispatch(x, topk_idx, topk_weights, self.config.n_routed_experts, fp8=fp8, dequantize=fp8, **kw)
            if async_finish:
                yield d.event
                d.event.wait()
            try:
                expert_out = self.experts(d.recv_x, d.recv_topk_idx, d.recv_topk_weights,
                                          list(d.num_recv_tokens_per_expert_list))
            except Exception as err:  # the peers are in the combine: raise this error everywhere
                self._report(err, lambda failure: buf.combine(failure, d.handle))
            y, event = buf.combine(expert_out, d.handle, **kw)
            if async_finish:
                yield event
                event.wait()
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        alpha = self.config.seq_aux_loss_alpha
        if self.training and alpha > 0 and torch.is_grad_enabled():
            seq_len = shape[-2] if len(shape) == 3 else None
            aux = sequence_aux_loss(scores, topk_idx, alpha, seq_len, norm=self.config.scoring_func == "sigmoid")
            self.aux_loss = aux.detach()
            y = attach_aux_loss(y, aux)
        return y.view(shape)

    low_latency_tokens: int | None = None
    """Decode steps (set by ``moekit.generate.greedy``): with a ``moekit.Buffer``, torch experts, no FP8
    dispatch and no autograd, forwards use ``Buffer.low_latency_dispatch/low_latency_combine`` with this
    capacity (tokens per rank per forward; more raises ``ValueError``). None (default): the normal dispatch."""

    def _low_latency_ok(self) -> bool:
        return (self._guarded() and isinstance(self.experts, RoutedExperts) and self.experts.backend == "torch"
                and not self.config.dispatch_fp8 and not torch.is_grad_enabled())

    def _guarded(self) -> bool:
        """Whether this layer's faults travel through its Buffer (a moekit.Buffer, R > 1)."""
        if self.buffer is None:
            return False
        from ..ep.buffer import Buffer  # (lazy: see the imports)

        return isinstance(self.buffer, Buffer)

    def _report(self, err: Exception, call: Callable) -> None:
        """Re-raise ``err``; with a Buffer first ``call(Failure(err))``: the collective the peers are in,
        which raises this rank's error on every rank (moekit.ep.guard)."""
        if not self._guarded():
            raise err
        from ..ep.guard import Failure  # (lazy: see the imports)

        call(Failure(err))
        raise AssertionError("unreachable: the collective raises this rank's error") from err

    @torch.no_grad()
    def update_bias(self) -> BiasUpdate:
        """Apply the aux-loss-free bias update from the loads since the previous one (collective over
        ``group``). For a whole model, :func:`update_moe_biases` does all layers in one all-reduce."""
        return update_bias([self.gate.e_score_correction_bias], [self.load.take_pending()],
                           self.config.bias_update_speed, self.group)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF-named state dict with *all* routed experts, on every rank (collective over ``group``:
        an all-gather of the stacked expert weights). Tensors are detached; experts come back on this
        rank's device."""
        gathered = {}
        for name in RoutedExperts._PROJ:
            local = getattr(self.experts, name).detach().contiguous()
            if self.ep_size > 1:
                parts = [torch.empty_like(local) for _ in range(self.ep_size)]
                dist.all_gather(parts, local, group=self.group)
                gathered[name] = torch.cat(parts)
            else:
                gathered[name] = local
        experts = {f"experts.{i}.{name}.weight": gathered[name][i]
                   for i in range(self.config.n_routed_experts) for name in RoutedExperts._PROJ}
        sd: dict[str, torch.Tensor] = {}
        for key, value in self.state_dict().items():  # module order, all experts where this rank's were
            if not key.startswith("experts."):
                sd[key] = value
            elif not experts.keys() <= sd.keys():
                sd.update(experts)
        return sd

    def extra_repr(self) -> str:
        r = self.local_experts
        return f"ep={self.ep_rank}/{self.ep_size}, local_experts=[{r.start}, {r.stop})"


def _hidden_error(h: int, shape, collective: bool) -> Exception:
    if collective:
        from ..ep.errors import Code, InputError  # (lazy: see the imports)

        return InputError(Code.LAYER_HIDDEN, h, shape[-1] if len(shape) else 0, len(shape))
    return ValueError(f"MoE: hidden_states must end in hidden_size ({h}), got {list(shape)}")


def _collective_load_check(module: MoE, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """Before loading (R > 1): every rank checks the shapes of this layer's keys in ``state_dict``, and all
    agree over the Buffer, so a mismatch on one rank raises the same error on every rank (instead of one
    rank failing and its peers waiting for it in the next forward)."""
    error = None
    for name, t in module.state_dict(keep_vars=True).items():
        got = state_dict.get(prefix + name)
        if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(t.shape):
            error = ValueError(f"size mismatch for {prefix}{name}: copying a param with shape {list(got.shape)}, "
                               f"the shape in the current model is {list(t.shape)}")
            break
    if module._guarded():
        module.buffer.agree(error, "MoE.load_state_dict")
    elif error is not None:
        raise error


def _fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """What an FP8 dispatch delivers: ``x`` quantized per 1x128 tile (power-of-two scales) and back."""
    from ..ep.fp8 import dequantize_1x128, quantize_1x128  # (lazy: see the imports)

    return dequantize_1x128(*quantize_1x128(x.detach())).to(x.dtype)


def moe_layers(model: nn.Module) -> list[MoE]:
    """The :class:`MoE` modules of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_moe_biases(model: nn.Module) -> BiasUpdate:
    """Aux-loss-free bias update of every MoE layer of ``model``, one all-reduce for all of them.

    Call it after each optimizer step, on every rank. All layers must share one EP group and gamma.
    Returns the global ``[layers, E]`` load of the period and its max/mean per layer.
    """
    layers = moe_layers(model)
    if not layers:
        return BiasUpdate(torch.zeros(0, 0, dtype=torch.int64), [])
    groups = {id(m.group) for m in layers}
    gammas = {m.config.bias_update_speed for m in layers}
    if len(groups) != 1 or len(gammas) != 1:
        raise ValueError(f"update_moe_biases: layers use {len(groups)} EP groups and gammas {sorted(gammas)}; "
                         f"call MoE.update_bias per layer instead")
    return update_bias([m.gate.e_score_correction_bias for m in layers], [m.load.take_pending() for m in layers],
                       layers[0].config.bias_update_speed, layers[0].group)


def is_expert_param(p: torch.Tensor) -> bool:
    """True for the sharded routed-expert parameters (``RoutedExperts``), False for replicated ones."""
    return bool(getattr(p, "moekit_expert", False))


@torch.no_grad()
def sync_grads(params: Iterable[torch.Tensor] | nn.Module, group: dist.ProcessGroup | None = None,
               average: bool = False) -> None:
    """Turn each rank's gradients into the gradients of the global loss, with EP over data-parallel ranks.

    The replicated parameters (gate, shared experts, attention, ...) only saw this rank's tokens: their
    gradients are summed over ``group`` (one flat all-reduce). The routed experts' gradients already
    cover every rank's tokens (through combine/dispatch) and are not communicated. With ``average=True``
    the global loss is the *mean* of the ranks' losses (as DDP assumes): replicated gradients are
    averaged and expert gradients divided by the group size. Collective over ``group``; no-op at size 1.
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    params = [p for p in params if p.grad is not None]
    world = mdist.world_size(group)
    if world == 1:
        return
    grads = [p.grad for p in params if not is_expert_param(p)]
    if grads:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=group)
        if average:
            flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    if average:
        for p in params:
            if is_expert_param(p):
                p.grad.div_(world)
