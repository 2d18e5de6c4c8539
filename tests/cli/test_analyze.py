"""``utilrank analyze`` end to end, its layer selection and a report from saved statistics, and its one-line
errors."""

import json

import pytest
from _data import make_imagefolder

from utilrank_kernels.analysis import Statistics, build_report, compute_subspaces
from utilrank_kernels.cli import main
from utilrank_kernels.models import load_model_and_data


@pytest.mark.slow
def test_cli_analyze_builtin(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "--out", str(out), "--checkpoint-every", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "utilrank.report/1" and report["model"] == "vit-digits"
    assert 0 < report["mlu"] < 1
    assert (out / "utilization.png").stat().st_size > 10_000
    assert (out / "stats.safetensors").is_file() and not (out / "stats.ckpt.safetensors").exists()
    assert "MLU" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze", "--model", "no_such_model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no_such_model" in err
    assert main(["analyze", "--data", str(tmp_path / "missing"), "--model", "resnet18", "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["analyze", "--resume", "--out", str(tmp_path / "fresh")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_include_exclude_and_a_report_from_saved_statistics(tmp_path, capsys, one_thread):
    """``--exclude`` leaves layers out of the report and the MLU (the pass still keeps every layer's statistics);
    ``--stats FILE`` builds a report at a new energy, of other layers, with no pass and no new statistics file."""
    data = make_imagefolder(tmp_path / "img", per_class=4, size=16)
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["analyze", "--model", "test_vit", "--data", str(data), "--batch-size", "8"]
    assert main([*common, "--exclude", "head", "--exclude", "*.attn.proj", "--out", str(first)]) == 0
    report = json.loads((first / "report.json").read_text())
    names = [row["name"] for row in report["layers"]]
    assert "head" not in names and not any(n.endswith("attn.proj") for n in names) and "blocks.0.mlp.fc1" in names
    assert {"name": "head", "reason": "excluded by filter"} in report["skipped"]
    stats = Statistics.load(first / "stats.safetensors")
    assert "head" in stats.layers  # the file serves any later selection
    capsys.readouterr()

    assert main([*common, "--stats", str(first / "stats.safetensors"), "--energy", "0.9", "--include", "blocks.*.mlp.*",
                 "--out", str(second)]) == 0
    captured = capsys.readouterr()
    assert "statistics:" not in captured.err  # no pass
    again = json.loads((second / "report.json").read_text())
    assert again["energy"] == 0.9 and {row["name"] for row in again["layers"]} == {
        f"blocks.{i}.mlp.fc{j}" for i in range(6) for j in (1, 2)}
    assert again["tokens"] == report["tokens"]
    assert sorted(p.name for p in second.iterdir()) == ["manifest.json", "report.json", "utilization.png"]
    assert "stats.safetensors" not in captured.out.splitlines()[-1]
    # the same rows as a report built from the statistics in Python
    model = load_model_and_data("test_vit", str(data)).model
    expected = build_report(model, stats, compute_subspaces(model, stats, progress=False), 0.9)
    rows = {r.name: (r.k_in, r.k_out, r.rank) for r in expected.layers}
    assert all(rows[row["name"]] == (row["k_in"], row["k_out"], row["rank"]) for row in again["layers"])
