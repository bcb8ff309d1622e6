"""gpt-oss's MXFP4 checkpoints: moekit's dequantizer against transformers' own conversion, and ``from_pretrained``
of a tiny MXFP4 gpt-oss checkpoint (1 and 2 gloo ranks) against transformers' model on the values it encodes."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moekit.kernels.reference import mxfp4_dequant_ref  # noqa: E402
from moekit.testing import spawn  # noqa: E402

from . import hf_models  # noqa: E402
from .hf_models import V  # noqa: E402

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}
# E8M0 bytes at the ends of the range (2**-127 .. 2**127; 0xFF is NaN) and around 1.0 (127).
EXTREME_SCALES = (0, 1, 2, 126, 127, 128, 252, 253, 254)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    return hf_models.write_mxfp4_gpt_oss(str(tmp_path_factory.mktemp("mxfp4")), seed=5)


def _packed(g: torch.Generator):
    """Every byte value (so every nibble in both positions) under each extreme scale, plus random blocks."""
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # 16 blocks: bytes 0..255
    blocks = every.repeat(len(EXTREME_SCALES), 1).reshape(len(EXTREME_SCALES), 16, 16)  # [S, 16 blocks, 16]
    scales = torch.tensor(EXTREME_SCALES, dtype=torch.uint8)[:, None].expand(-1, 16)
    rand_b = torch.randint(0, 256, (len(EXTREME_SCALES), 16, 16), dtype=torch.uint8, generator=g)
    rand_s = torch.randint(0, 255, (len(EXTREME_SCALES), 16), dtype=torch.uint8, generator=g)
    # [E=2, rows=S, G=16, 16]: the layout of gpt-oss's *_blocks, which transformers' function expects.
    return torch.stack([blocks, rand_b]), torch.stack([scales, rand_s])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequant_matches_transformers_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _packed(torch.Generator().manual_seed(0))
    ours = mxfp4_dequant_ref(blocks, scales, dtype)
    assert ours.shape == (2, len(EXTREME_SCALES), 16 * 32) and ours.dtype == dtype
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, G*32, rows]: gpt-oss's param layout
    bits = _BITS[dtype]
    # Bits, not values: -0.0 (code 8), 2**-127-scaled subnormals and overflow to inf must agree too.
    assert torch.equal(ours.transpose(1, 2).contiguous().view(bits), theirs.view(bits))


def test_dequant_format_facts():
    """The OCP MX v1.0 facts directly: low nibble first, the E2M1 table, bias 127, 0xFF = NaN."""
    b = torch.tensor([[[0x21, 0x8F, 0x73, 0xD4] + [0] * 12]], dtype=torch.uint8)  # one block [1, 1, 16]
    got = mxfp4_dequant_ref(b, torch.tensor([[127]], dtype=torch.uint8), torch.float32)[0, :8]
    assert got.tolist() == [0.5, 1.0, -6.0, -0.0, 1.5, 6.0, 2.0, -3.0]
    assert torch.signbit(got[3])
    x2 = mxfp4_dequant_ref(b, torch.tensor([[128]], dtype=torch.uint8), torch.float32)[0, :8]
    assert torch.equal(x2, 2 * got)
    tiny = mxfp4_dequant_ref(b, torch.tensor([[0]], dtype=torch.uint8), torch.float64)[0, :2]
    assert tiny.tolist() == [2.0 ** -128, 2.0 ** -127]  # 0.5 and 1.0 times 2**-127, exact
    assert torch.isnan(mxfp4_dequant_ref(b, torch.tensor([[0xFF]], dtype=torch.uint8))).all()  # NaN scale


def test_dequant_rejects_bad_input():
    b, s = torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match="blocks must be a uint8"):
        mxfp4_dequant_ref(b.to(torch.int8), s)
    with pytest.raises(TypeError, match="scales must be a uint8"):
        mxfp4_dequant_ref(b, s.float())
    with pytest.raises(ValueError, match=r"blocks must be \[\.\.\., G, 16\]"):
        mxfp4_dequant_ref(b[..., :8], s)
    with pytest.raises(ValueError, match=r"scales must be blocks.shape\[:-1\] = \[2, 3\]"):
        mxfp4_dequant_ref(b, s[:, :2])
    with pytest.raises(ValueError, match="dtype must be one of"):
        mxfp4_dequant_ref(b, s, torch.int32)


def _expected_bytes(mx_dir: str, world: int) -> int:
    """Bytes of the replicated tensors plus 1/world of every routed-expert tensor, as stored (packed FP4 +
    E8M0 scales + bf16 biases)."""
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(mx_dir, "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            nbytes = t.numel() * t.element_size()
            if ".mlp.experts." in k:
                assert nbytes % world == 0
                nbytes //= world
            total += nbytes
    return total


def _check_mxfp4(rank, world, mx_dir, deq_dir):
    from transformers import AutoModelForCausalLM

    from moekit.integrations.gpt_oss import ClampedSwiGLUExperts
    from moekit.integrations.transformers import from_pretrained
    from moekit.moe import moe_layers

    # fp32 both sides (moekit's Buffer carries bf16/fp16/fp32 only): the encoded values are exact in fp32, so
    # only the order of the experts' sums differs from HF's, as in test_transformers.py.
    ep = from_pretrained(mx_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(deq_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(40 + rank))
    with torch.no_grad():
        got, want = ep(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = ep.moekit_load_stats
    e_loc = 8 // world
    assert stats.experts_read == 2 * 4 * e_loc and stats.experts_skipped == 2 * 4 * (8 - e_loc)  # 2 layers
    assert stats.unexpected == ()
    assert stats.bytes_read == _expected_bytes(mx_dir, world)  # only this rank's rows of blocks and scales

    # Default dtype (the config's bf16): the experts hold exactly the encoded values (E2M1 x 2**k fits bf16).
    bf = from_pretrained(mx_dir)
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, m in bf.named_modules():
        if m in moe_layers(bf):
            assert isinstance(m.experts, ClampedSwiGLUExperts) and m.experts.down_proj.dtype == torch.bfloat16
            lo = m.expert_offset
            for pname in ClampedSwiGLUExperts.PARAMS:
                want_p = ref_params[f"{name}.experts.{pname}"][lo:lo + e_loc].to(torch.bfloat16)
                assert torch.equal(getattr(m.experts, pname), want_p), pname
                checked += 1
    assert checked == 2 * 4
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_from_pretrained_reads_mxfp4(mxfp4_checkpoint, world):
    assert spawn(_check_mxfp4, world, *mxfp4_checkpoint, timeout=240) == [True] * world


def _rewrite(src: str, dst: str, drop: str | None = None, quant: dict | None = None) -> str:
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if drop is not None:
        del tensors[drop]
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    if quant is not None:
        cfg["quantization_config"] = quant
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_mxfp4_unpaired_keys_and_other_methods_are_refused(mxfp4_checkpoint, tmp_path):
    from moekit.integrations.transformers import from_pretrained

    mx_dir, _ = mxfp4_checkpoint
    key = "model.layers.1.mlp.experts.down_proj"
    with pytest.raises(ValueError, match=f"{key}_blocks has no {key}_scales"):
        from_pretrained(_rewrite(mx_dir, str(tmp_path / "no_scales"), drop=key + "_scales"))
    with pytest.raises(ValueError, match=f"{key}_scales has no {key}_blocks"):
        from_pretrained(_rewrite(mx_dir, str(tmp_path / "no_blocks"), drop=key + "_blocks"))
    with pytest.raises(ValueError, match="'gptq' is not supported for GptOssForCausalLM"):
        from_pretrained(_rewrite(mx_dir, str(tmp_path / "gptq"), quant={"quant_method": "gptq", "bits": 4}))
    # MXFP4 is gpt-oss's format only: another architecture declaring it is refused, not half-read.
    qwen = hf_models.write("qwen3_moe", str(tmp_path))
    with pytest.raises(ValueError, match="'mxfp4' is not supported for Qwen3MoeForCausalLM"):
        from_pretrained(_rewrite(qwen, str(tmp_path / "qwen_mx"), quant={"quant_method": "mxfp4"}))
