"""``utilrank bench`` from the command line, and the README tables made from its files."""

import importlib.util
import json
from pathlib import Path

import pytest

from utilrank_kernels import save_compressed
from utilrank_kernels.bench import cut_to_ratio
from utilrank_kernels.cli import main
from utilrank_kernels.models import build_builtin
from utilrank_kernels.models.builtin import VIT_DIGITS_KWARGS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_cli_bench_param_ratio_and_compressed(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--batch-sizes", "2", "--warmup", "1", "--iters", "2", "--no-plot"]
    assert main(["bench", "--model", "vit-digits", "--param-ratio", "0.5", *args, "--out", str(out),
                 "--backend", "torch,triton", "--csv"]) == 0
    text = capsys.readouterr().out
    assert "skipped: backend triton runs on CUDA devices only" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["backend"]) for r in rows] == [("dense", "torch"), ("compressed", "torch")]
    assert rows[1]["param_ratio"] == 0.5 and out.with_suffix(".csv").is_file()

    dense = build_builtin("vit-digits").eval()
    compressed, plan = cut_to_ratio(dense, 0.3, multiple=1, arch="vit-digits")
    config = {"arch": "vit-digits", "source": "builtin", "num_classes": 10, "model_kwargs": VIT_DIGITS_KWARGS}
    save_compressed(compressed, plan, config, tmp_path / "c")
    assert main(["bench", "--compressed", str(tmp_path / "c"), *args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["model"] == "vit-digits" and rows[1]["compressed"] == str(tmp_path / "c")
    assert rows[1]["factored_layers"] == len(plan.layers) and "latency_target" not in rows[1]

    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    readme_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_table)
    (line,) = readme_table.table_rows([out])
    assert line.startswith("| vit-digits | utilrank compress | ") and f"| {rows[1]['speedup']:.2f}x |" in line

    stats_file = tmp_path / "stats.json"  # a benchmarks/stats_pass.py file
    spread = {"median": 0.3, "p20": 0.25, "p80": 0.35}
    stats_file.write_text(json.dumps({"format": "utilrank.bench-stats/1", "rows": [{
        "model": "vit-digits", "device": "cpu", "threads": 2, "overlap": True, "batch_size": 128, "batches": 10,
        "forward_s": {"median": 0.2}, "stats_s": spread, "ratio": 1.5, "round_ratio": spread, "date": "d"}]}))
    assert readme_table.stats_rows([out, stats_file]) == [
        "| vit-digits | cpu | 2 | overlapped | 128 | 10 | 200 | 300 | 1.50x | 0.25-0.35 | d |"]


def test_cli_bench_usage_errors(tmp_path, capsys):
    out = str(tmp_path / "x.json")
    cut = ["--model", "vit-digits", "--param-ratio", "0.5"]
    assert main(["bench", *cut, "--backend", "cuda", "--out", out]) == 2
    assert "no requested backend (cuda) can run on cpu" in capsys.readouterr().err
    assert main(["bench", "--model", "resnet18", "--out", out]) == 2
    assert "--param-ratio" in capsys.readouterr().err
    assert main(["bench", "--compressed", str(tmp_path / "none"), "--out", out]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--dtype", "fp8"])
