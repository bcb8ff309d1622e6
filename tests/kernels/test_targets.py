"""Every Triton kernel compiles for sm_90, sm_100, gfx942 and gfx950 on this CPU machine, and is fit to run there.

The matrix (``moekit.kernels.targets.compile_matrix``) is compiled once per run by the ``target_rows`` fixture:
compiled Triton in a child process, since this one runs Triton's interpreter.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from moekit import cli
from moekit.kernels import _asm, targets
from moekit.kernels.targets import TARGETS, JitInfo, TargetRow

TARGET_NAMES = sorted(TARGETS)
# What a kernel must be made of on each vendor: FP8 operands on the tensor cores.
MMA = {"sm_90": "wgmma.mma_async", "sm_100": "tcgen05.mma", "gfx942": "v_mfma", "gfx950": "v_mfma"}


# Kernels whose loads are not rows, and why a narrow (or no) vector load is right for them.
NARROW_LOADS = {
    "_notify_kernel": "reads one bool per token down a column of is_token_in_rank [T, R] (strided)",
    "_wait_flags_kernel": "only polls flags with acquire atomics",
}
# Kernels that never touch FP8 (they move bytes): every other kernel compiles for the target's FP8 format.
NO_FP8 = {"_push_rows_kernel", "_wait_flags_kernel", "_notify_kernel", "_combine_kernel"}


def _kernels(rows):
    return [r for r in rows if r.kind == "kernel"]


def _name(r):
    return f"{r.kernel}[{r.variant}] on {r.target}"


@pytest.mark.slow
def test_every_kernel_compiles_for_every_target(target_rows):
    kernels = _kernels(target_rows)
    failed = [f"{_name(r)}: {r.error}" for r in kernels if not r.compiled or r.error]
    assert not failed, "\n".join(failed)
    by_kernel = {}
    for r in kernels:
        by_kernel.setdefault(r.kernel, set()).add(r.target)
    assert set(by_kernel) >= {"_token_group_quant_kernel", "_block_quant_kernel", "_fp8_gemm_nt_kernel",
                              "_grouped_contiguous_kernel", "_grouped_masked_kernel"}
    assert all(t == set(TARGET_NAMES) for t in by_kernel.values()), by_kernel
    assert all(r.occupancy and r.occupancy >= 1 for r in kernels)


@pytest.mark.slow
def test_no_spills_and_wide_loads(target_rows):
    for r in _kernels(target_rows):
        assert r.spills == 0, f"{_name(r)} spills {r.spills} bytes"
        assert r.registers and r.registers > 0, _name(r)
        if r.kernel in NARROW_LOADS:
            continue
        # Quantizers read 128-bit vectors of bf16; GEMMs copy FP8 tiles 16 bytes at a time (or through TMA);
        # the communication kernels move rows as 16-byte vectors of int32 words.
        assert r.tma or r.load_bytes == 16, f"{_name(r)}: widest load {r.load_bytes} bytes"


@pytest.mark.slow
def test_dots_reach_fp8_tensor_cores(target_rows):
    gemms = [r for r in _kernels(target_rows) if r.has_dot]
    assert {r.kernel for r in gemms} == {"_fp8_gemm_nt_kernel", "_grouped_contiguous_kernel", "_grouped_masked_kernel"}
    for r in gemms:
        assert r.tensor_cores, f"{_name(r)}: the dot became {r.mma}"
        assert MMA[r.target] in r.mma, f"{_name(r)}: {r.mma}"
    assert not any(r.has_dot for r in _kernels(target_rows) if "quant" in r.kernel)


@pytest.mark.slow
def test_inline_ptx_only_in_nvidia_builds(target_rows):
    for r in target_rows:
        if TARGETS[r.target].vendor == "hip":
            assert not r.inline_ptx, f"{_name(r)} carries inline PTX {r.inline_ptx}"
    # The PTX fast path is what NVIDIA launches by default, and MOEKIT_PTX=0 really drops it.
    nv = [r for r in _kernels(target_rows) if TARGETS[r.target].vendor == "cuda" and "quant" in r.kernel]
    assert all(r.inline_ptx == ["_e4m3x4_ptx"] for r in nv if r.variant == "default")
    assert all(r.inline_ptx == [] for r in nv if r.variant == "MOEKIT_PTX=0")


@pytest.mark.slow
def test_fp8_format_per_target(target_rows):
    for r in _kernels(target_rows):
        if r.kernel in NO_FP8:
            assert r.fp8_format is None, _name(r)
            continue
        assert r.fp8_format == ("e4m3fnuz" if r.target == "gfx942" else "e4m3fn"), _name(r)
    mma = {r.target: r.mma for r in _kernels(target_rows)
           if r.kernel == "_fp8_gemm_nt_kernel" and r.variant == "default"}
    assert "fp8_fp8" in mma["gfx942"] and "f8f6f4" in mma["gfx950"] and "e4m3.e4m3" in mma["sm_90"], mma


@pytest.mark.slow
def test_every_jit_function_has_a_row(target_rows):
    found, _ = targets.discover()
    keys = {(r.module, r.kernel) for r in target_rows}
    missing = [k for k, info in found.items() if (info.module, info.name) not in keys]
    assert not missing, missing
    unregistered = [_name(r) for r in target_rows if r.kind == "unregistered"]
    assert not unregistered, f"jitted functions without a compile spec: {unregistered}"
    assert all(targets.green(r) for r in target_rows)
    # Every helper is in some GPU build, or is the interpreter-only one with its reason.
    for key, info in found.items():
        if key in targets.registered():
            continue
        rows = [r for r in target_rows if (r.module, r.kernel) == (info.module, info.name)]
        assert len(rows) == len(TARGET_NAMES)
        if key in targets.INTERPRETER_ONLY:
            assert all(r.compiled is None and r.error for r in rows)
        else:
            assert any(r.compiled for r in rows), f"{key} is in no target's build"


@pytest.mark.slow
def test_cli_prints_the_matrix(target_rows, monkeypatch, capsys):
    monkeypatch.setattr(targets, "compile_matrix", lambda *a, **k: target_rows)
    assert cli.main(["info", "--targets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(target_rows)
    for key in ("kernel", "target", "compiled", "error", "registers", "spills", "tensor_cores", "shared",
                "occupancy", "load_bytes", "inline_ptx"):
        assert all(key in r for r in rows), key
    assert {r["target"] for r in rows} == set(TARGET_NAMES)
    assert cli.main(["info", "--targets"]) == 0
    out = capsys.readouterr().out
    assert "_fp8_gemm_nt_kernel" in out and "gfx942" in out


def test_unregistered_function_gets_a_failing_row():
    k = "moekit.kernels.gemm._fp8_gemm_nt_kernel"
    found = {
        k: JitInfo(k, "_fp8_gemm_nt_kernel", "moekit.kernels.gemm", "gemm.py", (1, 2), (), False),
        "moekit.kernels.new.stray": JitInfo("moekit.kernels.new.stray", "stray", "moekit.kernels.new", "new.py",
                                            (1, 2), (), False),
    }
    kernel_row = TargetRow("_fp8_gemm_nt_kernel", "sm_90", compiled=True, spills=0, occupancy=1)
    rows = targets._with_helper_rows([kernel_row], found, ["sm_90"])
    stray = [r for r in rows if r.kernel == "stray"]
    assert len(stray) == 1 and stray[0].kind == "unregistered" and stray[0].compiled is False
    assert "no compile spec" in stray[0].error and not targets.green(stray[0])


def test_spec_for_a_missing_kernel_gets_a_failing_row(monkeypatch):
    monkeypatch.setattr(targets, "_interpreted_kernels", lambda: False)  # no compiling: only the stale spec
    monkeypatch.setattr(targets, "_SPECS", {"moekit.kernels.gemm._renamed_kernel": lambda t: None})
    rows = targets.compile_matrix(["sm_90"])
    stale = [r for r in rows if r.kernel == "_renamed_kernel"]
    assert len(stale) == 1 and stale[0].compiled is False and "no such @triton.jit" in stale[0].error
    assert not targets.green(stale[0])


def test_discover_walks_new_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "comm.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def helper(x):
            return x + 1

        @triton.jit
        def push_kernel(x_ptr, N: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, N), helper(tl.arange(0, N)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    found, skipped = targets.discover("fakepkg")
    assert set(found) == {"fakepkg.kernels.comm.helper", "fakepkg.kernels.comm.push_kernel"}
    assert found["fakepkg.kernels.comm.push_kernel"].callees == ("fakepkg.kernels.comm.helper",)
    assert skipped == []


def test_asm_readers():
    ptx = "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\nld.global.b16 %h1, [%rd2];"
    assert _asm.ptx_loads(ptx) == (16, False)
    assert _asm.ptx_loads("cp.async.cg.shared.global [ %r88 + 0 ], [ %rd28 + 0 ], 0x10, %r89;") == (16, False)
    assert _asm.ptx_loads("cp.async.bulk.tensor.2d.shared::cluster.global ...;")[1]
    assert _asm.amd_loads("global_load_dwordx2 v[0:1], v[2:3], off\nbuffer_load_ushort v4") == 8
    assert _asm.amd_loads("global_load_lds_dwordx4 v1, s[0:1]") == 16
    mma, ok = _asm.mma_instructions("v_mfma_f32_32x32x8_f16 a[0:15]", "hip", "gfx942", ["f8E4M3FN"])
    assert mma == "v_mfma_f32_32x32x8_f16" and not ok  # an FP8 dot upcast to fp16 MFMA is not on FP8 cores
    assert _asm.mma_instructions("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3", "cuda", 90, ["f8E4M3FN"])[1]
    assert not _asm.mma_instructions("mma.sync.aligned.m16n8k16", "cuda", 90, ["bf16"])[1]
    assert _asm.amd_resources("; NumVgprs: 128\n; TotalNumVgprs: 136\n; ScratchSize: 0\n; Occupancy: 3") == \
        {"vgprs": 136, "scratch": 0, "waves": 3}
    line = ("%a = tt.dot %x, %y, %c, inputPrecision = tf32 {maxNumImpreciseAcc = 1 : i32} : "
            "tensor<128x128xf8E4M3FNUZ> * t")
    assert _asm.dot_types(line) == ["f8E4M3FNUZ"]


def test_unknown_target_raises():
    with pytest.raises(ValueError, match="targets must be among"):
        targets.compile_matrix(["sm_80"])


_CHILD = """
import dataclasses, json
from moekit.kernels import targets as T, gemm
found, _ = T.discover()
key = "moekit.kernels.quant._token_group_quant_kernel"
t = T.TARGETS["gfx942"]
spec = T._specs(key, t)[0]
# e4m3fn data stored through an e4m3fnuz pointer: the fn -> fnuz cast has no AMD lowering.
bad = dataclasses.replace(spec, constexprs={**spec.constexprs, "FNUZ": False, "FP8_MAX": 448.0})
cfg = gemm.get_hip_configs()[0]
nonk = T.CompileSpec.from_config(gemm._fp8_gemm_nt_kernel, type(cfg)({**cfg.kwargs, "matrix_instr_nonkdim": 16},
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                                 {"NUM_SMS": t.num_sms, "BLOCK_K": 128, "USE_TMA": False},
                                 pointers=T._specs("moekit.kernels.gemm._fp8_gemm_nt_kernel", t)[0].pointers)
nv = T._specs("moekit.kernels.gemm._fp8_gemm_nt_kernel", T.TARGETS["sm_90"])[0]
on_amd = dataclasses.replace(nv, pointers=nonk.pointers)
print(json.dumps([T.compile_row(key, bad, t, found).as_dict(),
                  T.compile_row("moekit.kernels.gemm._fp8_gemm_nt_kernel", nonk, t, found).as_dict(),
                  T.compile_row("moekit.kernels.gemm._fp8_gemm_nt_kernel", on_amd, t, found).as_dict()]))
"""


@pytest.mark.slow
def test_compile_errors_amd_options_and_lds_limit(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    bad, nonk, nv_on_amd = (TargetRow(**d) for d in json.loads(r.stdout.strip().splitlines()[-1]))
    assert bad.compiled is False and not targets.green(bad)
    # The compiler's first diagnostic, with its place in the source.
    assert "quant.py:" in bad.error and "f8E4M3FNUZ" in bad.error, bad.error
    # AMD compile options travel from the config: 16x16 MFMA instead of the default 32x32.
    assert nonk.compiled and "v_mfma_f32_16x16x32_fp8_fp8" in nonk.mma
    # NVIDIA's preferred config (4 stages) asks for more LDS than an MI300 CU has: why AMD has its own list.
    assert nv_on_amd.compiled and nv_on_amd.shared > TARGETS["gfx942"].smem_per_program
    assert "LDS" in nv_on_amd.error and not targets.green(dataclasses.replace(nv_on_amd))
