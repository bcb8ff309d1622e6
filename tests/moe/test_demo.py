"""The demo's pieces (data, model) and a short end-to-end run on 4 gloo ranks."""

import json

import torch

from moekit import MoEConfig
from moekit.demo import DEMO_CONFIG, MarkovLanguages, main
from moekit.moe import moe_layers
from moekit.moe.model import TinyDeepSeek


def test_markov_languages_follow_their_chains():
    data = MarkovLanguages(vocab=32, languages=3, seed=0)
    seq = data.batch(5, 20, torch.Generator().manual_seed(1))
    assert seq.shape == (5, 21)
    assert (seq[:, 0] < 3).all() and (seq[:, 1:] >= 3).all()
    for row in seq.tolist():
        lang = row[0]
        for a, b in zip(row[1:], row[2:]):
            assert b in data.succ[lang, a].tolist()
    again = MarkovLanguages(vocab=32, languages=3, seed=0)
    assert torch.equal(again.succ, data.succ)


def test_tiny_deepseek_layout():
    cfg = MoEConfig(**DEMO_CONFIG)
    model = TinyDeepSeek(cfg)
    assert len(moe_layers(model)) == cfg.num_hidden_layers - cfg.first_k_dense_replace
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, cfg.vocab_size)
    # Causal: the first position's logits do not depend on later tokens.
    ids2 = ids.clone()
    ids2[:, 3:] = (ids2[:, 3:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(ids2)[:, :3], logits[:, :3])


def test_demo_end_to_end_short(tmp_path):
    rc = main(["--steps", "3", "--no-progress", "--batch", "2", "--seq-len", "16", "--out", str(tmp_path)])
    assert rc in (0, 1)  # 3 steps are too few to require the loss to fall
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "expert_load.png").stat().st_size > 0
    assert s["dispatch_check"]["ok"] and s["world"] == 4 and len(s["history"]["loss"]) == 3
    assert all(p["inter_node_bytes"] > 0 and p["intra_node_bytes"] > 0 for p in s["per_rank"])
    assert s["loss_first"] > 0 and len(s["history"]["load"][0]) == 2  # two MoE layers
    # Every routed (token, expert) pair was counted once per MoE layer per step.
    k = DEMO_CONFIG["num_experts_per_tok"]
    assert all(sum(layer) == 4 * 2 * 16 * k for layer in s["history"]["load"][0])


def test_demo_exit_code_needs_loss_fall_and_imbalance_shrink(monkeypatch, tmp_path):
    import moekit.demo as demo

    base = dict(dispatch_check={"ok": True}, loss_first5=4.0, loss_last5=1.0, imbalance_first5=2.0,
                imbalance_last5=1.2)
    monkeypatch.setattr(demo, "write_report", lambda summary, out: [])
    monkeypatch.setattr(demo, "print_report", lambda summary, files: None)
    for change, rc in [({}, 0), ({"imbalance_last5": 2.5}, 1), ({"loss_last5": 3.0}, 1),
                       ({"dispatch_check": {"ok": False}}, 1)]:
        monkeypatch.setattr(demo, "summarize", lambda results, opts, c=change: {**base, **c})
        assert demo._finish([], {"out": str(tmp_path)}) == rc, change
