"""The CPU-side parts of the GPU kernel benchmarks, on rows made by hand: the small-M dispatch table that
``benchmarks/kernels/cuda_small_m.py`` records is the one the runtime reads, and ``lowrank``'s bars read the
speedups of the rows it checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.kernels import cuda_small_m, lowrank  # noqa: E402
from benchmarks.tools.rows import Row, cuda_timing  # noqa: E402
from utilrank_kernels.ops import _dispatch  # noqa: E402
from utilrank_kernels.timing import Timing  # noqa: E402


def _ms(us: float) -> Timing:
    return Timing(us / 1e3, us / 1e3, us / 1e3)


def test_dispatch_table_is_what_the_runtime_reads(tmp_path, monkeypatch):
    shape = {"m": 1, "in_features": 768, "out_features": 3072, "rank": 307}
    rows = [Row("lowrank_linear", "cuda", "bfloat16", shape, _ms(9.0)),
            Row("lowrank_linear", "triton", "bfloat16", shape, _ms(7.5)),
            Row("lowrank_linear", "torch", "bfloat16", shape, _ms(20.0)),
            Row("lowrank_linear", "dense", "bfloat16", shape, _ms(30.0)),  # not a backend of the op
            Row("lowrank_linear", "cuda", "bfloat16", {**shape, "m": 16}, None, error="RuntimeError: x")]
    table = cuda_small_m.dispatch_table(rows, "NVIDIA H200")
    assert table["entries"] == [{"op": "lowrank_linear", "m": 1, "in_features": 768, "out_features": 3072,
                                 "rank": 307, "dtype": "bfloat16", "fastest": "triton",
                                 "us": {"cuda": 9.0, "triton": 7.5, "torch": 20.0}}]
    path = tmp_path / "results.json"  # a result file holds it under "dispatch"
    path.write_text(json.dumps({"dispatch": table}))
    monkeypatch.setenv("UTILRANK_SMALL_M_TABLE", str(path))
    _dispatch.small_m_table.cache_clear()
    try:
        choice = _dispatch.small_m_choice("lowrank_linear", 1, (768, 3072, 307), torch.bfloat16, device="cpu")
        assert choice == "triton"
        assert _dispatch.small_m_choice("lowrank_linear", 1, (768, 3072, 307), torch.bfloat16, device="cpu",
                                        available=("cuda", "torch")) == "cuda"
    finally:
        _dispatch.small_m_table.cache_clear()


def test_m1_summary_is_cuda_over_torch():
    shape = {"m": 1, "in_features": 768, "out_features": 768, "rank": 192}
    rows = [Row("lowrank_linear", "cuda", "bfloat16", shape, _ms(5.0), {"torch": _ms(10.0)}),
            Row("lowrank_linear", "cuda", "bfloat16", {**shape, "rank": 96}, _ms(2.0), {"torch": _ms(8.0)})]
    got = cuda_small_m.m1_summary(rows)
    assert got["worst"] == 0.5 and abs(got["geomean"] - (0.5 * 0.25) ** 0.5) < 1e-12
    assert cuda_small_m.m1_summary([]) is None


def test_lowrank_targets_read_the_auto_rows():
    small, large = {"M": 16, "in": 768, "out": 3072, "r": 128}, {"M": 12608, "in": 768, "out": 3072, "r": 128}
    mlp = {"M": 12608, "in": 768, "hidden": 3072, "r1": 128, "r2": 128}
    rows = [Row("lowrank_linear", "triton-auto", "bf16", small, _ms(10.0), {"addmm": _ms(14.0)}),
            Row("lowrank_linear", "triton-auto", "bf16", large, _ms(10.0), {"addmm": _ms(11.0)}),
            Row("lowrank_linear", "triton-split", "bf16", large, _ms(20.0), {"addmm": _ms(11.0)}),
            Row("lowrank_mlp", "triton-auto", "bf16", mlp, _ms(10.0), {"two_layers_gelu": _ms(13.0)})]
    got = lowrank.targets(rows)
    assert abs(got["linear_never_slower_than_addmm"]["worst_speedup"] - 1.1) < 1e-9
    assert abs(got["linear_small_m_speedup"]["worst_speedup"] - 1.4) < 1e-9
    assert abs(got["mlp_speedup_at_12608_rows"]["worst_speedup"] - 1.3) < 1e-9


def test_cuda_timing_keeps_every_sample(monkeypatch):
    """``do_bench``'s samples (ms) summarized by ``Timing``'s quantiles, the same as every other benchmark's."""
    testing = pytest.importorskip("triton.testing")
    monkeypatch.setattr(testing, "do_bench", lambda fn, warmup, rep, return_mode: [3.0, 1.0, 2.0, 4.0, 5.0])
    assert cuda_timing(lambda: None) == Timing.of([0.003, 0.001, 0.002, 0.004, 0.005])
    assert cuda_timing(lambda: None).median == 3.0
