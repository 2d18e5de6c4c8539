"""benchmarks/studies/cpu_quant_lowrank.py (issue 26's table): a --quick run on timm's test_vit writes one row per
(parameters, dtype, engine) with its agreement, bytes and speedup over the dense fp32 baseline, and rows with their
reasons for what cannot run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import run as registry  # noqa: E402
from benchmarks.studies import cpu_quant_lowrank as study  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_registered():
    assert registry.REGISTRY["cpu-quant-lowrank"].module == "studies.cpu_quant_lowrank"


def _rows(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "r.json"
    assert study.main(["--quick", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())["rows"]


def test_quick_eager_rows(tmp_path, monkeypatch):
    from utilrank_kernels.bench import modes

    monkeypatch.setattr(modes, "cpu_flags", lambda: frozenset())  # no BF16 instructions: rows say so
    rows = _rows(tmp_path, "--engines", "eager", "--ratios", "0.5")
    by = {r["impl"]: r for r in rows}
    assert list(by) == ["dense fp32 eager", "1 bf16 eager", "0.5 bf16 eager", "1 fp32 eager", "1 int8 eager",
                        "0.5 fp32 eager", "0.5 int8 eager"]
    assert "no BF16 instructions" in by["0.5 bf16 eager"]["error"]
    for impl in ("1 fp32 eager", "0.5 fp32 eager"):
        assert by[impl]["own_logit_cosine"] == pytest.approx(1.0, abs=1e-6)
    for impl in ("1 int8 eager", "0.5 int8 eager"):
        assert by[impl]["own_logit_cosine"] >= 0.99 and by[impl]["speedup_vs_dense_fp32"] > 0
    half = by["0.5 fp32 eager"]
    assert half["flop_ratio"] > 1.3 and half["realized_fraction"] == pytest.approx(
        half["speedup_vs_dense_fp32"] / half["flop_ratio"], rel=1e-3)
    assert by["0.5 int8 eager"]["bytes_on_disk"] < by["0.5 fp32 eager"]["bytes_on_disk"] < by["1 fp32 eager"][
        "bytes_on_disk"]


@pytest.mark.slow
def test_quick_every_engine(tmp_path):
    rows = _rows(tmp_path)
    assert len(rows) == (1 + 3 * 3) * len(study.ENGINES)  # per engine: its own interleaved dense fp32 baseline
    assert [r["baseline_of"] for r in rows if r["impl"] == "dense fp32 eager"] == list(study.ENGINES)
    assert all("error" in r or r["own_logit_cosine"] >= 0.99 for r in rows if r["impl"] != "dense fp32 eager")
