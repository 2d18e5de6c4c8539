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

    readme_table = _readme_table()
    (line,) = readme_table.table_rows([out])
    assert line.startswith("| vit-digits | utilrank compress | ") and f"| {rows[1]['speedup']:.2f}x |" in line
    assert "| eager (2 steps after 1) | auto" in line

    stats_file = tmp_path / "stats.json"  # a benchmarks/models/stats_pass.py file
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
    # --input-size: positive numbers, as many as the model takes, its channels, a size it runs on
    with pytest.raises(SystemExit):
        main(["bench", *cut, "--input-size", "3,0,0"])
    assert "--input-size: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    for size, message in (("16,16", "an image model takes C,H,W"),
                          ("3,16,16", "the model takes 1 input channel, not 3"),
                          ("1,24,24", "the model does not run on it")):
        assert main(["bench", *cut, "--input-size", size, "--out", out]) == 2
        assert f"--input-size {size}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_bench_refuses_an_engine_that_is_not_installed_before_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("utilrank_kernels.cli.bench.missing_packages", lambda names=(): list(names))
    assert main(["bench", "--engine", "eager,onnxruntime", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--engine eager,onnxruntime: needs onnx, onnxruntime, onnxscript" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def _readme_table():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "models" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_block_folder(path):
    """A compressed folder of the built-in ViT cut to one block (what compile and export cost scales with)."""
    kwargs = {**VIT_DIGITS_KWARGS, "depth": 1}
    compressed, plan = cut_to_ratio(build_builtin("vit-digits", **kwargs).eval(), 0.4, multiple=1, arch="vit-digits")
    save_compressed(compressed, plan, {"arch": "vit-digits", "source": "builtin", "num_classes": 10,
                                       "model_kwargs": kwargs}, path)
    return path


@pytest.mark.slow
def test_cli_bench_engines_on_a_compressed_folder(tmp_path, capsys):
    """``--engine eager,compile,onnxruntime`` on CPU: a dense and a compressed row per engine and batch size,
    each pair timed in its engine; the README table keeps them apart."""
    from utilrank_kernels.export import missing_packages

    if missing_packages():
        pytest.skip("the deploy extra (onnx, onnxscript, onnxruntime)")
    folder, out = _one_block_folder(tmp_path / "c"), tmp_path / "e.json"
    assert main(["bench", "--compressed", str(folder), "--engine", "eager,compile,onnxruntime", "--batch-sizes", "2",
                 "--device", "cpu", "--warmup", "1", "--iters", "2", "--no-plot", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["engine"], r["variant"]) for r in rows] == [
        (e, v) for e in ("eager", "compile", "onnxruntime") for v in ("dense", "compressed")]
    assert not any("error" in r for r in rows) and rows[-1]["export_max_abs_error"] < 1e-4
    lines = _readme_table().table_rows([out])
    assert [line.split(" | ")[5].split(" (")[0] for line in lines] == [
        "eager", "compile", f"onnxruntime {rows[-1]['onnxruntime_version']} CPU"]
    for line, row in zip(lines, rows[1::2], strict=True):
        assert f"| {row['speedup']:.2f}x |" in line


def test_cli_bench_engine_errors_fail_the_command_unless_keep_going(tmp_path, capsys, monkeypatch):
    import utilrank_kernels.export as export

    monkeypatch.setattr(export, "missing_packages", lambda names=export.DEPLOY_PACKAGES: list(names))
    folder, out = _one_block_folder(tmp_path / "c"), tmp_path / "e.json"
    argv = ["bench", "--compressed", str(folder), "--engine", "onnxruntime", "--batch-sizes", "1", "--device", "cpu",
            "--warmup", "0", "--iters", "1", "--no-plot", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "2 configuration(s) failed" in err and "onnxruntime torch: onnxruntime: ONNX export needs" in err
    assert [r["error"][:11] for r in json.loads(out.read_text())["rows"]] == ["onnxruntime"] * 2
    assert main([*argv, "--keep-going"]) == 0
    with pytest.raises(SystemExit):
        main(["bench", "--engine", "tvm"])
    assert ("--engine: 'tvm' is not a comma-separated list (choose from eager, compile, compile-freeze, onnxruntime)"
            in capsys.readouterr().err)


def test_cli_bench_fuse_mlps_loads_the_fused_model_with_the_same_outputs(tmp_path, capsys):
    import torch

    from utilrank_kernels.cli import build_parser
    from utilrank_kernels.cli.bench import _models
    from utilrank_kernels.nn import LowRankMlp

    folder = _one_block_folder(tmp_path / "c")
    x = torch.randn(3, 1, 16, 16)
    outputs = []
    for flag, fused in (([], False), (["--fuse-mlps"], True)):
        args = build_parser().parse_args(["bench", "--compressed", str(folder), *flag])
        dense, compressed, _, _, extra = _models(args)
        assert any(isinstance(m, LowRankMlp) for m in compressed.modules()) == fused and extra["fused_mlps"] == fused
        with torch.no_grad():
            outputs.append(compressed.eval()(x))
            # the dense twin multiplies the factors back: the same function
            assert torch.allclose(outputs[-1], dense(x), atol=1e-4)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert main(["bench", "--fuse-mlps", "--device", "cpu"]) == 2
    assert "--fuse-mlps applies to --compressed DIR" in capsys.readouterr().err


def test_cli_bench_int8_rows_carry_their_agreement_with_fp32(tmp_path, capsys):
    """``--dtype fp32,int8``: int8 rows beside fp32 ones, each with its agreement with eager fp32 and its bytes."""
    out = tmp_path / "r.json"
    assert main(["bench", "--model", "vit-digits", "--param-ratio", "0.5", "--device", "cpu", "--dtype", "fp32,int8",
                 "--batch-sizes", "2", "--warmup", "0", "--iters", "1", "--no-plot", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["variant"]) for r in rows] == [("fp32", "dense"), ("fp32", "compressed"),
                                                          ("int8", "dense"), ("int8", "compressed")]
    for row in rows:
        assert row["logit_cosine"] >= (0.99 if row["dtype"] == "int8" else 0.999999) and row["bytes_on_disk"] > 0
    assert "quantize_dynamic" in rows[3]["quantization"] and "dense_logit_cosine" in rows[3]
