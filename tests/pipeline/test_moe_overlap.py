"""MoE-aware F&B overlap: DualPipe over MoE stages with expert parallelism, overlapped vs moekit.MoE's autograd.

4 gloo ranks = 2 pipelines (PP=2) x EP=2: ranks {0,1} and {2,3} are pipelines, {0,2} and {1,3} the EP
groups of the two stages. The same DualPipe step runs over MoEStages with the MoE-aware hook (all four
transfers per MoE layer overlapped) and over plain stages of the same blocks (``MoEBlock.forward``,
i.e. ``moekit.MoE`` with the Buffer's own autograd, F then B for every pair; that engine path is checked
against a sequential reference in test_pipelines.py): losses, outputs and every gradient (the gate's
included, which is where topk_weights' gradient goes) must be bitwise equal, and the recorded timeline
must show backward pieces inside the forward's transfers and forward pieces inside the backward's.

The layer-level check runs ``MoE.forward_steps`` with the stage's ``OverlapDispatcher`` outside any F&B
pair (synchronous transfers) against ``MoE.forward`` + backward: fp32, bf16, fp16, FP8 dispatch, uneven
and empty ranks; both backward transfers go through the hook in every case. Also: errors inside a pair,
EP size 1.
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit import MoEConfig
from moekit.moe import MoE
from moekit.pipeline import DualPipe, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from moekit.pipeline.moe_overlap import FBCoroutine, MoEBlock, MoEStage, OverlapDispatcher
from moekit.testing import spawn

CFG = dict(hidden_size=8, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
           n_group=1, topk_group=1)
TOKENS = 4  # per micro-batch
CHUNKS = 8


class _PlainStage(nn.Module):
    """The reference: the same blocks, run by their plain forward (the Buffer's own autograd)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def _stage(stage_id, ep_group, rank, chunk, overlap):
    torch.manual_seed(100 + stage_id)  # both EP replicas of a stage draw the same weights
    cfg = MoEConfig(**CFG, seq_aux_loss_alpha=0.01)
    blocks = [MoEBlock(MoE(cfg, group=ep_group)) for _ in range(2)]
    for b in blocks:
        b.train()
    return MoEStage(blocks, record=True, rank=rank, chunk=chunk) if overlap else _PlainStage(blocks)


def _pipeline(rank, pp_group, ep_group):
    pp_rank = rank % 2
    set_p2p_tensor_shapes([(TOKENS, CFG["hidden_size"])])
    set_p2p_tensor_dtype(torch.float32)
    g = torch.Generator().manual_seed(rank // 2)  # each pipeline its own data
    x = torch.randn(CHUNKS * TOKENS, CFG["hidden_size"], generator=g)
    y = torch.randn(CHUNKS * TOKENS, CFG["hidden_size"], generator=g)
    out = {}
    for overlap in (True, False):
        mods = [_stage(pp_rank, ep_group, rank, 0, overlap), _stage(1 - pp_rank, ep_group, rank, 1, overlap)]
        pipe = DualPipe(mods, process_group=pp_group)
        assert pipe.overlapped_forward_backward == overlap
        loss, _ = pipe.step(x.tensor_split(2)[pp_rank], num_chunks=CHUNKS,
                            criterion=lambda o, t: ((o - t) ** 2).mean(), labels=(y.tensor_split(2)[1 - pp_rank],))
        with torch.no_grad():
            _, outs = pipe.step(x.tensor_split(2)[pp_rank], num_chunks=CHUNKS, return_outputs=True)
        out[overlap] = dict(loss=loss, outs=outs, grads={n: p.grad.clone() for n, p in pipe.named_parameters()},
                            records=(mods[0].overlap_records + mods[1].overlap_records) if overlap else [])
    return out


def _layer_cases(rank, ep_group):
    """MoE.forward_steps through the stage's dispatcher (synchronous) against MoE.forward, backward included."""
    res = []
    # hidden, dtype, FP8 dispatch, tokens per EP rank (0: an empty rank).
    cases = [(8, torch.float32, False, [5, 0]), (8, torch.float32, False, [0, 0]),
             (8, torch.bfloat16, False, [3, 6]), (8, torch.float16, False, [2, 3]), (128, torch.float32, True, [3, 6])]
    for hidden, dtype, fp8, tokens in cases:
        cfg = MoEConfig(**{**CFG, "hidden_size": hidden}, dispatch_fp8=fp8)
        torch.manual_seed(7)
        moe = MoE(cfg, group=ep_group, dtype=dtype)
        t = tokens[dist.get_rank(ep_group)]
        gen = torch.Generator().manual_seed(11 + rank)
        x = torch.randn(t, hidden, generator=gen).to(dtype)
        gy = torch.randn(t, hidden, generator=gen).to(dtype)
        coroutine, hooked = FBCoroutine(lambda *_: None), []

        def hook(launch, coroutine=coroutine, hooked=hooked):
            hooked.append(launch)
            coroutine.transfer(launch)

        grads = []
        for split in (False, True):
            xi = x.clone().requires_grad_()
            if split:
                steps = moe.forward_steps(xi, dispatcher=OverlapDispatcher(moe.buffer, hook))
                n = 0
                while True:
                    try:
                        next(steps).wait()
                        n += 1
                    except StopIteration as stop:
                        yo = stop.value
                        break
            else:
                yo = moe(xi)
            moe.zero_grad(set_to_none=True)
            yo.backward(gy)
            grads.append([yo.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters() if p.grad is not None])
        a, b = grads
        # output, input gradient, gate + 3 routed + 3 shared expert weights
        res.append((n, len(a), len(b), [torch.equal(u, v) for u, v in zip(a, b)], len(hooked)))
    return res


def _errors(rank, ep_group):
    """A failing backward or forward inside a pair raises on the calling thread; the next pair still runs."""
    m0, m1 = _stage(0, ep_group, rank, 0, True), _stage(1, ep_group, rank, 1, True)
    x = torch.randn(TOKENS, CFG["hidden_size"])
    out1 = m1(x.clone().requires_grad_())
    errors = []
    for bad in ("backward", "forward"):
        inputs0 = [x] if bad == "backward" else [torch.randn(TOKENS, CFG["hidden_size"] + 1)]
        grads1 = [torch.ones(TOKENS + 1, CFG["hidden_size"])] if bad == "backward" else [torch.ones_like(out1)]
        try:
            MoEStage.overlapped_forward_backward(m0, inputs0, None, [], m1, None, [out1], grads1)
        except RuntimeError as err:  # autograd's shape mismatch / the matmul's
            errors.append(type(err).__name__)
        if bad == "backward":
            out1 = m1(x.clone().requires_grad_())  # a fresh graph for the pairs that follow
    out0, _ = MoEStage.overlapped_forward_backward(m0, [x], None, [], m1, None, [out1], [torch.ones_like(out1)])
    return errors, out0[0].shape == x.shape


def _solo(rank, group):
    """EP size 1 (no Buffer, no transfers): a pair is the forward, then the whole backward."""
    res = []
    x = torch.randn(TOKENS, CFG["hidden_size"], generator=torch.Generator().manual_seed(rank))
    for overlap in (True, False):
        m0, m1 = _stage(0, group, rank, 0, True), _stage(1, group, rank, 1, True)
        out1 = m1(x.clone().requires_grad_())
        g = torch.ones_like(out1)
        if overlap:
            (out0,), _ = MoEStage.overlapped_forward_backward(m0, [x], None, [], m1, None, [out1], [g])
            pieces = [r.phase for r in m0.overlap_records + m1.overlap_records]
        else:
            out0 = m0(x)
            out1.backward(g)
        res.append([out0] + [p.grad for p in m1.parameters() if p.grad is not None])
    return len(res[0]) > 1 and all(torch.equal(a, b) for a, b in zip(*res)), pieces


def _rank(rank, world):
    pipes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    eps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    # All groups first: a rank that is done may take the store (on rank 0) down with it.
    solos = [dist.new_group([k]) for k in range(world)]
    out = _pipeline(rank, pipes[rank // 2], eps[rank % 2])
    out["layer"] = _layer_cases(rank, eps[rank % 2])
    out["errors"] = _errors(rank, eps[rank % 2])
    out["solo"] = _solo(rank, solos[rank])
    return out


def _inside(inner, outer) -> bool:
    return outer.start <= inner.start and inner.end <= outer.end


def test_moe_overlap_matches_moe_autograd_and_overlaps_both_directions():
    res = spawn(_rank, 4, timeout=240)
    for rank, r in enumerate(res):
        for (n, la, lb, same, hooked), case in zip(r["layer"], ("fp32", "fp32 empty", "bf16", "fp16", "fp8")):
            assert n == 2 and la == lb == 9 and all(same), (rank, case, same)
            assert hooked == 2, (case, hooked)  # the backward's combine and dispatch, whatever the dtype
        assert r["errors"] == (["RuntimeError", "RuntimeError"], True), r["errors"]
        assert r["solo"] == (True, ["F", "B"]), r["solo"]
        a, b = r[True], r[False]
        assert torch.equal(a["loss"], b["loss"]), rank
        assert torch.equal(a["outs"], b["outs"])
        assert a["grads"].keys() == b["grads"].keys()
        assert any("gate.weight" in n for n in a["grads"])
        for n in a["grads"]:
            assert torch.equal(a["grads"][n], b["grads"][n]), (rank, n)
        recs = a["records"]
        assert recs and all(c.rank == rank for c in recs)
        fwd_comm = [c for c in recs if c.phase == "COMM" and c.chunk_b is None]
        bwd_comm = [c for c in recs if c.phase == "COMM" and c.chunk_b is not None]
        f_pieces = [c for c in recs if c.phase == "F"]
        b_pieces = [c for c in recs if c.phase == "B"]
        # 2 MoE blocks: 4 forward transfers per overlapped forward, 4 backward transfers per overlapped
        # backward (every stage, the loss stages too), so 5 backward pieces
        per = collections.Counter((c.chunk, c.microbatch) for c in fwd_comm)
        assert set(per.values()) == {4}, per
        per = collections.Counter((c.chunk, c.microbatch) for c in bwd_comm)
        assert set(per.values()) == {4}, per
        assert max(collections.Counter((p.chunk, p.microbatch) for p in b_pieces).values()) == 5
        # both directions hidden: a backward piece ran entirely while a forward transfer of another
        # micro-batch was in flight, and a forward piece while a backward transfer was
        assert any(_inside(p, c) for c in fwd_comm for p in b_pieces
                   if (p.chunk, p.microbatch) != (c.chunk, c.microbatch))
        assert any(_inside(p, c) for c in bwd_comm for p in f_pieces
                   if (p.chunk, p.microbatch) != (c.chunk, c.microbatch))
