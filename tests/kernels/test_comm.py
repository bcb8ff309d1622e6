"""The symmetric transport's kernels (moekit.kernels.comm) against their plain-torch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.ep.errors import PeerTimeout
from moekit.ep.heap import virtual_heaps
from moekit.ep.transport.symmetric import Channel, SymmetricComm
from moekit.kernels import comm as kc


@settings(max_examples=12, deadline=None)
@given(t=st.integers(0, 70), r=st.integers(1, 8), k=st.sampled_from([1, 2, 5, 80]), p=st.floats(0, 1))
def test_notify_matches_reference(t, r, k, p):
    in_rank = torch.rand(t, r) < p
    pos, counts = kc.notify(in_rank, k)
    want_pos, want_counts = kc.notify_reference(in_rank)
    assert torch.equal(pos, want_pos) and torch.equal(counts, want_counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 40])
def test_combine_rows_is_the_reference_bitwise(dtype, k):
    r, slot, t, w = 4, 12, 9, 200  # width > one block of columns
    rows = (torch.randn(r * slot, w) * 100).to(dtype)
    pos = torch.where(torch.rand(t, r) < 0.6, torch.randint(0, slot - 1, (t, r)), -1).int()
    pos[0] = -1  # a token that went nowhere: zeros
    got = kc.combine_rows(rows, pos, slot, k)
    assert got.dtype == torch.float32 and torch.equal(got, kc.combine_rows_reference(rows, pos, slot))
    assert bool((got[0] == 0).all())
    # Against float64 (each term exact in fp32, sum rounded once per add).
    want = torch.zeros(t, w, dtype=torch.float64)
    for d in range(r):
        ok = pos[:, d] >= 0
        want[ok] += rows[d * slot + 1 + pos[ok, d].long()].double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("k", [1, 2, 7, 64])  # up to more programs than rows
def test_push_rows_matches_reference_within_bounds(k):
    r, words = 3, 1200
    heaps = virtual_heaps(r, 4 * words, guard_bytes=64)
    ref = [torch.zeros(words, dtype=torch.int32) for _ in range(r)]
    ptrs = heaps[0].ptrs
    src = torch.randint(-2 ** 31, 2 ** 31 - 1, (6, 10), dtype=torch.int32)
    counts = [4, 0, 6]
    idx = torch.cat([torch.randint(0, 6, (c,)) for c in counts])
    off = [0, 4, 4, 10]
    flag_off = 2 * k  # flags of (parity 0, source 2): words [2k, 3k)
    kc.push_rows(ptrs, src, idx, torch.tensor(off), 300, flag_off, 5, k)
    kc.push_rows_reference(ref, src, idx, off, 300, flag_off, 5, k)
    for h, want in zip(heaps, ref):
        assert torch.equal(h.buffer.view(torch.int32), want)
        assert h.guards_intact()
    ready = kc.wait_flags(heaps[1].buffer.view(torch.int32)[: 3 * k], 5, 3)
    assert ready.tolist() == [0] * (2 * k) + [1] * k  # only source 2's flags were set


def test_channel_timeout_names_the_missing_rank():
    heaps = virtual_heaps(3, 1 << 16)
    chans = [Channel(h, 2, timeout=0.2) for h in heaps]
    comms = [SymmetricComm(c) for c in chans]
    msg = torch.zeros(3, 5, dtype=torch.int64)
    landings = [comms[s].start(msg.view(torch.uint8).view(3, 40), [1] * 3, [1] * 3) for s in (0, 1)]
    with pytest.raises(PeerTimeout, match=r"rank\(s\) \[2\]"):
        landings[0].arrive()


def test_channel_capacity_fault_writes_nothing_out_of_bounds():
    heaps = virtual_heaps(2, 8192, guard_bytes=4096)
    comms = [SymmetricComm(Channel(h, 3)) for h in heaps]
    rb = 256
    cap = comms[0].channel.slot_rows(rb)
    send = torch.full((2 * (cap + 5), rb), 7, dtype=torch.uint8)
    send[:, :40].view(torch.int64).zero_()  # status words: OK
    ls = [c.start(send, [cap + 5] * 2, [cap + 5] * 2) for c in comms]
    for land in ls:
        rows = land.arrive()["rows"]
        status = rows[0, :40].view(torch.int64).tolist()
        assert status[0] == 64 and status[1] == 0 and status[3] == cap  # HEAP_CAPACITY from rank 0
    assert all(h.guards_intact() for h in heaps)
    # The channel is usable afterwards: a fitting exchange goes through.
    ok = torch.arange(2 * 3 * rb, dtype=torch.int64).to(torch.uint8).view(6, rb)
    ls = [c.start(ok, [3, 3], [3, 3]) for c in comms]
    assert torch.equal(ls[1].arrive()["rows"], torch.cat([ok[3:], ok[3:]]))
    assert all(h.guards_intact() for h in heaps)


_COMPILE = r'''
import json, os, re, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moekit.kernels import comm as C
jobs = [(C._push_rows_kernel, {"ptrs_ptr": "*i64", "src_ptr": "*i32", "idx_ptr": "*i64", "off_ptr": "*i64",
                               "dst_word_off": "i64"}, {"NUM_PROGS": 20, "BLOCK_R": 4, "BLOCK": 512}),
        (C._wait_flags_kernel, {"flags_ptr": "*i32", "ready_ptr": "*i32"}, {"BLOCK": 256}),
        (C._notify_kernel, {"in_rank_ptr": "*i8", "pos_ptr": "*i32", "counts_ptr": "*i64"},
         {"NUM_PROGS": 20, "BLOCK_T": 256}),
        (C._combine_kernel, {"rows_ptr": "*bf16", "pos_ptr": "*i32", "out_ptr": "*fp32"},
         {"NUM_PROGS": 20, "BLOCK_T": 4, "BLOCK": 512})]
out = {}
for target in (GPUTarget("cuda", 90, 32), GPUTarget("hip", "gfx942", 64)):
    for k, ptrs, ce in jobs:
        sig = {n: ("constexpr" if n in ce else ptrs.get(n, "i32")) for n in k.arg_names}
        c = triton.compile(ASTSource(fn=k, signature=sig, constexprs=ce), target=target, options={"num_warps": 4})
        asm = c.asm.get("ptx", "")
        out[f"{target.backend}:{k.__name__}"] = sorted(set(re.findall(r"atom\.[a-z0-9.]+", asm)))
print(json.dumps(out))
'''


@pytest.mark.slow
def test_kernels_compile_for_gpu_targets():
    # Compiled Triton (not this process's interpreter) for sm_90 and gfx942: no interpreter-only code, and
    # on NVIDIA the flags are system-scope release / acquire atomics.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, PYTHONPATH=str(src), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr:
        pytest.skip("this Triton ships no ptxas")
    assert r.returncode == 0, r.stderr[-3000:]
    atoms = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(atoms) == 8
    assert atoms["cuda:_push_rows_kernel"] == ["atom.global.sys.release.exch.b32"]
    assert atoms["cuda:_wait_flags_kernel"] == ["atom.global.sys.acquire.add.u32"]
