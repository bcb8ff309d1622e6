"""Compile every FP8 kernel for sm_90 (Hopper) without a GPU, and read what the compiler made of it.

For each kernel and config: ptxas registers, spill stack, dynamic shared memory, whether the dot became
``wgmma`` with e4m3 operands, whether loads are 16-byte vectors, how many packed ``cvt...e4m3x2`` the
quantizers emit. Catches on a CPU machine what would otherwise cost device time: a kernel that does not
compile for Hopper, inline PTX that ptxas rejects, spills, a dot that fell off the tensor cores.

    TRITON_INTERPRET=0 PYTHONPATH=src python bench/fp8_sm90_compile.py [--json PATH]

The int arguments are compiled as the runtime would specialise them for DeepSeek-V3's shapes (pointers
16-byte aligned; sizes and row strides divisible by 16). Needs the ptxas / cuobjdump that Triton's wheel
ships; exits 3 when they are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, even on a machine without a GPU (before moekit/triton load)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from moekit.kernels import gemm, grouped, quant  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DIV16 = {"M", "N", "K", "M_BUCKET", "stride_xm", "stride_qm", "stride_am", "stride_bn", "stride_cm", "stride_bg",
         "stride_wg", "stride_wn", "stride_qg", "stride_qn", "stride_ag", "stride_cg"}
POINTERS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv",
            "s_ptr": "*fp32", "as_ptr": "*fp32", "bs_ptr": "*fp32", "c_ptr": "*bf16", "idx_ptr": "*i32",
            "mm_ptr": "*i32"}


def _jit_fn(kernel):
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap the autotuner
        fn = fn.fn
    return fn


def compile_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int):
    fn = _jit_fn(kernel)
    sig = {n: ("constexpr" if n in constexprs else POINTERS.get(n, "i32")) for n in fn.arg_names}
    if constexprs.get("USE_TMA"):  # the operands are host-side TMA descriptors of one tile each
        sig["a_ptr"] = f"tensordesc<fp8e4nv[{constexprs['BLOCK_M']}, {constexprs['BLOCK_K']}]>"
        sig["b_ptr"] = f"tensordesc<fp8e4nv[{constexprs['BLOCK_N']}, {constexprs['BLOCK_K']}]>"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or n in DIV16}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    ptx = compiled.asm["ptx"]
    return {"regs": int(found.get("REG", -1)), "stack": int(found.get("STACK", -1)),
            "local": int(found.get("LOCAL", -1)), "dyn_smem": compiled.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "wgmma_e4m3": "e4m3.e4m3" in ptx,
            "v4_loads": ptx.count("ld.global.v4"), "tma_loads": ptx.count("cp.async.bulk.tensor"),
            "scalar_loads": len(re.findall(r"ld\.global\.b(8|16)\b", ptx)),
            "cvt_e4m3x2": ptx.count("cvt.rn.satfinite.e4m3x2.f32")}


def jobs():
    """(name, kernel, constexprs, num_warps, num_stages) for every kernel and every CUDA config."""
    for cvt, label in ((0, "native"), (1, "ptx")):
        for qc in quant.get_quant_configs():
            yield (f"token_quant[{label}, BLOCK_M={qc.kwargs['BLOCK_M']}]", quant._token_group_quant_kernel,
                   {"GROUP": 128, "UE8M0": False, "CVT": cvt, **qc.kwargs}, qc.num_warps, 1)
        yield (f"block_quant[{label}]", quant._block_quant_kernel, {"BLOCK": 128, "UE8M0": False, "CVT": cvt}, 8, 1)
    for tma in (False, True):
        loads = "tma" if tma else "ptr"
        for cfg in gemm.get_cuda_configs():
            tag = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages} {loads}"
            consts = {**cfg.kwargs, "NUM_SMS": 132, "BLOCK_K": 128, "USE_TMA": tma}
            yield f"fp8_gemm_nt[{tag}]", gemm._fp8_gemm_nt_kernel, consts, cfg.num_warps, cfg.num_stages
        cfg = gemm.get_cuda_configs()[0]
        consts = {**cfg.kwargs, "NUM_SMS": 132, "BLOCK_K": 128, "USE_TMA": tma}
        yield (f"grouped_contiguous[128x128 {loads}]", grouped._grouped_contiguous_kernel, consts, cfg.num_warps,
               cfg.num_stages)
        yield f"grouped_masked[128x128 {loads}]", grouped._grouped_masked_kernel, consts, cfg.num_warps, cfg.num_stages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        print("fp8_sm90_compile: this Triton ships no ptxas; nothing compiled. Exit code 3.")
        return 3
    rows = []
    for name, kernel, consts, warps, stages in jobs():
        try:
            rows.append({"kernel": name, **resources(compile_sm90(kernel, consts, warps, stages))})
        except Exception as e:  # report every kernel, not just the first failure
            rows.append({"kernel": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "rows": rows}, f, indent=1)
    print(f"FP8 kernels compiled for sm_90 by Triton {triton.__version__} (no GPU involved)")
    cols = ("regs", "stack", "local", "dyn_smem", "wgmma", "wgmma_e4m3", "v4_loads", "tma_loads", "scalar_loads",
            "cvt_e4m3x2")
    print(f"{'kernel':<44}" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<44} ERROR {r['error']}")
        else:
            print(f"{r['kernel']:<44}" + "".join(f"{r[c]!s:>13}" for c in cols))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
