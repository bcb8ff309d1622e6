"""``moekit.MoE`` with EP over 2, 4 and 8 gloo ranks against the same layer at world size 1.

Each rank takes its slice of one global batch; the parent runs the world-size-1 layer (itself checked
against the plain float64 block in test_layer.py) on the whole batch. Semantics compared (see
``sync_grads(average=True)``): the global loss is the mean of the ranks' losses.
"""

import pytest
import torch
import torch.distributed as dist

from moekit import MoEConfig
from moekit.moe import MoE, sync_grads, update_moe_biases
from moekit.testing import spawn

EXPERT_KEYS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")


def _ep_rank(rank, world, cases):
    out = []
    for case in cases:
        moe = MoE(case["cfg"], ranks_per_node=case["rpn"])
        moe.load_state_dict(case["sd"])
        moe.train()
        lo, hi = case["bounds"][rank], case["bounds"][rank + 1]
        x = case["x"][lo:hi].clone().requires_grad_()
        y = moe(x)
        (y * case["g"][lo:hi]).sum().backward()
        sync_grads(moe, average=True)
        full = moe.full_state_dict()  # (before the bias moves)
        full_bad = [k for k, v in case["sd"].items() if k not in full or not torch.equal(full[k], v)]
        full_bad += sorted(full.keys() - case["sd"].keys())
        upd = update_moe_biases(moe)
        res = dict(y=y.detach(), x_grad=x.grad, load=upd.load, bias=moe.gate.e_score_correction_bias.clone(),
                   grads={n: p.grad.clone() for n, p in moe.named_parameters()}, local=list(moe.local_experts),
                   full_bad=full_bad,
                   nodes_used=int(max((len({int(e) // (case["cfg"].n_routed_experts // moe.node_layout.num_nodes)
                                             for e in row}) for row in moe.gate(x.detach().view(-1, x.shape[-1]))
                                       .topk_idx.tolist()), default=0)))
        dist.barrier()
        out.append(res)
    return out


def make_case(cfg, world, rpn, bounds, seq_len=None, bias_skew=False, seed=0):
    """A global batch: [B, S, H] split by sequences (seq_len given) or [T, H] split at ``bounds``."""
    torch.manual_seed(seed)
    ref = MoE(cfg)
    if bias_skew:  # nearly every token to experts 0-3: empty experts and idle ranks
        with torch.no_grad():
            ref.gate.e_score_correction_bias[:4] = 5.0
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    h = cfg.hidden_size
    if seq_len is not None:
        x = torch.randn(bounds[-1], seq_len, h)
    else:
        x = torch.randn(bounds[-1], h)
    g = torch.randn_like(x)
    return dict(cfg=cfg, rpn=rpn, sd=sd, x=x, g=g, bounds=bounds, world=world)


def reference(case):
    """World size 1 on the whole batch: loss sum(y*g)/R (+ the aux loss, attached by the layer)."""
    cfg, world = case["cfg"], case["world"]
    moe = MoE(cfg)
    nodes = world // (case["rpn"] or world)
    moe.gate.num_nodes = nodes  # same node blocks as the EP layout
    moe.load_state_dict(case["sd"])
    moe.train()
    x = case["x"].clone().requires_grad_()
    y = moe(x)
    (y * case["g"]).sum().div(world).backward()
    upd = update_moe_biases(moe)
    return dict(y=y.detach(), x_grad=x.grad * world, load=upd.load, bias=moe.gate.e_score_correction_bias.clone(),
                grads={n: p.grad for n, p in moe.named_parameters()})


def check(case, results):
    ref = reference(case)
    b = case["bounds"]
    tol = dict(rtol=1e-5, atol=1e-5)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["y"], ref["y"][b[r]:b[r + 1]], **tol)
        torch.testing.assert_close(res["x_grad"], ref["x_grad"][b[r]:b[r + 1]], **tol)
        for name, grad in res["grads"].items():
            want = ref["grads"][name]
            if name in EXPERT_KEYS:
                want = want[res["local"][0]:res["local"][-1] + 1]
            torch.testing.assert_close(grad, want, **tol, msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")
        assert torch.equal(res["load"], ref["load"])
        assert torch.equal(res["bias"], results[0]["bias"])  # bit-identical everywhere
        torch.testing.assert_close(res["bias"], ref["bias"])
        assert res["full_bad"] == []
        m = case["cfg"].max_nodes_per_token
        if m is not None:
            assert res["nodes_used"] <= m


TINY = MoEConfig.preset("tiny", seq_aux_loss_alpha=0.01, bias_update_speed=0.01)
# 32 experts in 8 groups of 4; EP4 over 4 nodes of 8 experts: nodes limit first, then groups.
NODES_COARSE = MoEConfig.preset("tiny", n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6,
                                max_nodes_per_token=2, seq_aux_loss_alpha=0.0)
# 32 experts in 4 groups of 8; EP8 over 8 nodes of 4 experts: groups first, then nodes.
GROUPS_COARSE = MoEConfig.preset("tiny", n_routed_experts=32, n_group=4, topk_group=3, num_experts_per_tok=6,
                                 max_nodes_per_token=3, seq_aux_loss_alpha=0.0)

# Dispatch in FP8 (straight-through backward) against world size 1's local FP8 round trip.
FP8_WIRE = MoEConfig.preset("tiny", hidden_size=128, dispatch_fp8=True, seq_aux_loss_alpha=0.0)


def random_cases(world, seed, n=2):
    """Fresh random variants: scoring, normalisation, shared experts (0-2), top-k, uneven splits with empty ranks."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(n):
        pick = lambda *opts: opts[int(torch.randint(len(opts), (1,), generator=g))]  # noqa: B023
        cfg = MoEConfig.preset("tiny", scoring_func=pick("sigmoid", "softmax"), norm_topk_prob=pick(True, False),
                               n_shared_experts=pick(0, 1, 2), num_experts_per_tok=pick(1, 3, 4),
                               routed_scaling_factor=pick(1.0, 2.5), seq_aux_loss_alpha=0.0)
        sizes = torch.randint(0, 9, (world,), generator=g)
        sizes[int(torch.randint(world, (1,), generator=g))] = 0  # at least one rank without tokens
        bounds = [0] + torch.cumsum(sizes, 0).tolist()
        cases.append(make_case(cfg, world, pick(None, 1), bounds, seed=seed * 10 + i))
    return cases


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ep_matches_world1(world):
    if world == 2:
        cases = [make_case(TINY, 2, None, [0, 2, 4], seq_len=6, seed=1),
                 make_case(TINY.replace(seq_aux_loss_alpha=0.0), 2, None, [0, 0, 9], bias_skew=True, seed=2),
                 make_case(FP8_WIRE, 2, None, [0, 7, 19], seed=7)]
    elif world == 4:
        cases = [make_case(NODES_COARSE, 4, 1, [0, 5, 5, 22, 31], seed=3),
                 make_case(TINY, 4, 2, [0, 1, 2, 3, 4], seq_len=5, seed=4),
                 make_case(FP8_WIRE, 4, 2, [0, 6, 6, 13, 30], seed=8)]
    else:
        cases = [make_case(GROUPS_COARSE, 8, 1, [0, 3, 9, 9, 15, 16, 24, 30, 33], seed=5),
                 make_case(TINY.replace(max_nodes_per_token=1, seq_aux_loss_alpha=0.0), 8, 2,
                           [0, 4, 8, 12, 16, 20, 24, 28, 32], bias_skew=True, seed=6)]
    cases += random_cases(world, seed=world)
    per_rank = spawn(_ep_rank, world, cases, ranks_per_node=None)
    for i, case in enumerate(cases):
        check(case, [per_rank[r][i] for r in range(world)])


def _steps_rank(rank, world):
    cfg = MoEConfig.preset("tiny", seq_aux_loss_alpha=0.01)
    torch.manual_seed(0)
    moe = MoE(cfg)
    torch.manual_seed(1 + rank)
    x = torch.randn(2, 5, cfg.hidden_size)
    moe.train()
    y = moe(x)
    steps = moe.forward_steps(x)
    events = []
    while True:
        try:
            events.append(next(steps))
        except StopIteration as stop:
            y2 = stop.value
            break
    return torch.equal(y, y2), len(events), all(hasattr(e, "wait") for e in events)


def test_forward_steps_yields_dispatch_and_combine():
    for same, n_events, waitable in spawn(_steps_rank, 2):
        assert same and n_events == 2 and waitable
