"""Readers of compiler output (PTX, AMDGCN, TTIR, cubin): the facts ``moekit.kernels.targets`` puts in its rows.

The patterns follow the PTX ISA (``ld.global``, ``cp.async``, ``cp.async.bulk.tensor``, ``wgmma.mma_async``,
``tcgen05.mma``) and the AMDGPU back end's listing (``global_load_*``, ``buffer_load_*``, ``v_mfma_*`` and the
``; NumVgprs`` / ``; ScratchSize`` / ``; Occupancy`` comments LLVM writes after each kernel).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


def cuobjdump_resources(cubin: bytes) -> dict[str, int]:
    """``{REG, STACK, LOCAL, ...}`` of a cubin, from the ``cuobjdump -res-usage`` that Triton's wheel ships."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


_PTX_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
              "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8, "b128": 16}
_AMD_BYTES = {"ubyte": 1, "sbyte": 1, "u8": 1, "i8": 1, "ushort": 2, "short": 2, "sshort": 2, "u16": 2, "i16": 2,
              "b16": 2, "dword": 4, "b32": 4, "dwordx2": 8, "b64": 8, "dwordx3": 12, "b96": 12, "dwordx4": 16,
              "b128": 16}


def ptx_loads(ptx: str) -> tuple[int | None, bool]:
    """The widest global load per thread in bytes (``ld.global`` or ``cp.async``), and whether TMA copies appear."""
    widths = []
    for vec, ty in re.findall(r"\bld\.global[\w.:]*?(?:\.v(\d))?\.(b\d+|[usf]\d+|bf16)\b", ptx):
        widths.append(int(vec or 1) * _PTX_BYTES.get(ty, 0))
    # cp.async.cg.shared.global [dst], [src], cp-size(, src-size): the copy's bytes per thread.
    cp = r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
    widths += [int(n, 0) for n in re.findall(cp, ptx)]
    return (max(widths) if widths else None), "cp.async.bulk.tensor" in ptx


def amd_loads(asm: str) -> int | None:
    """The widest ``global_load`` / ``buffer_load`` in an AMDGCN listing, in bytes."""
    widths = [_AMD_BYTES.get(m, 0) for m in re.findall(r"\b(?:global|buffer)_load(?:_lds)?_(\w+?)\b", asm)]
    widths = [w for w in widths if w]
    return max(widths) if widths else None


def dot_types(ttir: str) -> list[str]:
    """Element types of the first operand of every ``tt.dot`` / ``tt.dot_scaled`` in the TTIR."""
    out = []
    for line in ttir.splitlines():
        if re.search(r"= tt\.dot(_scaled)? ", line):
            m = re.search(r"tensor<[\dx]+x(\w+)>\s*\*", line)
            out.append(m.group(1) if m else "?")
    return out


def mma_instructions(asm: str, vendor: str, arch: int | str, dots: list[str]) -> tuple[str | None, bool]:
    """The matrix instructions in a listing, and whether the dot reached the target's tensor cores: with FP8
    operands (``dots`` from :func:`dot_types`) the FP8 instruction itself (an fp16 MFMA of upcast operands
    does not count), on Hopper ``wgmma`` and on Blackwell ``tcgen05.mma`` (not the older ``mma.sync``)."""
    fp8 = any(d.startswith("f8") for d in dots)
    if vendor == "hip":
        found = sorted(set(re.findall(r"\bv_mfma_\w+", asm)))
        want = r"v_mfma_\w*(fp8|bf8|f8f6f4)" if fp8 else r"v_mfma_"
    elif int(arch) >= 100:
        found = sorted(set(re.findall(r"\btcgen05\.mma[\w.:]*", asm)) | set(re.findall(r"\bmma\.sync[\w.]*", asm)))
        want = r"tcgen05\.mma\S*kind::f8f6f4" if fp8 else r"tcgen05\.mma"
    else:
        found = sorted(set(re.findall(r"\bwgmma\.mma_async[\w.]*", asm)) | set(re.findall(r"\bmma\.sync[\w.]*", asm)))
        want = r"wgmma\.mma_async\S*\.e[45]m[23]" if fp8 else r"wgmma\.mma_async"
    return (", ".join(found) or None), any(re.search(want, f) for f in found)


def loc_lines(ttir: str) -> list[tuple[str, int]]:
    """``(file, line)`` of every source location in a TTIR listing: which source lines this build holds."""
    return [(f, int(ln)) for f, ln in re.findall(r'loc\("([^"]+)":(\d+):\d+\)', ttir)]


def amd_resources(asm: str) -> dict[str, int]:
    """``{"vgprs", "scratch", "waves"}`` from LLVM's comments in an AMDGCN listing (VGPRs + AGPRs per lane,
    scratch bytes per lane, i.e. spills, and the occupancy in waves per SIMD the registers allow)."""
    out = {}
    for name, pat in (("vgprs", r";\s*TotalNumVgprs:\s*(\d+)"), ("vgprs", r";\s*NumVgprs:\s*(\d+)"),
                      ("scratch", r";\s*ScratchSize:\s*(\d+)"), ("waves", r";\s*Occupancy:\s*(\d+)")):
        m = re.search(pat, asm)
        if m and name not in out:
            out[name] = int(m.group(1))
    return out
