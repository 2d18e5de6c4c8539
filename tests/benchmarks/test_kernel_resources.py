"""benchmarks/tools/kernel_resources.py's parts, on the CPU without compiling: the SASS reader (loops from backward
branches, local memory inside them, nvdisasm's labels and line info), the main loops (SASS loops mapped to the
kernel's source loops, trip counts from the launch's shapes, instructions per output tile, all worked by hand),
the occupancy estimate (worked by hand), what --check fails on, the before/after section, and the recorder: the
launchers' real calls, specialized by Triton's own binder for a GPU target."""

from __future__ import annotations

import ast
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


# nvdisasm -gi -c style: branch targets as labels, line info (inlined code: the outermost call site), nested
# loops, and the trap after EXIT (a branch to itself, not a loop)
SASS_LINES = """
.text._k:
	//## File "/k.py", line 3
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
	//## File "/k.py", line 5
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
	//## File "/k.py", line 8
        /*0020*/                   LDG.E R6, desc[UR4][R8.64] ;
.L_x_1:
        /*0030*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24 ;
        /*0040*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0 ;
	//## File "/k.py", line 7
        /*0050*/                   IADD3 R5, R5, 0x40, RZ ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
	//## File "/other.py", line 40 inlined at "/k.py", line 9
        /*0070*/                   MUFU.EX2 R3, R3 ;
	//## File "/k.py", line 9
        /*0080*/                   STG.E desc[UR4][R4.64], R3 ;
	//## File "/k.py", line 5
        /*0090*/               @P1 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_2:
        /*00b0*/                   BRA `(.L_x_2);
"""

# the kernel the listing above stands for (lines relative to its source: the decorator is line 1)
KERNEL = """@triton.jit
def k(x, y, N, K, BN: tl.constexpr, BK: tl.constexpr):
    i, n = tl.program_id(0), tl.num_programs(0)
    k_end = tl.minimum(K, 4 * BK)
    for n0 in range(i * BN, N, BN * n):
        acc = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, k_end, BK):
            acc += tl.load(x + k0 + tl.arange(0, BK))
        tl.store(y + n0, acc)
"""


def test_nvdisasm_labels_line_info_and_nested_loops():
    instrs = kr.sass_instructions(SASS_LINES)
    assert [(hex(a), op) for a, op, _, _ in instrs if op == "BRA"] == [("0x60", "BRA"), ("0x90", "BRA"),
                                                                       ("0xb0", "BRA")]
    assert instrs[6][2] == "0x30" and instrs[9][2] == "0x10"  # labels resolved to addresses
    assert instrs[7][3] == ("/k.py", 9)  # inlined from /other.py: the call site in the kernel
    assert kr.sass_loops(instrs) == [(0x10, 0x90), (0x30, 0x60)]  # the self-branch at 0xb0 is no loop
    got = kr.parse_sass(SASS_LINES)
    assert got["loops"] == 2 and got["hgmma"] == 2
    outer, inner = got["loop_bodies"]
    assert (outer["parent"], outer["instructions"], outer["own"], outer["hgmma"]) == (None, 9, 5, 0)
    assert (inner["parent"], inner["instructions"], inner["own"], inner["hgmma"]) == (0, 4, 4, 2)
    assert outer["lines"] == {"/k.py:5": 2, "/k.py:8": 1, "/k.py:9": 2}
    assert inner["lines"] == {"/k.py:8": 2, "/k.py:7": 2}
    kr.relative_lines(got["loop_bodies"], "/k.py", 1)
    assert inner["lines"] == {"8": 2, "7": 2}


def test_source_loops_trip_counts_from_shapes():
    fdef = ast.parse(KERNEL).body[0]
    env = {"N": 1000, "K": 300, "BN": 128, "BK": 64}
    loops, holder = kr.source_loops(fdef, env, grid=[2])
    # first program: n0 in range(0, 1000, 256) -> 4; k_end = min(300, 256) = 256: k0 in range(0, 256, 64) -> 4
    assert [(lo["var"], lo["line"], lo["end"], lo["parent"], lo["trips"]) for lo in loops] == [
        ("n0", 5, 9, None, 4), ("k0", 7, 8, 0, 4)]
    assert holder == 0  # the store is in the n0 loop
    loops, _ = kr.source_loops(fdef, env, grid=None)  # num_programs unknown: so is n0's trip count
    assert [lo["trips"] for lo in loops] == [None, 4]


def test_source_loops_through_a_jit_helper():
    """A loop's bounds returned by a ``@triton.jit`` helper (the covariance's row split) are followed into it."""
    helper = ast.parse("""@triton.jit
def split(n_rows, BLOCK_K: tl.constexpr):
    i_s, n_s = tl.program_id(1), tl.num_programs(1)
    rows = tl.cdiv(tl.cdiv(n_rows, BLOCK_K), n_s) * BLOCK_K
    start = i_s * rows
    return start, tl.minimum(start + rows, n_rows)
""").body[0]
    kernel = ast.parse("""@triton.jit
def k(x, n_rows, BLOCK_K: tl.constexpr):
    start, end = split(n_rows, BLOCK_K)
    for k0 in range(start, end, BLOCK_K):
        pass
""").body[0]
    # 1000 rows in 3 splits of 32-row blocks: cdiv(cdiv(1000, 32), 3) = 11 blocks, 352 rows for the first program
    loops, holder = kr.source_loops(kernel, {"n_rows": 1000, "BLOCK_K": 32}, [6, 3], {"split": helper})
    assert [lo["trips"] for lo in loops] == [11] and holder is None
    loops, _ = kr.source_loops(kernel, {"n_rows": 1000, "BLOCK_K": 32}, [6, 3], {})  # helper unknown
    assert [lo["trips"] for lo in loops] == [None]


def test_main_loops_instructions_per_output_tile():
    got = kr.parse_sass(SASS_LINES)
    kr.relative_lines(got["loop_bodies"], "/k.py", 1)
    loops, holder = kr.source_loops(ast.parse(KERNEL).body[0], {"N": 1000, "K": 300, "BN": 128, "BK": 64}, [2])
    report = kr.main_loops(got["loop_bodies"], loops, holder)
    assert [(lo["source"], lo["instructions"], lo["hgmma"], lo["iterations"]) for lo in report["loops"]] == [
        ("n0 in range(i * BN, N, BN * n)", 5, 0, 4), ("k0 in range(0, k_end, BK)", 4, 2, 16)]
    # 5 x 4 + 4 x 16 = 84 instructions per program, over 4 output tiles (the n0 loop's iterations)
    assert (report["loop_instructions"], report["tiles"], report["instructions_per_tile"]) == (84, 4, 21)
    assert kr.loops_str(report["loops"]) == "n0:5/0 k0:4/2"


def _body(parent, own, lines, first=0, last=0):
    return {"first": first, "last": last, "parent": parent, "instructions": own, "own": own, "hmma": 0,
            "hgmma": 0, "lines": lines}


def test_map_loops_pipelined_carry_repeats_and_versions():
    loops = [{"line": 5, "end": 9, "var": "n0", "range": "", "parent": None, "trips": 4},
             {"line": 7, "end": 8, "var": "k0", "range": "", "parent": 0, "trips": 3}]
    bodies = [
        _body(None, 10, {"5": 4, "8": 3, "9": 3}, 0, 100),  # the outer loop, with the inner one's prologue
        _body(0, 20, {"8": 19, "9": 1}, 10, 50),  # pipelined: one instruction of the outer loop's lines
        _body(1, 2, {"8": 2}, 20, 30),  # a wait inside the inner loop: a repeat of k0
        _body(0, 6, {"8": 6}, 60, 70),  # a second, smaller version of the inner loop
    ]
    assert kr.map_loops(bodies, loops) == [0, 1, 1, 1]
    report = kr.main_loops(bodies, loops, 0)
    assert [(lo["repeat"], lo["counted"], lo["iterations"]) for lo in report["loops"]] == [
        (False, True, 4), (False, True, 12), (True, True, 12), (False, False, 12)]
    assert report["loop_instructions"] == 10 * 4 + 20 * 12 + 2 * 12  # the version at 60 not counted
    # a SASS loop with no line info maps to nothing: the total is unknown
    bodies[0]["lines"] = {}
    assert kr.main_loops(bodies, loops, 0)["instructions_per_tile"] is None


def test_before_after_section():
    def compile_(row, regs, per_tile, selectable=True, table="lowrank_linear.fused[16-bit]"):
        return {"status": "ok", "table": table, "row": row, "config": "c", "target": 90, "dtype": "bf16",
                "labels": ["vit_b16 b64 fc1 r192 lowrank_linear"], "selectable_for": [selectable], "regs": regs,
                "stack": 0, "local_in_loop": 0, "smem": 2048,
                "per_launch": [[1, per_tile, 99, per_tile * 4 * 8 * 99]],
                "main_loops": [{"source": "k0 in range(0, K, BK)", "instructions": 90, "hmma": 0, "hgmma": 4,
                                "counted": True, "repeat": False}]}
    before = {"triton": "3.8.0", "source": "HEAD", "compiles": [compile_(0, 203, 2900.0), compile_(1, 180, 2500.0),
                                                                 compile_(2, 100, 900.0, selectable=False)]}
    after = {"compiles": [compile_(0, 168, 700.0, table="lowrank_linear.fused[16-bit,gelu]")]}
    lines = kr.before_after_md(before, after)
    row = [ln for ln in lines if ln.startswith("| vit_b16")]
    assert row == ["| vit_b16 b64 fc1 r192 lowrank_linear | lowrank_linear.fused[16-bit] / "
                   "lowrank_linear.fused[16-bit,gelu] | sm_90 | bf16 | 203 → 168 | 0 → 0 | 2.0 → 2.0 | 4 → 4 | "
                   "2,900 → 700 | k0:90/4 → k0:90/4 | 99 → 99 | 9.2 → 2.2 | 2,500 (1) → 700 (0) |"]
    # a renamed table (another family) is paired with what it replaced; an extra kernel stands alone
    after = {"compiles": [compile_(0, 168, 700.0, table="lowrank_linear.chunked[16-bit]"),
                          compile_(0, 64, 300.0, table="lowrank_linear.shrink[16-bit]")]}
    lines = kr.before_after_md(before, after)
    row = [ln.split(" | ")[1:5] for ln in lines if ln.startswith("| vit_b16")]
    assert row == [["lowrank_linear.fused[16-bit] / lowrank_linear.chunked[16-bit]", "sm_90", "bf16", "203 → 168"],
                   ["lowrank_linear.shrink[16-bit]", "sm_90", "bf16", "- → 64"]]
    # one table launched twice for one label (the two linears of a split MLP): two rows
    twice = [compile_(0, 64, 300.0, table="lowrank_linear.shrink[16-bit]") | {"launch_ids": [n]} for n in (7, 9)]
    rows = [ln for ln in kr.before_after_md(before, {"compiles": twice}) if ln.startswith("| vit_b16")]
    assert [r.split(" | ")[1] for r in rows] == ["lowrank_linear.fused[16-bit] / lowrank_linear.shrink[16-bit]",
                                                 "lowrank_linear.shrink[16-bit]"]
    # the kept block of a report made with --before gives the same section
    kept = {" | ".join(map(str, k)): v for k, v in kr.launch_metrics(before["compiles"]).items()}
    block = {"source": "HEAD", "triton": "3.8.0", "before": kept}
    assert kr.before_after_md({**block, "before_after": block}, after) == lines


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
    # rows the launcher never selects on that target may spill or overflow: they never run there
    assert kr.problems([_row(), _row(row=3, selectable=False, local_in_loop=9, stack=64),
                        _row(row=2, selectable=False, fits=False, smem=200 << 10)], []) == []
    found = kr.problems([
        _row(fits=False, smem=170 << 10),  # a first row over the limit
        _row(row=2, fits=False, smem=200 << 10),  # a selectable row over the limit
        _row(local_in_loop=3, stack=24),  # a first row spilling in its loop
        _row(row=3, local_in_loop=2, stack=16),  # a selectable row spilling in its loop
        _row(dtype="bf16", hmma=0),  # a 16-bit compile without tensor cores
        _row(status="error", error="CompilationError: x"),  # a first row that does not compile
    ], [{"function": "k", "arch": "sm_90", "stack": 8, "ldl": 1, "stl": 1}])
    assert len(found) == 7
    assert "first row needs 170.0 KiB" in found[0] and "selectable row needs 200.0 KiB" in found[1]
    assert "first row moves local memory inside a loop (3 LDL/STL" in found[2]
    assert "selectable row moves local memory inside a loop (2 LDL/STL" in found[3]
    assert "without tensor-core" in found[4]
    assert "does not compile" in found[5] and "CUDA extension k sm_90" in found[6]
    assert kr.problems([_row(dtype="fp32", hmma=0)], []) == []  # fp32 IEEE dots run on the FMA units


def test_recorded_launches_are_specialized_like_the_jit():
    """A real launcher call on CPU tensors is recorded, not run; Triton's binder for sm_90 then gives the
    unit stride a constexpr and the 16-divisible ints the divisibility attribute, as the JIT would."""
    from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton

    with kr.recording() as rec:
        rec.label, rec.dtype = "test", "fp16"
        x = torch.empty(63, 197, 768, dtype=torch.float16)  # M 12411 fills the recorded 132 SMs: fused
        a, b = torch.empty(192, 768, dtype=torch.float16), torch.empty(3072, 192, dtype=torch.float16)
        lowrank_linear_triton(x, a, b, None)
    from utilrank_kernels.triton import _autotune

    # the fused path (M = 12411: 194 row blocks): one launch of one of the fused tables
    assert len(rec.launches) == 1 and rec.launches[0].table.startswith("lowrank_linear.fused[16-bit")
    table = _autotune.TABLES[rec.launches[0].table]
    jobs = kr.make_jobs(rec.launches, [90], "first")
    assert len(jobs) == 1
    job = jobs[0]
    names = list(job.signature)
    assert job.signature["x"] == "*fp16" and job.signature["stride_xk"] == "constexpr"  # unit stride
    assert job.constexprs[(names.index("stride_xk"),)] == 1
    assert job.constexprs[(names.index("BM"),)] == table.configs[0].kwargs["BM"]  # the first row's tile
    assert job.constexprs[(names.index("HAS_BIAS"),)] is False
    divisible = {names[i] for (i,), attr in job.attrs.items() if ["tt.divisibility", 16] in attr}
    assert {"x", "a", "b", "K", "N"} <= divisible and "M" not in divisible  # M = 12411 is not a multiple of 16
    # the launch's integer arguments and its grid (for that row), kept per label for the trip counts
    assert job.shapes == [job.shapes[0]] and job.shapes[0]["M"] == 12411 and job.shapes[0]["R"] == 192
    assert job.shapes[0]["grid"][0] == -(-12411 // table.configs[0].kwargs["BM"]) and job.selectable_for == [True]
    # every row of the table, both targets
    assert len(kr.make_jobs(rec.launches, [80, 90], "all")) == 2 * len(table.configs)
