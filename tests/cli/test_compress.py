"""``utilrank compress`` on the built-in default: the headline claim and outputs that agree with each other."""

import json

import pytest

from utilrank_kernels import load_compressed
from utilrank_kernels.cli import main
from utilrank_kernels.data import load_data
from utilrank_kernels.measure import count_params
from utilrank_kernels.train import evaluate


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``utilrank compress`` with every option at its default (the quick start's command)."""
    out = tmp_path_factory.mktemp("compress") / "out"
    assert main(["compress", "--out", str(out)]) == 0
    return out, {name: json.loads((out / f"{name}.json").read_text()) for name in ("summary", "plan", "report")}


@pytest.mark.slow
def test_default_compress_keeps_accuracy_within_its_budget(default_run):
    """The product's claim: compressed test accuracy is at least the dense model's minus the rank search's
    total budget (default: --tolerance 0.5 pp times the searched layers), with fewer parameters and FLOPs."""
    out, docs = default_run
    summary, plan = docs["summary"], docs["plan"]
    budget = plan["total_tolerance"]
    if budget is None:  # the default: the per-layer tolerance summed over the searched layers
        budget = plan["tolerance"] * len(plan["layers"])
    assert summary["compressed"]["accuracy"] >= summary["dense"]["accuracy"] - budget / 100
    assert summary["compressed"]["params"] < 0.5 * summary["dense"]["params"]
    assert summary["compressed"]["flops"] < 0.5 * summary["dense"]["flops"]


@pytest.mark.slow
def test_outputs_agree_with_the_saved_model(default_run):
    """plan.json, report.json, summary.json and model.safetensors tell one story: every rank and every
    parameter count is the saved model's, and the loaded model scores what the summary says."""
    out, docs = default_run
    summary, plan, report = docs["summary"], docs["plan"], docs["report"]
    model = load_compressed(out)
    for row in report["layers"]:
        layer = model.get_submodule(row["name"])
        planned = plan["layers"].get(row["name"])
        assert row["saved_rank"] == (planned["rank"] if planned else None), row["name"]
        assert getattr(layer, "rank", None) == row["saved_rank"], row["name"]
    assert report["saved"]["compressed"] == summary["compressed"]["params"] == count_params(model)
    assert report["saved"]["dense"] == summary["dense"]["params"]
    assert evaluate(model, load_data("digits").test) == pytest.approx(summary["compressed"]["accuracy"])
    assert summary["method"] == plan["method"] and summary["test_split"] == "test"


def test_cli_compress_options(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--finetune-epochs", "1", "--tolerance", "1", "--exclude", "head", "--method", "optimal",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "utilrank.summary/1" and summary["method"] == "optimal"
    plan = json.loads((out / "plan.json").read_text())
    assert "head" not in plan["layers"] and plan["dense"]["head"] == "excluded by filter"
    report = json.loads((out / "report.json").read_text())
    assert "dense" not in report  # the contract's keys, plus the saved model's ranks and counts
    assert set(report) == {"format", "model", "dataset", "energy", "tokens", "mlu", "layers", "skipped", "saved"}
    assert "parameters" in capsys.readouterr().out


def test_compress_accepts_the_latency_options():
    from utilrank_kernels.cli import build_parser

    args = build_parser().parse_args(["compress", "--target-device", "cpu", "--target-batch", "8"])
    assert (args.target_device, args.target_batch) == ("cpu", 8)
    assert build_parser().parse_args(["compress"]).target_device is None
