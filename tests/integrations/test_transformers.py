"""moekit.integrations.transformers against transformers' own models: tiny random checkpoints of each supported
architecture, loaded expert-parallel on 1, 2 and 4 gloo ranks, must give HF's logits, greedy tokens, loss and
gradients, with 1/R of the experts resident per rank."""

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moekit.testing import spawn  # noqa: E402

from . import hf_models  # noqa: E402
from .hf_models import ARCHS, V  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: only the order of the experts' sums differs from HF's


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    dirs = {a: hf_models.write(a, root, seed=i) for i, a in enumerate(ARCHS)}
    dirs["fp8"], dirs["fp8_dequant"] = hf_models.write_fp8_deepseek(os.path.join(root, "ds_fp8"), seed=11)
    return dirs


def _hf_name(name: str, hf_names) -> str:
    # moekit keeps the HF router under the MoE layer's `gate`: mlp.gate.router.weight is HF's mlp.gate.weight
    # (gpt-oss: mlp.router.weight).
    for new in (".gate.", ".router."):
        cand = name.replace(".gate.router.", new)
        if cand in hf_names:
            return cand
    return name


def _check_arch(rank, world, path):
    from transformers import AutoModelForCausalLM

    from moekit.generate import greedy
    from moekit.integrations.gpt_oss import ClampedSwiGLUExperts
    from moekit.integrations.transformers import (
        expert_parallel,
        from_pretrained,
        replicated_parameters,
        resident_expert_bytes,
    )
    from moekit.moe import moe_layers, sync_grads

    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ep = from_pretrained(path)
    assert len(moe_layers(ep)) == sum(".experts" in n for n, _ in ref.named_modules() if n.endswith("mlp.experts"))

    # 1/R of the experts on this rank, and only those read from the shards.
    full = sum(p.numel() * p.element_size() for n, p in ref.named_parameters() if ".mlp.experts." in n)
    assert resident_expert_bytes(ep) * world == full
    stats = ep.moekit_load_stats
    assert stats.expert_bytes * world == full and stats.unexpected == ()
    assert stats.experts_skipped == stats.experts_read * (world - 1)

    # Logits of this rank's own batch (ranks differ), and the router logits HF records from its router.
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        want, got = ref(ids, output_router_logits=True), ep(ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    assert len(got.router_logits) == len(want.router_logits) > 0
    for a, b in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(a, b, **TOL)

    # expert_parallel on a model already in memory (every rank loaded all experts; each keeps its share).
    inmem = expert_parallel(AutoModelForCausalLM.from_pretrained(path).eval())
    assert resident_expert_bytes(inmem) * world == full
    with torch.no_grad():
        torch.testing.assert_close(inmem(ids).logits, want.logits, **TOL)
    del inmem

    # Greedy generation: the same tokens as HF's generate.
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    want_tokens = ref.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    res = greedy(ep, prompt, 6)
    assert torch.equal(res.tokens, want_tokens), (res.tokens, want_tokens)

    # One training step, data parallel over the EP ranks: the rank's loss, and gradients of the mean loss.
    ep.train()
    ref.train()
    batches = [torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(200 + r)) for r in range(world)]
    loss = ep(batches[rank], labels=batches[rank]).loss
    loss.backward()
    sync_grads(ep, average=True)
    ref_losses = []
    for b in batches:
        lr = ref(b, labels=b).loss
        (lr / world).backward()
        ref_losses.append(lr.detach())
    torch.testing.assert_close(loss.detach(), ref_losses[rank], **TOL)
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in replicated_parameters(ep):
        torch.testing.assert_close(p.grad, ref_params[_hf_name(name, ref_params)].grad, rtol=1e-4, atol=1e-5,
                                   msg=name)
        checked += 1
    assert checked == sum(".mlp.experts." not in n for n in ref_params)  # all but HF's fused expert tensors
    for name, m in ep.named_modules():
        if m in moe_layers(ep) and isinstance(m.experts, ClampedSwiGLUExperts):
            for pname in ClampedSwiGLUExperts.PARAMS:
                want = ref_params[f"{name}.experts.{pname}"].grad[m.expert_offset:m.expert_offset + m.num_local_experts]
                torch.testing.assert_close(getattr(m.experts, pname).grad, want, rtol=1e-4, atol=1e-5, msg=pname)
        elif m in moe_layers(ep):
            lo, n, i = m.expert_offset, m.num_local_experts, m.config.moe_intermediate_size
            gu = ref_params[f"{name}.experts.gate_up_proj"].grad[lo:lo + n]
            torch.testing.assert_close(m.experts.gate_proj.grad, gu[:, :i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(m.experts.up_proj.grad, gu[:, i:], rtol=1e-4, atol=1e-5)
            down = ref_params[f"{name}.experts.down_proj"].grad[lo:lo + n]
            torch.testing.assert_close(m.experts.down_proj.grad, down, rtol=1e-4, atol=1e-5)


def _check_fp8(rank, world, fp8_dir, deq_dir, fp32_dir):
    from transformers import AutoModelForCausalLM

    from moekit.benchtools import calc_diff
    from moekit.integrations.transformers import from_pretrained

    ep = from_pretrained(fp8_dir)
    deq = AutoModelForCausalLM.from_pretrained(deq_dir).eval()
    orig = AutoModelForCausalLM.from_pretrained(fp32_dir).eval()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(300 + rank))
    with torch.no_grad():
        got, want, exact = ep(ids).logits, deq(ids).logits, orig(ids).logits
    torch.testing.assert_close(got, want, **TOL)  # dequantized on the CPU: the dequantized model itself
    assert 0 < calc_diff(got, exact) < 1e-3  # within FP8 error of the unquantized model (DeepGEMM's measure)
    stats = ep.moekit_load_stats
    e_loc = 16 // world
    assert stats.experts_read == 3 * e_loc  # one MoE layer
    # Stored FP8: this rank read its experts at 1 byte per weight plus one fp32 scale per 128x128 block.
    expert_elems = 3 * e_loc * 160 * 64
    assert stats.expert_bytes == 4 * expert_elems
    assert stats.bytes_read < stats.replicated_bytes + expert_elems + 3 * e_loc * 2 * 4 + 1


def _ranks(rank, world, dirs):
    for arch in ARCHS:
        _check_arch(rank, world, dirs[arch])
    _check_fp8(rank, world, dirs["fp8"], dirs["fp8_dequant"], os.path.join(os.path.dirname(dirs["fp8"]), "fp32",
                                                                           "deepseek_v3"))
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_matches_transformers(checkpoints, world):
    assert spawn(_ranks, world, checkpoints, timeout=240) == [True] * world


def test_unknown_architecture_is_named(checkpoints, tmp_path):
    import transformers as tf

    from moekit.integrations.transformers import expert_parallel, from_pretrained

    llama = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=V))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        expert_parallel(llama)
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        from_pretrained(str(tmp_path / "llama"))
    # A quantization moekit does not read (gpt-oss's MXFP4 is read: test_mxfp4.py): refused by name rather
    # than read as garbage.
    import json

    oss = hf_models.write("gpt_oss", str(tmp_path))
    cfg = json.load(open(os.path.join(oss, "config.json")))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    json.dump(cfg, open(os.path.join(oss, "config.json"), "w"))
    with pytest.raises(ValueError, match="bitsandbytes"):
        from_pretrained(oss)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        expert_parallel("not a model")


def test_from_pretrained_rejects_bad_paths(checkpoints, tmp_path):
    from moekit.integrations.transformers import expert_parallel, from_pretrained

    with pytest.raises(ValueError, match="local checkpoint directory"):
        from_pretrained(str(tmp_path / "nope"))
    # A directory with a config but no safetensors shards (e.g. only a pickled .bin): refused, never unpickled.
    empty = tmp_path / "bin_only"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(checkpoints["qwen3_moe"], "config.json")).read())
    (empty / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        from_pretrained(str(empty))
    with pytest.raises(ValueError, match="transport"):
        expert_parallel(hf_models.build("mixtral"), transport="no-such-transport")


def test_router_kinds_match_hf_routers():
    """LogitsRouter's expert choice and weights against each HF router's own, on fresh random tokens."""
    from moekit.config import MoEConfig
    from moekit.integrations.transformers import ARCHITECTURES, _moe_config

    for arch in ARCHS:
        model = hf_models.build(arch, seed=3)
        spec = ARCHITECTURES[type(model).__name__]
        block = next(m for m in model.modules() if type(m).__name__ == spec.block)
        cfg = _moe_config(block, spec, model.config, fp8=False)
        assert isinstance(cfg, MoEConfig)
        from moekit.routing.routers import LogitsRouter

        router = LogitsRouter(getattr(block, spec.router), spec.kind, cfg)
        x = torch.randn(64, 64)
        _, want_w, want_idx = getattr(block, spec.router)(x)
        got = router(x)
        # Same experts per token (order may differ: HF's topk is unsorted), same weight per expert.
        w_dense = torch.zeros(64, cfg.n_routed_experts).scatter(1, got.topk_idx, got.topk_weights)
        w_ref = torch.zeros(64, cfg.n_routed_experts).scatter(1, want_idx, want_w.float())
        torch.testing.assert_close(w_dense, w_ref, **TOL, msg=arch)


def test_balancing_moves_the_selection_bias():
    """Aux-loss-free balancing reaches every family: the checkpoint's bias for DeepSeek-V3, a zero one (not in
    the state dict) for the softmax routers; a moved bias changes the choice, not the weights' source."""
    from moekit.integrations.transformers import expert_parallel
    from moekit.moe import moe_layers, update_moe_biases

    for arch in ("deepseek_v3", "qwen3_moe"):
        model = hf_models.build(arch, seed=4)
        hf_bias = [m.e_score_correction_bias.clone() for m in model.modules() if type(m).__name__.endswith("Router")
                   and hasattr(m, "e_score_correction_bias")]
        keys = set(model.state_dict())
        expert_parallel(model)
        layers = moe_layers(model)
        before = [m.gate.e_score_correction_bias.clone() for m in layers]
        if arch == "qwen3_moe":
            assert all(torch.equal(b, torch.zeros_like(b)) for b in before)
            assert not any("bias" in k for k in set(model.state_dict()) - keys)
        else:
            assert len(hf_bias) == len(before) and all(torch.equal(a, b) for a, b in zip(hf_bias, before))
        model(torch.randint(0, V, (2, 16)))
        upd = update_moe_biases(model)
        gamma = layers[0].config.bias_update_speed
        for m, b in zip(layers, before):
            step = m.gate.e_score_correction_bias - b
            assert float(step.abs().max()) == pytest.approx(gamma, rel=1e-3) and (step != 0).any()
        assert len(upd.imbalance) == len(layers)


def test_fp8_checkpoint_through_fp8_grouped_gemm(tmp_path):
    """fp8=True: the block-FP8 experts run moekit's FP8 grouped GEMM (1x128 activations, 128x128 weights; the
    torch reference kernels on the CPU) and stay within FP8 error of the dequantized model."""
    from transformers import AutoModelForCausalLM

    from moekit.benchtools import calc_diff
    from moekit.integrations.transformers import from_pretrained
    from moekit.moe import moe_layers

    fp8_dir, deq_dir = hf_models.write_fp8_deepseek(str(tmp_path), seed=3, hidden_size=128, moe_intermediate_size=128)
    ep = from_pretrained(fp8_dir, fp8=True)
    assert {m.config.expert_backend for m in moe_layers(ep)} == {"fp8"}
    deq = AutoModelForCausalLM.from_pretrained(deq_dir).eval()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        diff = calc_diff(ep(ids).logits, deq(ids).logits)
    assert 0 < diff < 3e-3  # activations are quantized too: FP8 error, not zero
    with pytest.raises(ValueError, match="multiple of 128"):
        from_pretrained(hf_models.write("mixtral", str(tmp_path)), fp8=True)


def _greedy_low_latency(rank, world, path):
    from transformers import AutoModelForCausalLM

    from moekit.ep.buffer import Buffer
    from moekit.generate import greedy
    from moekit.integrations.transformers import from_pretrained
    from moekit.moe import moe_layers

    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ep = from_pretrained(path)
    calls = {"dispatch": 0, "low_latency_dispatch": 0, "low_latency_combine": 0}
    buf = moe_layers(ep)[0].buffer
    def counting(name):
        f = getattr(buf, name)

        def counted(*a, **k):
            calls[name] += 1
            return f(*a, **k)
        return counted

    for name in calls:  # count this Buffer's calls (all layers share it)
        setattr(buf, name, counting(name))
    assert isinstance(buf, Buffer)
    prompt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(3))
    want = ref.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    layers = len(moe_layers(ep))
    res = greedy(ep, prompt, 5)
    got_calls = dict(calls)
    assert all(m.low_latency_tokens is None for m in moe_layers(ep))  # reset after decoding
    for name in calls:
        calls[name] = 0
    plain = greedy(ep, prompt, 5, low_latency=False)
    for m in moe_layers(ep):
        m.low_latency_tokens = 2
    with torch.no_grad(), pytest.raises(ValueError, match="low_latency_tokens"):  # 3 tokens > capacity 2
        ep(prompt[:, :1])
    return (torch.equal(res.tokens, want), torch.equal(plain.tokens, want), got_calls, dict(calls), layers)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_greedy_decodes_through_low_latency_dispatch(checkpoints, arch):
    """Prefill through the normal dispatch, the 4 decode steps through low_latency_dispatch/combine (capacity
    = the batch of 3): the same greedy tokens as HF's generate, as with low_latency=False."""
    for same_ll, same_plain, ll_calls, plain_calls, layers in spawn(_greedy_low_latency, 2, checkpoints[arch],
                                                                      timeout=240):
        assert same_ll and same_plain
        assert ll_calls == {"dispatch": layers, "low_latency_dispatch": 4 * layers, "low_latency_combine": 4 * layers}
        assert plain_calls == {"dispatch": 5 * layers, "low_latency_dispatch": 0, "low_latency_combine": 0}
