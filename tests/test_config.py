import pytest

from moekit import MoEConfig


def test_presets():
    v3 = MoEConfig.preset("deepseek-v3")
    assert (v3.hidden_size, v3.moe_intermediate_size, v3.n_routed_experts, v3.n_shared_experts) == (7168, 2048, 256, 1)
    assert (v3.num_experts_per_tok, v3.n_group, v3.topk_group, v3.routed_scaling_factor) == (8, 8, 4, 2.5)
    tiny = MoEConfig.preset("tiny")
    assert tiny.n_routed_experts % tiny.n_group == 0
    with pytest.raises(ValueError, match="unknown MoEConfig preset"):
        MoEConfig.preset("nope")


def test_from_hf_ignores_unknown_and_takes_overrides():
    cfg = MoEConfig.from_hf({"hidden_size": 128, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                             "num_experts_per_tok": 4, "model_type": "deepseek_v3"}, max_nodes_per_token=2)
    assert cfg.hidden_size == 128 and cfg.max_nodes_per_token == 2

    class Obj:
        def __init__(self):
            self.hidden_size = 256
            self.unknown = 1

    assert MoEConfig.from_hf(Obj()).hidden_size == 256


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
    (dict(topk_group=9), "topk_group"),
    (dict(num_experts_per_tok=200, topk_group=4), "num_experts_per_tok"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(expert_backend="cuda"), "expert_backend"),
    (dict(max_nodes_per_token=0), "max_nodes_per_token"),
])
def test_invalid_combinations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kwargs)


def test_check_ep():
    cfg = MoEConfig.preset("tiny")
    cfg.check_ep(4)
    with pytest.raises(ValueError, match="EP size"):
        cfg.check_ep(3)


def test_check_ep_node_limited_routing():
    cfg = MoEConfig(hidden_size=16, n_routed_experts=32, n_group=4, topk_group=3, num_experts_per_tok=6,
                    max_nodes_per_token=3)
    cfg.check_ep(8, 1)  # 8 nodes of 4 experts inside groups of 8: 3 groups -> 3 of 6 nodes -> 12 experts
    assert cfg.routing_limits(8) == [(4, 3), (8, 3)]
    assert cfg.guaranteed_candidates(8) == 12
    cfg.check_ep(8, 8)  # one node: the node limit is off
    assert cfg.routing_limits(1) == [(4, 3)]
    # Same partition for groups and nodes: the tighter limit.
    assert cfg.replace(max_nodes_per_token=2).routing_limits(4) == [(4, 2)]
    assert cfg.replace(max_nodes_per_token=2).guaranteed_candidates(4) == 16
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        cfg.replace(max_nodes_per_token=1).check_ep(8, 1)  # one node of 4 experts < 6
    with pytest.raises(ValueError, match="max_nodes_per_token"):
        MoEConfig(hidden_size=16, n_routed_experts=24, n_group=4, topk_group=2, num_experts_per_tok=4,
                  max_nodes_per_token=1).check_ep(3, 1)  # groups of 6 vs nodes of 8 straddle
    with pytest.raises(ValueError, match="ranks_per_node"):
        cfg.check_ep(8, 3)


def test_fp8_backend_needs_128_multiples():
    with pytest.raises(ValueError, match="hidden_size"):
        MoEConfig.preset("tiny", expert_backend="fp8")
    MoEConfig.preset("tiny", hidden_size=128, moe_intermediate_size=128, expert_backend="fp8")
