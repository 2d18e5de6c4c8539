"""benchmarks/tools/kernel_resources.py's parts, on the CPU without compiling: the SASS reader (loops from backward
branches, local memory inside them), the occupancy estimate (worked by hand), what --check fails on, and the
recorder: the launchers' real calls, specialized by Triton's own binder for a GPU target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.tools import kernel_resources as kr  # noqa: E402

SASS = """
        Function : _k
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0040*/                   LDL.64 R2, [R1+0x8] ;
        /*0050*/               @P0 BRA 0x20 ;
        /*0060*/                   STL.128 [R1+0x10], R4 ;
        /*0070*/                   BRA 0x90 ;
        /*0080*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
        /*0090*/                   EXIT ;
"""


def test_parse_sass_finds_loops_and_local_memory_inside_them():
    got = kr.parse_sass(SASS)
    # one loop (0x20..0x50: the backward branch); the forward BRA at 0x70 is not a loop
    assert got["loops"] == 1
    assert (got["hmma"], got["hgmma"], got["ldgsts"], got["ldl"], got["stl"]) == (1, 1, 1, 1, 2)
    assert got["local_in_loop"] == 1  # the LDL at 0x40; the STLs at 0x10 and 0x60 are outside


def test_occupancy_by_hand():
    # 255 registers round up to 8192 per warp: 8 warps fit the 65536-register file, one 8-warp block
    assert kr.occupancy(255, 64 * 1024, 8, 90) == pytest.approx(8 / 64)
    # 128 registers: 16 warps by registers (4 blocks of 4); 48 KiB + 1 KiB reserved: 4 blocks in 228 KiB
    assert kr.occupancy(128, 48 * 1024, 4, 90) == pytest.approx(16 / 64)
    # the same on sm_80 (164 KiB per SM): 3 blocks by shared memory
    assert kr.occupancy(128, 48 * 1024, 4, 80) == pytest.approx(12 / 64)
    # tiny kernels are capped by 64 warps per SM
    assert kr.occupancy(32, 0, 4, 80) == pytest.approx(1.0)


def _row(**kw):
    base = {"table": "t", "row": 0, "config": "c", "dtype": "fp16", "target": 80, "labels": ["m b1 x"],
            "status": "ok", "selectable": True, "smem": 1024, "smem_limit": 163 * 1024, "fits": True,
            "local_in_loop": 0, "stack": 0, "hmma": 4, "hgmma": 0}
    return {**base, **kw}


def test_check_fails_on_each_problem_and_only_those():
    assert kr.problems([_row(), _row(row=3, local_in_loop=9, stack=64), _row(row=2, selectable=False, fits=False,
                                                                              smem=200 << 10)], []) == []
    found = kr.problems([
        _row(fits=False, smem=170 << 10),  # a first row over the limit
        _row(row=2, fits=False, smem=200 << 10),  # a selectable row over the limit
        _row(local_in_loop=3, stack=24),  # a first row spilling in its loop
        _row(dtype="bf16", hmma=0),  # a 16-bit compile without tensor cores
        _row(status="error", error="CompilationError: x"),  # a first row that does not compile
    ], [{"function": "k", "arch": "sm_90", "stack": 8, "ldl": 1, "stl": 1}])
    assert len(found) == 6
    assert "first row needs 170.0 KiB" in found[0] and "selectable row needs 200.0 KiB" in found[1]
    assert "inside a loop (3 LDL/STL" in found[2] and "without tensor-core" in found[3]
    assert "does not compile" in found[4] and "CUDA extension k sm_90" in found[5]
    assert kr.problems([_row(dtype="fp32", hmma=0)], []) == []  # fp32 IEEE dots run on the FMA units


def test_recorded_launches_are_specialized_like_the_jit():
    """A real launcher call on CPU tensors is recorded, not run; Triton's binder for sm_90 then gives the
    unit stride a constexpr and the 16-divisible ints the divisibility attribute, as the JIT would."""
    from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton

    with kr.recording() as rec:
        rec.label, rec.dtype = "test", "fp16"
        x = torch.empty(2, 197, 768, dtype=torch.float16)
        a, b = torch.empty(192, 768, dtype=torch.float16), torch.empty(3072, 192, dtype=torch.float16)
        lowrank_linear_triton(x, a, b, None)
    assert [launch.table for launch in rec.launches] == ["lowrank_linear.fused[16-bit]"]
    jobs = kr.make_jobs(rec.launches, [90], "first")
    assert len(jobs) == 1
    job = jobs[0]
    names = list(job.signature)
    assert job.signature["x"] == "*fp16" and job.signature["stride_xk"] == "constexpr"  # unit stride
    assert job.constexprs[(names.index("stride_xk"),)] == 1
    assert job.constexprs[(names.index("BM"),)] == 128 and job.constexprs[(names.index("HAS_BIAS"),)] is False
    divisible = {names[i] for (i,), attr in job.attrs.items() if ["tt.divisibility", 16] in attr}
    assert {"x", "a", "b", "K", "N"} <= divisible and "M" not in divisible  # M = 394 is not a multiple of 16
    assert len(kr.make_jobs(rec.launches, [80, 90], "all")) == 2 * 6  # every row of the table, both targets
