"""Compile every ``@triton.jit`` function of moekit for each GPU it promises, on any machine, and read the result.

Triton's wheel carries both back ends' compilers (ptxas for NVIDIA, LLVM's AMDGPU target and lld for AMD),
so ``triton.compile`` of an ``ASTSource`` for a ``GPUTarget`` needs no GPU. Targets:

==========  ===================  ===========================  ==========
target      GPUs                 ``GPUTarget``                FP8 format
==========  ===================  ===========================  ==========
``sm_90``   H100 / H200 / H800   ``("cuda", 90, 32)``         e4m3fn
``sm_100``  B200                 ``("cuda", 100, 32)``        e4m3fn
``gfx942``  MI300X / MI325X      ``("hip", "gfx942", 64)``    e4m3fnuz
``gfx950``  MI355X               ``("hip", "gfx950", 64)``    e4m3fn
==========  ===================  ===========================  ==========

Each kernel has a :class:`CompileSpec` per target: the argument types and the constexprs its launcher passes
there, the first (preferred) config of the vendor's autotune list, and the specialisations DeepSeek-V3's
shapes give the runtime (every pointer and row stride 16-byte aligned, sizes like 7168 / 2048 divisible
by 16). :func:`compile_matrix` compiles them and returns one :class:`TargetRow` per kernel (and variant)
x target: registers, spills, shared memory / LDS, the occupancy they allow, whether the matmul became
tensor-core instructions (``wgmma`` / ``tcgen05.mma`` / ``v_mfma`` with FP8 operands, read from the PTX or
AMDGCN), the widest global load, and the inline-PTX helpers in the build. Device-side helpers
(``@triton.jit`` functions called by kernels) get a row saying which kernels inlined them there; a jitted
function that is neither registered nor called by a registered kernel gets a row that says so, and the
tests fail on it.

Registering a new kernel (a few lines, in this module)::

    @register("moekit.kernels.my_module._my_kernel")
    def _my_kernel_spec(t: Target) -> CompileSpec:
        from . import my_module
        return CompileSpec(my_module._my_kernel, pointers={"x_ptr": "bf16", "y_ptr": t.fp8.triton},
                           constexprs={"BLOCK": 128}, num_warps=4 if t.vendor == "cuda" else 2,
                           div16=("n", "stride_xm"))

Compiling needs compiled Triton: in a process where moekit turned on Triton's interpreter (no GPU), the
kernels are interpreter objects, so :func:`compile_matrix` runs ``python -m moekit.kernels.targets --json``
in a child process with ``TRITON_INTERPRET=0``. Compiled artifacts land in Triton's cache
(``TRITON_CACHE_DIR``), so a second run in the same cache only reads them back.

    TRITON_INTERPRET=0 python -m moekit.kernels.targets [--json] [--target sm_90 ...] [--jobs N]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

from .._util import round_up
from . import _asm
from ._backend import BLOCK, FP8Format, fp8_format_for_arch

# --------------------------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One compile target and the per-SM / per-CU limits its occupancy is computed from."""

    name: str  # "sm_90" | "sm_100" | "gfx942" | "gfx950"
    vendor: str  # "cuda" | "hip" (Triton's backend names)
    arch: int | str  # 90 | 100 | "gfx942" | "gfx950"
    warp_size: int
    gpus: str
    num_sms: int  # SMs / CUs of the largest part: the persistent GEMMs' NUM_SMS
    regs_per_sm: int  # 32-bit registers per SM (NVIDIA); 0 on AMD, where LLVM reports the occupancy itself
    smem_per_sm: int  # bytes of shared memory (NVIDIA) / LDS (AMD) per SM / CU
    smem_per_program: int  # the most one program may allocate (Triton refuses the launch above it)
    max_warps: int  # resident warps per SM (NVIDIA) / wavefronts per CU (AMD)

    @property
    def fp8(self) -> FP8Format:
        """The E4M3 encoding this target's FP8 tensor cores read."""
        return fp8_format_for_arch(self.arch)

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.vendor, self.arch, self.warp_size)


# Limits: NVIDIA's CUDA C Programming Guide, "Compute Capabilities" table (9.0 and 10.0: 64K registers,
# 228 KB shared memory, 64 warps per SM); AMD's CDNA3 / CDNA4 instruction-set and white papers (64 KB LDS per
# CU on MI300, 160 KB on MI355X; 4 SIMDs x 8 wavefronts per CU).
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("sm_90", "cuda", 90, 32, "H100 / H200 / H800", 132, 65536, 228 * 1024, 227 * 1024, 64),
        Target("sm_100", "cuda", 100, 32, "B200", 148, 65536, 228 * 1024, 227 * 1024, 64),
        Target("gfx942", "hip", "gfx942", 64, "MI300X / MI325X", 304, 0, 64 * 1024, 64 * 1024, 32),
        Target("gfx950", "hip", "gfx950", 64, "MI355X", 256, 0, 160 * 1024, 160 * 1024, 32),
    )
}

# ------------------------------------------------------------------------------------------ specs


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """How a kernel is compiled for one target: what its launcher would pass there.

    Args:
        kernel: the ``@triton.jit`` function (or the autotuner wrapping it).
        pointers: pointer argument -> element type in Triton's signature names (``"bf16"``, ``"fp32"``,
            ``"i32"``, ``"fp8e4nv"``, ``"fp8e4b8"``); every pointer is compiled as 16-byte aligned.
        constexprs: every ``tl.constexpr`` argument's value.
        num_warps, num_stages: the launch config.
        options: other compile options (AMD: ``waves_per_eu``, ``matrix_instr_nonkdim``).
        div16: integer arguments divisible by 16 (sizes and row strides at DeepSeek-V3's shapes); the other
            integers are plain ``i32``.
        signature: per-argument overrides of the signature (e.g. TMA ``tensordesc<...>`` operands).
        variant: ``"default"`` for what the launcher picks, another name for an opt-in path.
    """

    kernel: Any
    pointers: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 1
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    div16: tuple[str, ...] = ()
    signature: dict[str, str] = dataclasses.field(default_factory=dict)
    variant: str = "default"

    @classmethod
    def from_config(cls, kernel, config, constexprs: dict[str, Any], **kw) -> CompileSpec:
        """A spec from a ``triton.Config``: its kwargs that name kernel arguments become constexprs, the rest
        (``waves_per_eu``, ``matrix_instr_nonkdim``) compile options."""
        names = set(jit_function(kernel).arg_names)
        consts = {k: v for k, v in config.kwargs.items() if k in names}
        options = {k: v for k, v in config.kwargs.items() if k not in names}
        return cls(kernel, constexprs={**consts, **constexprs}, num_warps=config.num_warps,
                   num_stages=config.num_stages, options=options, **kw)

    def describe(self) -> str:
        keys = [k for k in self.constexprs if k.startswith("BLOCK")]
        tile = ",".join(f"{k.removeprefix('BLOCK_')}={self.constexprs[k]}" for k in keys)
        extra = "".join(f" {k}={v}" for k, v in self.options.items())
        return f"{tile} w{self.num_warps} s{self.num_stages}{extra}"


SpecFactory = Callable[[Target], "CompileSpec | list[CompileSpec] | None"]
_SPECS: dict[str, SpecFactory] = {}


def register(key: str) -> Callable[[SpecFactory], SpecFactory]:
    """Register the spec factory of the kernel ``key`` (``"<module>.<function name>"``).

    The factory gets a :class:`Target` and returns the kernel's :class:`CompileSpec` there (a list for
    extra variants, ``None`` where the kernel does not run on that target).
    """

    def deco(factory: SpecFactory) -> SpecFactory:
        if key in _SPECS:
            raise ValueError(f"a compile spec for {key} is already registered")
        _SPECS[key] = factory
        return factory

    return deco


def registered() -> list[str]:
    return sorted(_SPECS)


_Q_DIV16 = ("M", "K", "M_BUCKET", "N", "stride_xm", "stride_qm", "stride_wg", "stride_wn", "stride_qg", "stride_qn")
_G_DIV16 = ("M", "N", "K", "M_BUCKET", "stride_am", "stride_bn", "stride_cm", "stride_bg", "stride_ag", "stride_cg")


def _cvt_variants(t: Target, spec) -> list[CompileSpec]:
    """A quantizer's specs: with the vendor's FP8 conversion, and on NVIDIA also with the native cast (what
    ``MOEKIT_PTX=0`` runs). ``spec(cvt, variant)`` builds one."""
    from . import ptx

    specs = [spec(ptx.cvt_mode_for(t.vendor), "default")]
    if t.vendor == "cuda":
        specs.append(spec(ptx.CVT_NATIVE, "MOEKIT_PTX=0"))
    return specs


@register("moekit.kernels.quant._token_group_quant_kernel")
def _token_quant_spec(t: Target) -> list[CompileSpec]:
    from . import quant

    cfg = (quant.get_cuda_quant_configs() if t.vendor == "cuda" else quant.get_hip_quant_configs())[0]

    def spec(cvt: int, variant: str) -> CompileSpec:
        # ue8m0 scales: the flavour the dispatch wire uses (DeepSeek-V3 report, section 3.3.2).
        consts = {"GROUP": BLOCK, "UE8M0": True, "CVT": cvt, "FNUZ": t.fp8.fnuz, "FP8_MAX": t.fp8.max}
        return CompileSpec.from_config(quant._token_group_quant_kernel, cfg, consts, variant=variant,
                                       pointers={"x_ptr": "bf16", "q_ptr": t.fp8.triton, "s_ptr": "fp32"},
                                       div16=_Q_DIV16)

    return _cvt_variants(t, spec)


@register("moekit.kernels.quant._block_quant_kernel")
def _block_quant_spec(t: Target) -> list[CompileSpec]:
    from . import quant

    def spec(cvt: int, variant: str) -> CompileSpec:
        consts = {"BLOCK": BLOCK, "UE8M0": False, "CVT": cvt, "FNUZ": t.fp8.fnuz, "FP8_MAX": t.fp8.max}
        return CompileSpec(quant._block_quant_kernel, {"w_ptr": "bf16", "q_ptr": t.fp8.triton, "s_ptr": "fp32"},
                           consts, num_warps=quant.BLOCK_QUANT_WARPS[t.vendor == "hip"], div16=_Q_DIV16,
                           variant=variant)

    return _cvt_variants(t, spec)


def _gemm_specs(kernel, t: Target, extra_pointers: dict[str, str]) -> list[CompileSpec]:
    from . import gemm

    cfg = (gemm.get_cuda_configs() if t.vendor == "cuda" else gemm.get_hip_configs())[0]
    fp8 = t.fp8.triton
    pointers = {"a_ptr": fp8, "as_ptr": "fp32", "b_ptr": fp8, "bs_ptr": "fp32", "c_ptr": "bf16", **extra_pointers}

    def spec(tma: bool) -> CompileSpec:
        consts = {"NUM_SMS": t.num_sms, "BLOCK_K": BLOCK, "USE_TMA": tma}
        s = CompileSpec.from_config(kernel, cfg, consts, pointers=pointers, div16=_G_DIV16,
                                    variant="MOEKIT_TMA=1" if tma else "default")
        if tma:  # host-side descriptors of one tile each (gemm.set_descriptor_blocks)
            c = s.constexprs
            sig = {"a_ptr": f"tensordesc<{fp8}[{c['BLOCK_M']}, {BLOCK}]>",
                   "b_ptr": f"tensordesc<{fp8}[{c['BLOCK_N']}, {BLOCK}]>"}
            s = dataclasses.replace(s, signature=sig)
        return s

    # TMA is opt-in and NVIDIA-only (gemm.use_tma).
    return [spec(False), spec(True)] if t.vendor == "cuda" else [spec(False)]


@register("moekit.kernels.gemm._fp8_gemm_nt_kernel")
def _gemm_spec(t: Target) -> list[CompileSpec]:
    from . import gemm

    return _gemm_specs(gemm._fp8_gemm_nt_kernel, t, {})


@register("moekit.kernels.grouped._grouped_contiguous_kernel")
def _contiguous_spec(t: Target) -> list[CompileSpec]:
    from . import grouped

    return _gemm_specs(grouped._grouped_contiguous_kernel, t, {"idx_ptr": "i32"})


@register("moekit.kernels.grouped._grouped_masked_kernel")
def _masked_spec(t: Target) -> list[CompileSpec]:
    from . import grouped

    return _gemm_specs(grouped._grouped_masked_kernel, t, {"mm_ptr": "i32"})


# The communication kernels of the symmetric transport (moekit.kernels.comm), with the launchers' choices
# at DeepSeek-V3's shapes: 20 programs (the SM budget of the DeepSeek-V3 report, section 3.2.2), rows of
# 7168 bf16 (+ scales, ids, weights) moved as int32 words in blocks of 512.
_COMM_PROGS = 20


@register("moekit.kernels.comm._push_rows_kernel")
def _push_rows_spec(t: Target) -> CompileSpec:
    from . import comm

    pointers = {"ptrs_ptr": "i64", "src_ptr": "i32", "idx_ptr": "i64", "off_ptr": "i64"}
    return CompileSpec(comm._push_rows_kernel, pointers, {"NUM_PROGS": _COMM_PROGS, "BLOCK_R": 4, "BLOCK": 512},
                       signature={"dst_word_off": "i64", "flag_word_off": "i64"}, div16=("W",))


@register("moekit.kernels.comm._wait_flags_kernel")
def _wait_flags_spec(t: Target) -> CompileSpec:
    from . import comm

    return CompileSpec(comm._wait_flags_kernel, {"flags_ptr": "i32", "ready_ptr": "i32"}, {"BLOCK": 256})


@register("moekit.kernels.comm._notify_kernel")
def _notify_spec(t: Target) -> CompileSpec:
    from . import comm

    return CompileSpec(comm._notify_kernel, {"in_rank_ptr": "i1", "pos_ptr": "i32", "counts_ptr": "i64"},
                       {"NUM_PROGS": _COMM_PROGS, "BLOCK_T": 256})


@register("moekit.kernels.comm._combine_kernel")
def _combine_rows_spec(t: Target) -> CompileSpec:
    from . import comm

    return CompileSpec(comm._combine_kernel, {"rows_ptr": "bf16", "pos_ptr": "i32", "out_ptr": "fp32"},
                       {"NUM_PROGS": _COMM_PROGS, "BLOCK_T": 4, "BLOCK": 512}, div16=("row_stride", "WIDTH"))


# Jitted helpers that no GPU build contains, and why (they still need a row, and a reason).
INTERPRETER_ONLY = {
    "moekit.kernels.ptx._round_to_e4m3_grid": "interpreter only: its fp32->e4m3 cast truncates; GPUs convert "
                                              "in hardware",
}

# ------------------------------------------------------------------------------------------ discovery


@dataclasses.dataclass(frozen=True)
class JitInfo:
    """A ``@triton.jit`` function found in moekit: where it is and which jitted functions it calls."""

    key: str  # "<module>.<name>"
    name: str
    module: str
    file: str
    lines: tuple[int, int]  # first and last source line
    callees: tuple[str, ...]
    inline_asm: bool  # calls tl.inline_asm_elementwise itself


def jit_function(obj):
    """The ``JITFunction`` (or interpreter function) under autotune / heuristics wrappers, or ``None``."""
    from triton.runtime import JITFunction
    from triton.runtime.interpreter import InterpretedFunction

    for _ in range(8):
        if isinstance(obj, (JITFunction, InterpretedFunction)):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def _names(fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            out.add(f"{node.value.id}.{node.attr}")
    return out


def _resolve(name: str, scope: dict):
    head, _, attr = name.partition(".")
    obj = scope.get(head)
    return getattr(obj, attr, None) if attr and obj is not None else obj


def discover(package: str = "moekit") -> tuple[dict[str, JitInfo], list[str]]:
    """Every ``@triton.jit`` function defined in ``package``'s modules, and the modules that failed to import.

    Imports every module of the package (``__main__`` modules excepted); a module whose optional dependency
    is missing is listed, not raised.
    """
    pkg = importlib.import_module(package)
    modules, skipped = [pkg], []
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError as e:
            skipped.append(f"{info.name} ({e})")
    found: dict[str, JitInfo] = {}
    for mod in modules:
        for obj in list(vars(mod).values()):
            jf = jit_function(obj)
            raw = getattr(jf, "fn", None)
            if raw is None or getattr(raw, "__module__", None) != mod.__name__:
                continue
            key = f"{mod.__name__}.{raw.__name__}"
            if key in found:
                continue
            src, first = inspect.getsourcelines(raw)
            callees = set()
            for n in _names(raw):
                target = jit_function(_resolve(n, raw.__globals__))
                mod_name = getattr(getattr(target, "fn", None), "__module__", "") or ""
                if target is not None and target.fn is not raw and mod_name.split(".")[0] == package:
                    callees.add(f"{mod_name}.{target.fn.__name__}")
            found[key] = JitInfo(key, raw.__name__, mod.__name__, inspect.getsourcefile(raw), (first, first + len(src)),
                                 tuple(sorted(callees)), "inline_asm_elementwise" in "".join(src))
    return found, skipped


def _reachable(key: str, found: dict[str, JitInfo]) -> set[str]:
    seen, todo = set(), [key]
    while todo:
        k = todo.pop()
        for c in found[k].callees if k in found else ():
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


# ------------------------------------------------------------------------------------------ rows


@dataclasses.dataclass
class TargetRow:
    """One kernel (or helper) on one target. ``None`` where a field does not apply or was not read.

    ``kind``: ``"kernel"`` (compiled from its spec), ``"helper"`` (inlined into the kernels in ``used_by``;
    ``compiled`` is ``None`` when no build for this target contains it) or ``"unregistered"`` (no spec and no
    registered caller: ``compiled`` is false). ``spills`` and ``shared`` are bytes; ``occupancy`` is resident
    programs per SM / CU, limited by ``occupancy_limit`` (``"registers"``, ``"shared"``, ``"warps"``).
    ``tensor_cores`` is ``None`` for kernels without a ``tl.dot``. ``load_bytes``: the widest global load per
    thread (16 = 128-bit vectors); ``tma``: operands arrive through TMA bulk copies.
    """

    kernel: str
    target: str
    kind: str = "kernel"
    variant: str = "default"
    module: str = ""
    compiled: bool | None = None
    error: str | None = None
    registers: int | None = None
    spills: int | None = None
    shared: int | None = None
    occupancy: int | None = None
    occupancy_limit: str | None = None
    has_dot: bool | None = None
    tensor_cores: bool | None = None
    mma: str | None = None
    load_bytes: int | None = None
    tma: bool | None = None
    inline_ptx: list[str] = dataclasses.field(default_factory=list)
    fp8_format: str | None = None
    config: str | None = None
    used_by: list[str] = dataclasses.field(default_factory=list)
    compile_s: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _signature(spec: CompileSpec, jf) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, n in enumerate(jf.arg_names):
        if n in spec.constexprs:
            sig[n] = "constexpr"
        elif n in spec.signature:
            sig[n] = spec.signature[n]
        elif n in spec.pointers:
            sig[n] = "*" + spec.pointers[n]
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or n in spec.div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


@contextlib.contextmanager
def _stderr_to(f):
    # MLIR and LLVM print their diagnostics on fd 2, not through Python: catch them for the error column.
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _first_error(exc: BaseException, diagnostics: str) -> str:
    for line in diagnostics.splitlines():
        m = re.search(r"(?:([^/\s]+:\d+:\d+): )?error: (.*)", line)
        if m:
            where = f"{m.group(1)}: " if m.group(1) else ""
            return f"{where}{m.group(2).strip()}"[:240]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:240]


def compile_spec(spec: CompileSpec, target: Target):
    """``triton.compile`` of ``spec`` for ``target``: the compiled kernel (``.asm``, ``.metadata``)."""
    import triton
    from triton.compiler import ASTSource

    jf = jit_function(spec.kernel)
    sig, attrs = _signature(spec, jf)
    src = ASTSource(fn=jf, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
    return triton.compile(src, target=target.gpu_target(), options=opts)


def _occupancy(target: Target, spec: CompileSpec, regs: int | None, shared: int, amd_waves: int | None):
    limits = {"warps": target.max_warps // spec.num_warps}
    if target.vendor == "cuda":
        if regs:
            per_warp = round_up(regs * 32, 256)  # registers are allocated per warp in 256-register units
            limits["registers"] = (target.regs_per_sm // per_warp) // spec.num_warps
        limits["shared"] = target.smem_per_sm // (shared + 1024) if shared else 32  # 1 KB reserved per block
        limits["warps"] = min(limits["warps"], 32)
    else:
        if amd_waves is not None:  # LLVM's waves per SIMD from registers; 4 SIMDs per CU
            limits["registers"] = amd_waves * 4 // spec.num_warps
        if shared:
            limits["shared"] = target.smem_per_sm // shared
    why = min(limits, key=lambda k: limits[k])
    return limits[why], why


def compile_row(key: str, spec: CompileSpec, target: Target, found: dict[str, JitInfo]) -> TargetRow:
    """Compile one spec and read the row (errors become ``compiled=False`` rows, never exceptions)."""
    info = found.get(key)
    row = TargetRow(kernel=info.name if info else key.rsplit(".", 1)[-1], target=target.name, variant=spec.variant,
                    module=info.module if info else key.rsplit(".", 1)[0], config=spec.describe())
    fp8s = {v for v in spec.pointers.values() if v.startswith("fp8")}
    row.fp8_format = {"fp8e4nv": "e4m3fn", "fp8e4b8": "e4m3fnuz"}.get(next(iter(fp8s), ""), None)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as diag:
        try:
            with _stderr_to(diag):
                ck = compile_spec(spec, target)
        except Exception as e:  # report every kernel, not only the first failure
            diag.seek(0)
            row.compiled, row.error = False, _first_error(e, diag.read())
            row.compile_s = round(time.perf_counter() - t0, 2)
            return row
    row.compile_s = round(time.perf_counter() - t0, 2)
    row.compiled = True
    ttir = ck.asm["ttir"]
    row.shared = int(ck.metadata.shared)
    dots = _asm.dot_types(ttir)
    row.has_dot = bool(dots)
    amd_waves = None
    if target.vendor == "cuda":
        asm = ck.asm["ptx"]
        res = _asm.cuobjdump_resources(ck.asm["cubin"])
        row.registers = res.get("REG")
        row.spills = res.get("LOCAL", 0) + res.get("STACK", 0)
        row.load_bytes, row.tma = _asm.ptx_loads(asm)
    else:
        asm = ck.asm["amdgcn"]
        res = _asm.amd_resources(asm)
        row.registers, row.spills, amd_waves = res.get("vgprs"), res.get("scratch"), res.get("waves")
        row.load_bytes, row.tma = _asm.amd_loads(asm), False
    row.occupancy, row.occupancy_limit = _occupancy(target, spec, row.registers, row.shared, amd_waves)
    if row.shared > target.smem_per_program:  # compiles, but the launch raises OutOfResources
        row.error = (f"needs {row.shared} bytes of shared memory / LDS per program; {target.name} has "
                     f"{target.smem_per_program}")
    if row.has_dot:
        row.mma, row.tensor_cores = _asm.mma_instructions(asm, target.vendor, target.arch, dots)
    # Which helpers this build inlined: their source lines appear in the TTIR's locations.
    locs = _asm.loc_lines(ttir)
    used = [k for k in _reachable(key, found)
            if any(f == found[k].file and found[k].lines[0] <= ln < found[k].lines[1] for f, ln in locs)]
    row.used_by = sorted(used)  # for a kernel row: the helpers it uses (inverted into helper rows later)
    row.inline_ptx = sorted(found[k].name for k in used if found[k].inline_asm)
    if "tt.elementwise_inline_asm" in ttir and not row.inline_ptx:
        row.inline_ptx = ["<inline asm outside a helper>"]
    return row


def _specs(key: str, target: Target) -> list[CompileSpec]:
    out = _SPECS[key](target)
    return [] if out is None else ([out] if isinstance(out, CompileSpec) else list(out))


def _job(args: tuple[str, str, int]) -> dict:
    key, tname, i = args
    found, _ = discover()
    return compile_row(key, _specs(key, TARGETS[tname])[i], TARGETS[tname], found).as_dict()


def _interpreted_kernels() -> bool:
    from moekit import platform

    return platform.triton_interpreted()


def compile_matrix(targets: list[str] | None = None, *, jobs: int = 1, timeout_s: float = 900) -> list[TargetRow]:
    """Compile every registered kernel for ``targets`` (default: all four) and return the table's rows.

    Rows: one per kernel variant x target (``kind="kernel"``), one per device helper x target
    (``kind="helper"``), one per unregistered jitted function x target (``kind="unregistered"``,
    ``compiled=False``), ordered by kernel, variant, target. ``jobs > 1`` compiles in that many worker
    processes. Needs no GPU. In a process where Triton runs in its interpreter the work runs in a child
    process (``TRITON_INTERPRET=0``); ``timeout_s`` bounds it. Raises ``ValueError`` on an unknown target.
    """
    names = list(TARGETS) if targets is None else list(targets)
    bad = [n for n in names if n not in TARGETS]
    if bad:
        raise ValueError(f"targets must be among {list(TARGETS)}, got {bad}")
    if _interpreted_kernels():
        return _matrix_in_child(names, jobs, timeout_s)
    found, _ = discover()
    # A spec whose key names no jitted function (renamed, moved) must not pass silently.
    stale = [TargetRow(k.rsplit(".", 1)[-1], n, module=k.rsplit(".", 1)[0], compiled=False,
                       error=f"a compile spec is registered for {k}, but moekit has no such @triton.jit function")
             for k in registered() if k not in found for n in names]
    job_list = [(k, n, i) for k in registered() if k in found for n in names
                for i in range(len(_specs(k, TARGETS[n])))]
    if jobs > 1 and len(job_list) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            kernel_rows = [TargetRow(**d) for d in pool.map(_job, job_list)]
    else:
        kernel_rows = [compile_row(k, _specs(k, TARGETS[n])[i], TARGETS[n], found) for k, n, i in job_list]
    return stale + _with_helper_rows(kernel_rows, found, names)


def _with_helper_rows(kernel_rows: list[TargetRow], found: dict[str, JitInfo], names: list[str]) -> list[TargetRow]:
    covered = set(registered())
    for k in registered():
        covered |= _reachable(k, found)
    rows = list(kernel_rows)
    users: dict[tuple[str, str], list[TargetRow]] = {}
    for r in kernel_rows:
        for h in r.used_by:
            users.setdefault((h, r.target), []).append(r)
    for key, info in sorted(found.items()):
        if key in _SPECS:
            continue
        for n in names:
            row = TargetRow(kernel=info.name, target=n, module=info.module)
            if key not in covered:
                row.kind, row.compiled = "unregistered", False
                row.error = "no compile spec registered and no registered kernel calls it (moekit.kernels.targets)"
            else:
                row.kind = "helper"
                by = users.get((key, n), [])
                row.used_by = sorted({f"{r.kernel}[{r.variant}]" if r.variant != "default" else r.kernel for r in by})
                if by:
                    row.compiled = all(r.compiled for r in by)
                    row.inline_ptx = [info.name] if info.inline_asm else []
                else:
                    row.error = INTERPRETER_ONLY.get(key, "not in this target's builds")
            rows.append(row)
    for r in kernel_rows:  # kernel rows list helpers in used_by during compilation; keep the names readable
        r.used_by = sorted(found[h].name for h in r.used_by if h in found)
    return rows


def _matrix_in_child(names: list[str], jobs: int, timeout_s: float) -> list[TargetRow]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (it warns when unset)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "moekit.kernels.targets", "--json", "--jobs", str(jobs), "--target", *names]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"compiling the target matrix failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return [TargetRow(**d) for d in json.loads(r.stdout)]


# ------------------------------------------------------------------------------------------ output

COLUMNS = ("kernel", "variant", "target", "compiled", "registers", "spills", "shared", "occupancy", "tensor_cores",
           "mma", "load_bytes", "inline_ptx", "fp8_format", "config", "error")


def green(row: TargetRow) -> bool:
    """Whether a row meets the bar: compiled, no spills, dots on tensor cores, no inline PTX on AMD."""
    if row.kind == "helper":
        return row.compiled is not False
    if not row.compiled or row.error:
        return False
    if row.spills or (row.has_dot and not row.tensor_cores):
        return False
    return not (TARGETS[row.target].vendor == "hip" and row.inline_ptx)


SUMMARY_HEADER = ("kernel", "variant", "target", "ok", "regs", "spills", "shared", "occupancy", "tensor cores",
                  "loads", "inline PTX", "fp8", "config / error")


def _mma_family(mma: str | None) -> str:
    first = (mma or "").split(",")[0]
    for pre, short in (("wgmma", "wgmma"), ("tcgen05", "tcgen05"), ("mma.sync", "mma.sync")):
        if first.startswith(pre):
            return f"{short} {'e4m3' if 'e4m3' in first or 'f8f6f4' in first else first.rsplit('.', 2)[-2]}"
    return first.removeprefix("v_mfma_f32_")


def summary_cells(r: TargetRow) -> list[str]:
    """One kernel row as the table's cells (:data:`SUMMARY_HEADER`), for Markdown and ``moekit info``."""
    if not r.compiled:
        return [r.kernel, r.variant, r.target, "**no**", "", "", "", "", "", "", "", r.fp8_format or "",
                f"error: {r.error}"]
    if not r.has_dot:
        tc = "n/a (no dot)"
    else:
        tc = ("yes " if r.tensor_cores else "**no** ") + f"({_mma_family(r.mma)})"
    loads = (f"{r.load_bytes} B" if r.load_bytes else "") + (" + TMA" if r.tma else "")
    occ = f"{r.occupancy} ({r.occupancy_limit})" if r.occupancy is not None else ""
    tail = f"{r.config}; {r.error}" if r.error else (r.config or "")
    return [r.kernel, r.variant, r.target, "yes" if green(r) else "**no**", str(r.registers), str(r.spills),
            str(r.shared), occ, tc, loads.strip(), ", ".join(r.inline_ptx) or "none", r.fp8_format or "", tail]


def to_markdown(rows: list[TargetRow]) -> str:
    """The table as Markdown: kernel rows, then one line per helper with the kernels that inline it."""
    out = ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    for r in rows:
        if r.kind != "helper":
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in summary_cells(r)) + " |")
    helpers: dict[str, list[TargetRow]] = {}
    for r in rows:
        if r.kind == "helper":
            helpers.setdefault(r.kernel, []).append(r)
    if helpers:
        out += ["", "Device helpers, inlined into the kernels (variants included) on the targets named:", ""]
        for name, hs in helpers.items():
            used = [h.target for h in hs if h.used_by]
            callers = sorted({u.split("[")[0] for h in hs for u in h.used_by})
            line = f"- `{name}`: " + (f"in {', '.join(callers)} on {', '.join(used)}" if used else "in no GPU build")
            absent = sorted({h.error for h in hs if not h.used_by and h.error})
            if absent:
                others = [h.target for h in hs if not h.used_by]
                line += f"; {', '.join(others)}: {'; '.join(absent)}"
            out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moekit.kernels.targets", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    ap.add_argument("--markdown", action="store_true", help="print the kernel rows as a Markdown table")
    ap.add_argument("--target", nargs="+", choices=list(TARGETS), help="default: all")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    args = ap.parse_args(argv)
    rows = compile_matrix(args.target, jobs=args.jobs)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    elif args.markdown:
        print(to_markdown(rows))
    else:
        for r in rows:
            print(" ".join(f"{c}={getattr(r, c)}" for c in COLUMNS if getattr(r, c) not in (None, [], "")))
    return 0 if all(green(r) for r in rows) else 1


if __name__ == "__main__":
    # Run the importable module's main (its registry and worker functions), not a second copy named __main__.
    from moekit.kernels import targets as _targets

    sys.exit(_targets.main())
