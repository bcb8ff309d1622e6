"""FP8 kernels on the GPU: correctness on random data, then speed beside same-run baselines.

Run through ``bench/gpu_suite.sh`` (it sets PYTHONPATH and the time budget). Sections, each in its own
try/except so that one failure still lets the rest print:

1. correctness: every kernel vs its torch reference (and vs the unquantized product, DeepGEMM's measure);
2. fp8_gemm_nt TFLOPS at DeepGEMM's published shapes beside torch._scaled_mm (blockwise 1x128/128x128 if
   this torch takes it, else rowwise) and bf16 torch.matmul;
3. grouped contiguous (4 x 8192 rows, N=4096, K=7168) and masked, beside bf16 per-group matmuls;
4. quantizers' GB/s (PTX and native conversion) beside a plain device copy;
5. fp8_gemm_nt with num_sms=112 (20 SMs left to communication, as in DeepSeek-V3) beside all SMs;
6. fp8_gemm_nt with M-major activation scales beside row-major ones.

Exit codes: 0 all sections ran and every correctness check passed; 1 a check failed or a section raised;
3 no GPU (nothing measured). Full results: ``$OUT/fp8_gpu.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
import traceback

BUDGET_S = float(os.environ.get("MOEKIT_BENCH_BUDGET_S", "200"))
T0 = time.time()
# MOEKIT_BENCH_DRYRUN=1: every section on the CPU through Triton's interpreter at tiny sizes, timed by the
# host clock. It checks this script's plumbing without a GPU; its numbers mean nothing.
DRY = os.environ.get("MOEKIT_BENCH_DRYRUN", "0") == "1"
DEV = "cpu" if DRY else "cuda"


def R(rows: int) -> int:
    """A row count (M), shrunk in a dry run."""
    return max(1, rows // 64) if DRY else rows


def F(features: int) -> int:
    """A feature count (N or K), shrunk to 128 or 256 in a dry run."""
    return (256 if features >= 4096 else 128) if DRY else features

# DeepGEMM's published H800 numbers (deepseek-ai/DeepGEMM README): the goals.
DEEPGEMM_SHAPES = [
    (64, 2112, 7168, 206),
    (128, 7168, 16384, 645),
    (4096, 2112, 7168, 1127),
    (4096, 24576, 1536, 1212),
    (4096, 7168, 16384, 1520),
    (4096, 4096, 7168, 1410),
]
DEEPGEMM_GROUPED_CONTIGUOUS = 1346


def main() -> int:
    if DRY:
        os.environ["MOEKIT_KERNELS"] = "triton"  # kernels in the interpreter, references where asked
    import torch

    if not torch.cuda.is_available() and not DRY:
        print("gpu_suite: no CUDA/ROCm GPU visible to torch "
              f"(torch {torch.__version__}); nothing measured. Exit code 3.")
        return 3
    # moekit before anything imports triton: it picks Triton's mode (the interpreter without a GPU).
    from moekit import platform
    from moekit.kernels import ptx

    torch.manual_seed(0)  # every input below is drawn from this seed: a verdict never depends on the draw
    info = platform.info()
    tag = f"{info.device_name}, {info.sm_count} SMs, torch {torch.__version__}, triton {info.triton_version}, " \
          f"{datetime.date.today().isoformat()}, PTX {'on' if info.ptx_enabled else 'off'} ({info.ptx_reason})"
    print("gpu_suite:", tag, flush=True)
    results: dict = {"tag": tag, "sections": {}}
    failed = False
    sections = [("correctness", section_correctness), ("gemm", section_gemm), ("grouped", section_grouped),
                ("quant", section_quant), ("num_sms", section_num_sms), ("scale_layout", section_scale_layout)]
    for name, fn in sections:
        if time.time() - T0 > BUDGET_S:
            print(f"[{name}] skipped: time budget of {BUDGET_S:.0f} s spent", flush=True)
            results["sections"][name] = {"skipped": "time budget"}
            continue
        t = time.time()
        try:
            rows, ok = fn(torch, ptx)
            results["sections"][name] = {"rows": rows, "ok": ok, "seconds": round(time.time() - t, 1)}
            failed |= not ok
            print(f"[{name}] done in {time.time() - t:.1f} s{'' if ok else ' -- CHECK FAILED'}", flush=True)
        except Exception as e:  # one broken section must not hide the others
            failed = True
            results["sections"][name] = {"error": repr(e), "traceback": traceback.format_exc()}
            print(f"[{name}] FAILED: {e!r}\n{traceback.format_exc()}", flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "fp8_gpu.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print_summary(results)
    print(f"gpu_suite: {time.time() - T0:.0f} s in all; {'FAILURES above' if failed else 'all checks passed'}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- helpers
def bench_ms(fn) -> float:
    """Median milliseconds (events, L2 flushed between runs by Triton's do_bench)."""
    import triton.testing

    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


@contextlib.contextmanager
def tma_env(on: bool):
    """Run the GEMMs with operands through TMA descriptors (MOEKIT_TMA=1) or pointers, inside the block."""
    old = os.environ.get("MOEKIT_TMA")
    os.environ["MOEKIT_TMA"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MOEKIT_TMA", None)
        else:
            os.environ["MOEKIT_TMA"] = old


def finite(t) -> bool:
    return bool(t.isfinite().all())


def poisoned(torch, shape, dtype):
    """Hand the caching allocator a NaN-filled block, so an unwritten output shows up as non-finite."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    del t


def quantized_operands(torch, m, n, k, groups=None):
    from moekit.kernels import per_block_quant, per_token_group_quant

    lead = () if groups is None else (groups,)
    a = torch.randn(*lead, m, k, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(*lead, n, k, device=DEV, dtype=torch.bfloat16)
    return a, b, per_token_group_quant(a), per_block_quant(b)


# -------------------------------------------------------------------------------------------- sections
def section_correctness(torch, ptx):
    from moekit.kernels import (
        fp8_gemm_nt,
        grouped_fp8_linear,
        m_grouped_fp8_gemm_nt_contiguous,
        m_grouped_fp8_gemm_nt_masked,
        per_block_quant,
        per_token_group_quant,
    )
    from moekit.kernels.reference import calc_diff

    rows, ok = [], True

    def record(name, value, limit, note=""):
        nonlocal ok
        good = value == value and value <= limit  # NaN fails
        ok &= good
        rows.append({"check": name, "value": value, "limit": limit, "ok": good, "note": note})
        print(f"  {'ok  ' if good else 'FAIL'} {name}: {value:.3g} (limit {limit:g}) {note}", flush=True)

    # Quantizers: bit-compare with the torch reference on the GPU. A mismatch fraction, not zero: fp32
    # division on the GPU may differ from the CPU's in the last bit, which flips a rounding tie rarely.
    x = torch.randn(R(4096), F(7168), device=DEV, dtype=torch.bfloat16) * 4
    w = torch.randn(8, F(512), F(7168), device=DEV, dtype=torch.bfloat16)
    for fmt in (None, "ue8m0"):
        want = per_token_group_quant(x, scale_fmt=fmt, backend="torch")
        wb = per_block_quant(w, scale_fmt=fmt, backend="torch")
        for use_ptx in (False, True):
            if use_ptx and not ptx.cvt_mode(True) == ptx.CVT_PTX:
                continue
            got = per_token_group_quant(x, scale_fmt=fmt, backend="triton", use_ptx=use_ptx)
            bad = (got.data.view(torch.uint8) != want.data.view(torch.uint8)).float().mean().item()
            sbad = (got.scales != want.scales).float().mean().item()
            record(f"token quant {fmt or 'fp32'} ptx={use_ptx} data mismatch", bad, 1e-4)
            record(f"token quant {fmt or 'fp32'} ptx={use_ptx} scale mismatch", sbad, 1e-4)
            gb = per_block_quant(w, scale_fmt=fmt, backend="triton", use_ptx=use_ptx)
            bad = (gb.data.view(torch.uint8) != wb.data.view(torch.uint8)).float().mean().item()
            record(f"block quant {fmt or 'fp32'} ptx={use_ptx} data mismatch", bad, 1e-4)
            record(f"block quant {fmt or 'fp32'} ptx={use_ptx} scale mismatch",
                   (gb.scales != wb.scales).float().mean().item(), 0)

    # GEMMs write bf16 here (as in the timed runs, so that no extra variant compiles): against the fp32
    # reference the bf16 rounding alone gives ~5e-6 of DeepGEMM's measure; a wrong tile gives >1e-3.
    tol = 2e-5
    for m, n, k in [(R(64), F(2112), F(7168)), (R(4096), F(4096), F(7168)), (R(1000), F(576), F(1536))]:
        a, b, qa, qb = quantized_operands(torch, m, n, k)
        ref = fp8_gemm_nt(*qa, *qb, out_dtype=torch.float32, backend="torch")
        poisoned(torch, (m, n), torch.bfloat16)
        out = fp8_gemm_nt(*qa, *qb)
        record(f"fp8_gemm_nt {m}x{n}x{k} vs reference", calc_diff(out, ref), tol, f"finite={finite(out)}")
        # Both operands rounded to e4m3 (3 mantissa bits: relative rms error ~2^-4/sqrt(3) each, ~0.05 per
        # product): DeepGEMM's measure is ~err^2/2 ~ 1.3e-3 at worst for random data; a wrong scale or tile
        # gives > 1e-2. (1e-3 was within 1.2x of what K=128 inputs reach: a flaky bound.)
        record(f"fp8_gemm_nt {m}x{n}x{k} vs bf16 product", calc_diff(out, a.float() @ b.float().T), 3e-3)
        out112 = fp8_gemm_nt(*qa, *qb, num_sms=112)
        record(f"fp8_gemm_nt {m}x{n}x{k} num_sms=112 vs all SMs", calc_diff(out112, out), 1e-6)
        with tma_env(True):  # operands through TMA descriptors (MOEKIT_TMA=1; opt-in until measured)
            poisoned(torch, (m, n), torch.bfloat16)
            out = fp8_gemm_nt(*qa, *qb)
        record(f"fp8_gemm_nt {m}x{n}x{k} TMA vs reference", calc_diff(out, ref), tol, f"finite={finite(out)}")

    # Grouped contiguous: uneven groups, an empty one, -1 padding rows (pointer and TMA loads).
    g, n, k = 6, F(1024), F(2048)
    counts = [R(300 * 64), 0, 1, R(128 * 64), R(555 * 64), R(40 * 64)]
    idx = []
    for e, c in enumerate(counts):
        idx += [e] * c + [-1] * ((-c) % 128)
    m_indices = torch.tensor(idx, dtype=torch.int32, device=DEV)
    a = torch.randn(len(idx), k, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(g, n, k, device=DEV, dtype=torch.bfloat16)
    qa, qb = per_token_group_quant(a), per_block_quant(b)
    ref = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices, out_dtype=torch.float32, backend="torch")
    for tma in (False, True):
        with tma_env(tma):
            poisoned(torch, (len(idx), n), torch.bfloat16)
            out = m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices)
        record(f"grouped contiguous{' TMA' if tma else ''} vs reference", calc_diff(out, ref), tol,
               f"finite={finite(out)}")
        record(f"grouped contiguous{' TMA' if tma else ''} -1 rows nonzero", float((out[m_indices < 0] != 0).sum()), 0)

    # Masked: 0, M_max and partial rows.
    g, m_max = 4, 256
    a, b, qa, qb = quantized_operands(torch, m_max, F(2048), F(7168), groups=g)
    masked_m = torch.tensor([0, m_max, m_max // 3, m_max // 2], dtype=torch.int32, device=DEV)
    ref = m_grouped_fp8_gemm_nt_masked(*qa, *qb, masked_m, 128, out_dtype=torch.float32, backend="torch")
    for tma in (False, True):
        with tma_env(tma):
            poisoned(torch, (g, m_max, qb.data.shape[1]), torch.bfloat16)
            out = m_grouped_fp8_gemm_nt_masked(*qa, *qb, masked_m, 128)
        record(f"grouped masked{' TMA' if tma else ''} vs reference", calc_diff(out, ref), tol, f"finite={finite(out)}")
    # The e4m3 bound of fp8_gemm_nt's "vs bf16 product" above (~1.3e-3 at worst; seeded inputs give ~7e-4).
    record("grouped masked vs bf16 product (full group)", calc_diff(out[1], a[1].float() @ b[1].float().T), 3e-3)

    # The MoE layer's entry point, forward and backward.
    x = torch.randn(R(3000), F(2048), device=DEV, dtype=torch.bfloat16, requires_grad=True)
    wt = torch.randn(8, F(1024), F(2048), device=DEV, dtype=torch.bfloat16, requires_grad=True)
    mi = torch.randint(-1, 8, (x.shape[0],), device=DEV, dtype=torch.int32)
    y = grouped_fp8_linear(x, mi, wt)
    yr = torch.einsum("mk,mnk->mn", x.float(), wt.float()[mi.clamp(min=0).long()]) * (mi >= 0)[:, None]
    record("grouped_fp8_linear forward vs bf16", calc_diff(y, yr), 1e-3)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, wt), gy)
    rx, rw = torch.autograd.grad(yr, (x, wt), gy.float())
    record("grouped_fp8_linear grad x", calc_diff(gx, rx), 1e-4)
    record("grouped_fp8_linear grad w", calc_diff(gw, rw), 1e-4)
    return rows, ok


def _scaled_mm_baseline(torch, a, b, qa, qb):
    """torch._scaled_mm on the same problem: blockwise if this torch/GPU takes it, else rowwise.

    Returns (label, fn) or (reason, None). Each variant is checked against the unquantized product first.
    """
    from moekit.kernels.reference import calc_diff

    exact = a.float() @ b.float().T
    sa, sb = qa.scales, qb.scales
    variants = [
        ("blockwise", lambda: torch._scaled_mm(qa.data, qb.data.T, sa.T.contiguous().T, sb.T,
                                               out_dtype=torch.bfloat16)),
        ("blockwise", lambda: torch._scaled_mm(qa.data, qb.data.T, sa, sb.T.contiguous(),
                                               out_dtype=torch.bfloat16)),
    ]
    errors = []
    for label, fn in variants:
        try:
            if calc_diff(fn(), exact) < 2e-3:
                return label, fn
            errors.append(f"{label}: wrong result")
        except Exception as e:  # noqa: BLE001 - try the next layout
            errors.append(f"{label}: {str(e).splitlines()[0][:80]}")
    # Rowwise: one scale per row of a and per row of b (coarser than the 1x128 recipe).
    ra = a.float().abs().amax(1, keepdim=True).clamp_min(1e-4) / 448
    rb = b.float().abs().amax(1, keepdim=True).clamp_min(1e-4) / 448
    a8 = (a.float() / ra).to(torch.float8_e4m3fn)
    b8 = (b.float() / rb).to(torch.float8_e4m3fn)
    rbt = rb.T.contiguous()

    def rowwise():
        return torch._scaled_mm(a8, b8.T, ra, rbt, out_dtype=torch.bfloat16)

    try:
        if calc_diff(rowwise(), exact) < 2e-3:
            return "rowwise", rowwise
        errors.append("rowwise: wrong result")
    except Exception as e:  # noqa: BLE001
        errors.append(f"rowwise: {str(e).splitlines()[0][:80]}")
    return "; ".join(errors), None


def _gemm_row(torch, m, n, k, goal):
    from moekit.kernels import fp8_gemm_nt

    a, b, qa, qb = quantized_operands(torch, m, n, k)
    flops = 2 * m * n * k
    with tma_env(False):
        t_ours = bench_ms(lambda: fp8_gemm_nt(*qa, *qb))
    with tma_env(True):
        t_tma = bench_ms(lambda: fp8_gemm_nt(*qa, *qb))
    t_bf16 = bench_ms(lambda: a @ b.T)
    label, smm = _scaled_mm_baseline(torch, a, b, qa, qb)
    t_smm = bench_ms(smm) if smm is not None else float("nan")
    row = {"M": m, "N": n, "K": k, "moekit_tflops": flops / t_ours / 1e9, "moekit_tma_tflops": flops / t_tma / 1e9,
           "scaled_mm": label, "scaled_mm_tflops": flops / t_smm / 1e9, "bf16_tflops": flops / t_bf16 / 1e9,
           "deepgemm_h800_tflops": goal}
    row["vs_goal"] = max(row["moekit_tflops"], row["moekit_tma_tflops"]) / goal
    print(f"  {m}x{n}x{k}: moekit {row['moekit_tflops']:.0f} (TMA {row['moekit_tma_tflops']:.0f})  "
          f"_scaled_mm[{label[:40]}] {row['scaled_mm_tflops']:.0f}  bf16 {row['bf16_tflops']:.0f}  "
          f"DeepGEMM {goal} TFLOPS", flush=True)
    return row


def section_gemm(torch, ptx):
    return [_gemm_row(torch, R(m), F(n), F(k), goal) for m, n, k, goal in DEEPGEMM_SHAPES], True


def _contiguous_row(torch):
    from moekit.kernels import m_grouped_fp8_gemm_nt_contiguous, per_block_quant, per_token_group_quant

    g, per, n, k = 4, R(8192), F(4096), F(7168)
    a = torch.randn(g * per, k, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(g, n, k, device=DEV, dtype=torch.bfloat16)
    qa, qb = per_token_group_quant(a), per_block_quant(b)
    m_indices = torch.arange(g, device=DEV, dtype=torch.int32).repeat_interleave(per)
    flops = 2 * g * per * n * k
    t = bench_ms(lambda: m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices))
    with tma_env(True):
        t_tma = bench_ms(lambda: m_grouped_fp8_gemm_nt_contiguous(*qa, *qb, m_indices))

    def bf16_loop():
        for e in range(g):
            a[e * per:(e + 1) * per] @ b[e].T

    t_bf16 = bench_ms(bf16_loop)
    print(f"  contiguous: moekit {flops / t / 1e9:.0f} (TMA {flops / t_tma / 1e9:.0f})  bf16 loop "
          f"{flops / t_bf16 / 1e9:.0f}  DeepGEMM {DEEPGEMM_GROUPED_CONTIGUOUS} TFLOPS", flush=True)
    return {"kernel": "contiguous 4x8192, N=4096, K=7168", "moekit_tflops": flops / t / 1e9,
            "moekit_tma_tflops": flops / t_tma / 1e9, "bf16_tflops": flops / t_bf16 / 1e9,
            "deepgemm_h800_tflops": DEEPGEMM_GROUPED_CONTIGUOUS}


def section_grouped(torch, ptx):
    rows = [_contiguous_row(torch)]
    m_max, expected = (32, 24) if DRY else (256, 192)
    for g, n, k in [(8, F(4096), F(7168)), (8, F(7168), F(2048))]:
        rows.append(_masked_row(torch, g, m_max, expected, n, k))
    return rows, True


def _masked_row(torch, g, m_max, expected, n, k):
    from moekit.kernels import m_grouped_fp8_gemm_nt_masked

    a, b, qa, qb = quantized_operands(torch, m_max, n, k, groups=g)
    masked_m = torch.randint(expected // 2, m_max + 1, (g,), device=DEV, dtype=torch.int32)
    flops = 2 * int(masked_m.sum()) * n * k
    t = bench_ms(lambda: m_grouped_fp8_gemm_nt_masked(*qa, *qb, masked_m, expected))
    with tma_env(True):
        t_tma = bench_ms(lambda: m_grouped_fp8_gemm_nt_masked(*qa, *qb, masked_m, expected))
    t_bf16 = bench_ms(lambda: torch.bmm(a, b.transpose(1, 2)))  # all M_max rows: an upper bound of work
    name = f"masked G={g} M_max={m_max} N={n} K={k}"
    print(f"  {name}: moekit {flops / t / 1e9:.0f} (TMA {flops / t_tma / 1e9:.0f})  bf16 bmm "
          f"{flops / t_bf16 / 1e9:.0f} TFLOPS (valid rows)", flush=True)
    return {"kernel": name, "moekit_tflops": flops / t / 1e9, "moekit_tma_tflops": flops / t_tma / 1e9,
            "bf16_bmm_tflops_on_valid_rows": flops / t_bf16 / 1e9}


def section_quant(torch, ptx):
    from moekit.kernels import per_block_quant, per_token_group_quant

    rows = []
    x = torch.randn(R(32768), F(7168), device=DEV, dtype=torch.bfloat16)
    t_copy = bench_ms(lambda: x.clone())
    copy_gbs = 2 * x.numel() * 2 / t_copy / 1e6
    q_bytes = x.numel() * 2 + x.numel() + x.numel() // 128 * 4  # read bf16, write e4m3 + fp32 scales
    w = torch.randn(4 if DRY else 32, F(4096), F(2048), device=DEV, dtype=torch.bfloat16)
    w_bytes = w.numel() * 3 + w.numel() // (128 * 128) * 4
    for use_ptx in (False, True):
        if use_ptx and ptx.cvt_mode(True) != ptx.CVT_PTX:
            continue
        name = "ptx cvt.e4m3x2" if use_ptx else "triton .to(fp8)"
        t = bench_ms(lambda p=use_ptx: per_token_group_quant(x, use_ptx=p))
        tu = bench_ms(lambda p=use_ptx: per_token_group_quant(x, scale_fmt="ue8m0", use_ptx=p))
        tb = bench_ms(lambda p=use_ptx: per_block_quant(w, use_ptx=p))
        row = {"conversion": name, "token_quant_gbs": q_bytes / t / 1e6, "token_quant_ue8m0_gbs": q_bytes / tu / 1e6,
               "block_quant_gbs": w_bytes / tb / 1e6, "copy_gbs": copy_gbs}
        row["token_vs_copy"] = row["token_quant_gbs"] / copy_gbs
        rows.append(row)
        print(f"  {name}: token {row['token_quant_gbs']:.0f} GB/s ({row['token_vs_copy']:.0%} of copy "
              f"{copy_gbs:.0f}), ue8m0 {row['token_quant_ue8m0_gbs']:.0f}, block {row['block_quant_gbs']:.0f} GB/s",
              flush=True)
    return rows, True


def _num_sms_row(torch, m, n, k):
    from moekit.kernels import fp8_gemm_nt

    _, _, qa, qb = quantized_operands(torch, m, n, k)
    flops = 2 * m * n * k
    t_all = bench_ms(lambda: fp8_gemm_nt(*qa, *qb))
    t_112 = bench_ms(lambda: fp8_gemm_nt(*qa, *qb, num_sms=112))
    print(f"  {m}x{n}x{k}: all SMs {flops / t_all / 1e9:.0f}, 112 SMs {flops / t_112 / 1e9:.0f} TFLOPS "
          f"({t_all / t_112:.2f}x)", flush=True)
    return {"M": m, "N": n, "K": k, "all_sms_tflops": flops / t_all / 1e9, "sms112_tflops": flops / t_112 / 1e9,
            "ratio": t_all / t_112}


def section_scale_layout(torch, ptx):
    """fp8_gemm_nt with row-major activation scales (the quantizer's default) vs M-major (DeepGEMM's)."""
    from moekit.kernels import fp8_gemm_nt

    m, n, k = R(4096), F(4096), F(7168)
    _, _, qa, qb = quantized_operands(torch, m, n, k)
    s_mm = qa.scales.T.contiguous().T
    flops = 2 * m * n * k
    t_row = bench_ms(lambda: fp8_gemm_nt(qa.data, qa.scales, *qb))
    t_mm = bench_ms(lambda: fp8_gemm_nt(qa.data, s_mm, *qb))
    print(f"  {m}x{n}x{k}: row-major scales {flops / t_row / 1e9:.0f}, M-major {flops / t_mm / 1e9:.0f} TFLOPS",
          flush=True)
    row = {"M": m, "N": n, "K": k, "row_major_tflops": flops / t_row / 1e9, "m_major_tflops": flops / t_mm / 1e9}
    return [row], True


def section_num_sms(torch, ptx):
    shapes = [(R(4096), F(7168), F(16384)), (R(4096), F(4096), F(7168))]
    return [_num_sms_row(torch, m, n, k) for m, n, k in shapes], True


# --------------------------------------------------------------------------------------------- summary
def print_summary(results: dict) -> None:
    """The short table, printed last (the device tool returns the tail of the output)."""
    lines = []
    sec = results["sections"]

    def get(name):
        s = sec.get(name, {})
        return s.get("rows") or []

    for r in get("gemm"):
        lines.append((f"fp8_gemm_nt {r['M']}x{r['N']}x{r['K']}",
                      f"{r['moekit_tflops']:.0f} / TMA {r['moekit_tma_tflops']:.0f} TFLOPS",
                      f"_scaled_mm {r['scaled_mm_tflops']:.0f} ({r['scaled_mm'][:9]}), bf16 {r['bf16_tflops']:.0f}, "
                      f"DeepGEMM {r['deepgemm_h800_tflops']} ({r['vs_goal']:.0%})"))
    for r in get("grouped"):
        base = r.get("bf16_tflops", r.get("bf16_bmm_tflops_on_valid_rows"))
        extra = f", DeepGEMM {r['deepgemm_h800_tflops']}" if "deepgemm_h800_tflops" in r else ""
        lines.append((r["kernel"], f"{r['moekit_tflops']:.0f} / TMA {r['moekit_tma_tflops']:.0f} TFLOPS",
                      f"bf16 {base:.0f}{extra}"))
    for r in get("quant"):
        lines.append((f"token quant ({r['conversion']})", f"{r['token_quant_gbs']:.0f} GB/s",
                      f"{r['token_vs_copy']:.0%} of copy {r['copy_gbs']:.0f}; block {r['block_quant_gbs']:.0f} GB/s"))
    for r in get("num_sms"):
        lines.append((f"num_sms=112 {r['M']}x{r['N']}x{r['K']}", f"{r['sms112_tflops']:.0f} TFLOPS",
                      f"all SMs {r['all_sms_tflops']:.0f} ({r['ratio']:.2f}x)"))
    for r in get("scale_layout"):
        lines.append((f"a_scales M-major {r['M']}x{r['N']}x{r['K']}", f"{r['m_major_tflops']:.0f} TFLOPS",
                      f"row-major {r['row_major_tflops']:.0f}"))
    checks = get("correctness")
    if checks:
        nbad = sum(not c["ok"] for c in checks)
        lines.append(("correctness", f"{len(checks) - nbad}/{len(checks)} ok", "details in the correctness section"))
    for name, s in sec.items():
        if "error" in s or "skipped" in s:
            lines.append((name, "ERROR" if "error" in s else "skipped", (s.get("error") or s["skipped"])[:70]))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"FP8 kernels — {results['tag']}")
        for col in ("what", "moekit", "baselines (same run) / goal"):
            table.add_column(col)
        from rich.markup import escape

        for row in lines:
            table.add_row(*(escape(c) for c in row))
        Console(width=160).print(table)
    except ImportError:  # the device image may lack rich: plain text
        print(f"FP8 kernels — {results['tag']}")
        for what, ours, base in lines:
            print(f"{what:<44} {ours:>14}   {base}")


if __name__ == "__main__":
    sys.exit(main())
