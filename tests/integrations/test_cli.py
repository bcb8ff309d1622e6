"""``python -m moekit.generate`` and ``python -m moekit.train`` on 2 gloo ranks with tiny random checkpoints."""

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moekit.testing import spawn  # noqa: E402

from . import hf_models  # noqa: E402


def _generate(rank, world, path):
    from moekit import generate

    res = generate.main(["--model", path, "--prompt-ids", "3 1 4 1 5", "--prompt-ids", "9 2 6 5 3",
                         "--max-new-tokens", "5"])
    return res.tokens


def _train(rank, world, path, data, out):
    from moekit import train

    res = train.main(["--model", path, "--data", data, "--steps", "4", "--batch-size", "2", "--seq-len", "16",
                      "--lr", "3e-3", "--out", out])
    return res.losses, res.plot


def test_generate_cli_matches_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    path = hf_models.write("qwen3_moe", str(tmp_path), seed=5)
    got = spawn(_generate, 2, path, timeout=120)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    want = ref.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


def test_train_cli_balances_and_plots(tmp_path):
    path = hf_models.write("deepseek_v3", str(tmp_path), seed=6)
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = str(tmp_path / "report")
    (l0, plot0), (l1, plot1) = spawn(_train, 2, path, str(data), out, timeout=120)
    assert l0 == l1 and len(l0) == 4  # the mean over ranks, the same on both
    assert all(torch.isfinite(torch.tensor(l0)))
    assert l0[-1] < l0[0]  # 4 Adam steps on a repetitive text lower the loss
    assert plot1 is None and plot0 == os.path.join(out, "loss.png") and os.path.getsize(plot0) > 1000
