"""benchmarks/studies/vit_b_breakdown.py: operator classes, the realized fraction and its two counterfactuals on
numbers worked by hand, and a smoke run on the built-in ViT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.studies import vit_b_breakdown as vb  # noqa: E402


@pytest.mark.parametrize("name, cls", [
    ("aten::addmm", "gemm"), ("aten.mm.default", "gemm"), ("aten::bmm", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten._scaled_dot_product_flash_attention_for_cpu.default", "attention"), ("aten::_softmax", "attention"),
    ("aten::mkldnn_convolution", "conv"), ("aten.convolution.default", "conv"),
    ("aten::layer_norm", "other"), ("aten::gelu", "other"), ("aten::add", "other"), ("aten::copy_", "other"),
])
def test_op_class(name, cls):
    assert vb.op_class(name) == cls


def test_summarize_by_hand():
    # dense: 80 ms of GEMM for 80 GFLOP (1 GFLOP/ms), 20 ms other; factored: 40 GFLOP of GEMM in 50 ms
    dense = ({"gemm": 80.0, "other": 20.0}, {"gemm": 80.0})
    comp = ({"gemm": 50.0, "other": 20.0}, {"gemm": 40.0})
    s = vb.summarize(0.5, dense, comp)
    assert s["speedup"] == pytest.approx(100 / 70)
    assert s["flop_ratio"] == pytest.approx(2.0)
    assert s["realized_fraction"] == pytest.approx(100 / 70 / 2)
    # at the dense rate the factored GEMMs take 40 ms: 100 / 60 of a 2x FLOP ratio
    assert s["realized_if_gemms_at_dense_rate"] == pytest.approx(100 / 60 / 2)
    # without the 20 ms of other ops: 80 / 50 of 2x
    assert s["realized_if_other_ops_free"] == pytest.approx(80 / 50 / 2)
    assert s["other_share"] == pytest.approx({"dense": 0.2, "compressed": 20 / 70})
    assert s["gemm_gflops_per_s"] == pytest.approx({"dense": 1000.0, "compressed": 800.0})


def test_smoke_on_the_builtin(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert vb.main(["--model", "vit-digits", "--ratios", "0.5", "--batch-size", "4", "--steps", "1",
                    "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    row = doc["rows"][0]
    assert row["compressed_gflop"]["gemm"] < row["dense_gflop"]["gemm"]
    assert row["dense_ms"]["gemm"] > 0 and "realized" in capsys.readouterr().out
