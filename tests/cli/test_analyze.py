"""``utilrank analyze`` end to end, its layer selection and a report from saved statistics, and its one-line
errors."""

import json

import numpy as np
import pytest
from _data import make_imagefolder
from PIL import Image

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


def test_sample_bounded_layers_are_flagged_in_the_file_and_the_table(tmp_path, capsys, one_thread):
    """Twelve classes of one image each: the head (64 -> 12) sees one row per training image, fewer than its full
    rank 12: ``report.json`` flags it with its sample count (the statistics' token count), the table marks it and
    warns, and ``mlu_unbounded`` is the mean utilization of the other rows; the token layers saw plenty."""
    data, rng = tmp_path / "img", np.random.default_rng(0)
    for name in "abcdefghijkl":
        (data / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / name / "0.png")
    out = tmp_path / "out"
    assert main(["analyze", "--model", "test_vit", "--data", str(data), "--batch-size", "4", "--include", "head",
                 "--include", "blocks.0.*", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    stats = Statistics.load(out / "stats.safetensors")
    rows = {row["name"]: row for row in report["layers"]}
    for name, row in rows.items():
        assert row["samples"] == stats.layers[name].tokens > 0, name
        assert row["sample_bounded"] == (row["samples"] < min(row["in_features"], row["out_features"])), name
    head = rows["head"]
    assert head["sample_bounded"] and head["samples"] < 12 and head["rank"] <= head["samples"]
    assert not any(row["sample_bounded"] for name, row in rows.items() if name != "head")
    free = [row["utilization"] for name, row in rows.items() if name != "head"]
    assert report["mlu_unbounded"] == pytest.approx(sum(free) / len(free))
    assert report["mlu"] == pytest.approx(sum(row["utilization"] for row in rows.values()) / len(rows))
    head_line = next(line for line in printed.splitlines() if line.startswith("head "))
    assert head_line.rstrip().endswith(f"{head['samples']}!")
    assert f"({report['mlu_unbounded']:.3f} over the {len(free)} not bounded by their samples)" in printed
    assert "warning: 1 of" in printed and "(marked !)" in printed
