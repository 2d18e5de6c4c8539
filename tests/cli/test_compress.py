"""``utilrank compress`` on the built-in default: the headline claim and outputs that agree with each other."""

import json

import pytest

from utilrank_kernels import load_compressed
from utilrank_kernels.cli import main
from utilrank_kernels.compress.summary import CompressSummary, EngineTiming, Target, Variant
from utilrank_kernels.data import load_data
from utilrank_kernels.measure import count_params
from utilrank_kernels.timing import Timing
from utilrank_kernels.train import evaluate


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``utilrank compress`` with every option at its default (the quick start's command): the one run of the suite
    that times the compile engine (every other test passes ``--engines eager``)."""
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


@pytest.mark.slow
def test_default_summary_times_eager_and_compile(default_run):
    """The default ``--engines eager,compile``: the summary times dense and compressed in both engines."""
    _, docs = default_run
    engines = docs["summary"]["engines"]
    assert list(engines) == ["eager", "compile"], docs["summary"]["notes"]
    assert all(t["compressed_ms"] > 0 and t["speedup"] == t["dense_ms"] / t["compressed_ms"] for t in engines.values())


def test_summary_json_and_table():
    """The summary's ``summary.json`` keys (format ``utilrank.summary/1``) and the table the command prints."""
    summary = CompressSummary(
        model="vit-digits", dataset="digits", method="optimal", metric="accuracy",
        engines={"eager": EngineTiming(Timing(2.0, 1.5, 2.5), Timing(1.0, 0.9, 1.1))},
        dense=Variant(0.95, 1000, 8000, Timing(2.0, 1.5, 2.5)), projected=Variant(0.9, 500, 4000),
        compressed=Variant(0.94, 500, 4000, Timing(1.0, 0.9, 1.1)), mlu=0.2, finetune_epochs=3, test_split="val",
        notes=("a note",), warnings=("a warning",), dense_finetuned=Variant(0.96),
        target=Target("params", 0.5, 0.5))
    doc = summary.to_json()
    assert list(doc) == ["format", "model", "dataset", "method", "metric", "engines", "dense", "projected",
                         "compressed", "mlu", "finetune_epochs", "test_split", "latency_batch", "notes", "warnings",
                         "dense_finetuned", "target"]
    assert doc["format"] == "utilrank.summary/1" and doc["latency_batch"] == 32
    assert doc["engines"]["eager"] == {"dense_ms": 2.0, "dense_p20_ms": 1.5, "dense_p80_ms": 2.5, "compressed_ms": 1.0,
                                       "compressed_p20_ms": 0.9, "compressed_p80_ms": 1.1, "speedup": 2.0}
    assert doc["dense"] == {"params": 1000, "flops": 8000, "accuracy": 0.95, "latency_ms": 2.0, "latency_p20_ms": 1.5,
                            "latency_p80_ms": 2.5}
    assert doc["projected"] == {"params": 500, "flops": 4000, "accuracy": 0.9}
    assert doc["dense_finetuned"] == {"accuracy": 0.96}
    assert doc["target"] == {"measure": "params", "fraction": 0.5, "achieved": 0.5}
    json.dumps(doc)
    table = summary.format_table().splitlines()
    assert table[3] == f"{'CPU ms b32 eager':<20}{2.0:>14.2f}{1.0:>14.2f}{0.5:>9.3f}  (speedup 2.00x)"
    assert table[4] == f"{'  p20-p80':<20}{'[1.50-2.50]':>14}{'[0.90-1.10]':>14}"
    assert table[5].startswith("test (= val!) accuracy") and table[5].endswith("-1.00pp")
    assert table[-3].startswith("control: the dense model fine-tuned the same 3 epochs: 96.00%")
    assert table[-2:] == ["note: a note", "warning: a warning"]


@pytest.mark.slow
def test_cli_compress_options(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--finetune-epochs", "1", "--tolerance", "1", "--exclude", "head", "--method", "optimal",
                 "--engines", "eager", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "utilrank.summary/1" and summary["method"] == "optimal"
    assert list(summary["engines"]) == ["eager"]  # --engines eager: no torch.compile
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
