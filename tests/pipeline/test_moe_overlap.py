"""MoE-aware F&B overlap: DualPipe over MoE stages with expert parallelism, overlapped vs not.

4 gloo ranks = 2 pipelines (PP=2) x EP=2: ranks {0,1} and {2,3} are pipelines, {0,2} and {1,3} the EP
groups of the two stages. The same DualPipe step runs twice, with the MoE-aware hook and with plain
F-then-B pairs (the engine path checked against a sequential reference in test_pipelines.py): losses,
outputs and gradients must be bitwise equal, and the recorded timeline must show a backward piece
running while a dispatch/combine is in flight.
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from moekit import MoEConfig
from moekit.moe import MoE
from moekit.pipeline import DualPipe, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from moekit.pipeline.moe_overlap import MoEBlock, MoEStage
from moekit.testing import spawn

CFG = dict(hidden_size=8, moe_intermediate_size=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
           n_group=1, topk_group=1)
TOKENS = 4  # per micro-batch
CHUNKS = 8


def _stage(stage_id, ep_group, rank, chunk, record):
    torch.manual_seed(100 + stage_id)  # both EP replicas of a stage draw the same weights
    cfg = MoEConfig(**CFG)
    blocks = [MoEBlock(MoE(cfg, group=ep_group)) for _ in range(2)]
    return MoEStage(blocks, record=record, rank=rank, chunk=chunk)


def _rank(rank, world):
    pipes = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    eps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pp_group, ep_group = pipes[rank // 2], eps[rank % 2]
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
        pipe.overlapped_forward_backward = overlap  # the plain run: F then B for every pair
        loss, _ = pipe.step(x.tensor_split(2)[pp_rank], num_chunks=CHUNKS,
                            criterion=lambda o, t: ((o - t) ** 2).mean(), labels=(y.tensor_split(2)[1 - pp_rank],))
        with torch.no_grad():
            _, outs = pipe.step(x.tensor_split(2)[pp_rank], num_chunks=CHUNKS, return_outputs=True)
        out[overlap] = dict(loss=loss, outs=outs, grads={n: p.grad.clone() for n, p in pipe.named_parameters()},
                            records=mods[0].overlap_records + mods[1].overlap_records)
    # the generator form of the MoE forward is the MoE forward
    m = mods[0].blocks[0].moe
    h = torch.randn(TOKENS, CFG["hidden_size"], generator=torch.Generator().manual_seed(5))
    steps = m.forward_steps(h)
    events = 0
    try:
        while True:
            next(steps)
            events += 1
    except StopIteration as stop:
        split = stop.value
    out["split_equal"] = torch.equal(split, m(h)) and events == 2
    return out


def test_moe_overlap_matches_plain_pairs_and_overlaps():
    res = spawn(_rank, 4, timeout=240)
    for rank, r in enumerate(res):
        a, b = r[True], r[False]
        assert r["split_equal"]
        assert torch.equal(a["loss"], b["loss"]), rank
        assert torch.equal(a["outs"], b["outs"])
        assert a["grads"].keys() == b["grads"].keys()
        for n in a["grads"]:
            assert torch.equal(a["grads"][n], b["grads"][n]), (rank, n)
        assert not b["records"]
        recs = a["records"]
        comm = [c for c in recs if c.phase == "COMM"]
        pieces = [c for c in recs if c.phase == "B"]
        assert comm and pieces and all(c.rank == rank for c in recs)
        # non-loss stages run their backward in 4 pieces (2 blocks x MoE half, dense half)
        per_mb = collections.Counter((p.chunk, p.microbatch) for p in pieces)
        assert max(per_mb.values()) == 4
        # a backward piece ran entirely while a transfer of the other micro-batch was in flight
        assert any(c.start <= p.start and p.end <= c.end for c in comm for p in pieces)
