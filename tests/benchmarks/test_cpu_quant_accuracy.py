"""benchmarks/studies/cpu_quant_accuracy.py (issue 26's accuracy cost on trained models): a --quick run on the
trained vit-digits writes one row per (parameters, dtype, engine) with its test top-1, agreement with the dense fp32
model, bytes and speedup, rows with their reasons for what cannot run, and the markdown table of its file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import run as registry  # noqa: E402
from benchmarks.studies import cpu_quant_accuracy as study  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_registered():
    assert registry.REGISTRY["cpu-quant-accuracy"].module == "studies.cpu_quant_accuracy"


@pytest.mark.slow  # the trained vit-digits (cached after the first training) and a fine-tuned compression
def test_quick_rows_and_table(tmp_path, monkeypatch, capsys):
    from utilrank_kernels.bench import modes

    monkeypatch.setattr(modes, "cpu_flags", lambda: frozenset())  # no BF16 instructions: rows say so
    out = tmp_path / "r.json"
    assert study.main(["--quick", "--engines", "eager", "--iters", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    by = {r["impl"]: r for r in rows}
    assert list(by) == ["dense fp32 eager", "1 bf16 eager", "0.5 bf16 eager", "1 fp32 eager", "1 int8 eager",
                        "0.5 fp32 eager", "0.5 int8 eager"]
    assert "no BF16 instructions" in by["0.5 bf16 eager"]["error"]
    assert by["1 fp32 eager"]["top1_agreement"] == 1.0
    assert by["1 fp32 eager"]["test_top1"] == by["dense fp32 eager"]["test_top1"] > 0.8
    for impl in ("1 int8 eager", "0.5 int8 eager"):
        assert by[impl]["own_top1_agreement"] >= 0.95 and by[impl]["test_top1"] > 0.8
        assert by[impl]["bytes_on_disk"] < by[impl.replace("int8", "fp32")]["bytes_on_disk"]
    assert 0.4 < by["0.5 fp32 eager"]["param_fraction"] <= 0.5
    capsys.readouterr()
    assert study.main(["--table", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| vit-digits | 100% | fp32 | eager: baseline of the eager run |" in printed
    assert "int8 eager: test top-1" in printed
