"""``utilrank analyze`` end to end, and its one-line errors."""

import json

import pytest

from utilrank_kernels.cli import main


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
