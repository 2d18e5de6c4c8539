"""``utilrank bench``'s rows: the contract's fields, realized fractions, the dense twin, engines."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from utilrank_kernels import load_compressed, save_compressed
from utilrank_kernels.bench import BENCH_FORMAT, bench, cut_to_ratio, dense_twin, write_rows
from utilrank_kernels.bench.engines import make_step
from utilrank_kernels.bench.run import realized
from utilrank_kernels.compress import Plan
from utilrank_kernels.models import build_builtin
from utilrank_kernels.models.builtin import VIT_DIGITS_KWARGS
from utilrank_kernels.nn import LowRankLinear

CONTRACT = ("model", "batch_size", "infer_samples_per_sec", "infer_step_time", "param_count", "infer_gmacs",
            "variant", "backend", "engine", "device", "dtype", "torch_version", "triton_version", "step_time_p20",
            "step_time_p80")
COMPRESSED = ("speedup", "theoretical_speedup", "realized_fraction")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Time on one thread: on a CPU shared with other jobs, two OpenMP threads stall whenever one is
    descheduled (a vit-digits step took 288 ms on 2 threads, 1.4 ms on 1, on a loaded 2-core box)."""


def _vit_digits_cut(ratio: float = 0.5, **kwargs):
    dense = build_builtin("vit-digits", **kwargs).eval()  # random init: timing does not need trained weights
    compressed, plan = cut_to_ratio(dense, ratio, multiple=1, arch="vit-digits")
    return dense, compressed, plan


def test_bench_rows_have_the_contract_fields(tmp_path):
    dense, compressed, _ = _vit_digits_cut()
    rows = bench(dense, compressed, model_name="vit-digits", input_shape=(1, 16, 16), batch_sizes=(1, 4),
                 backends=("torch", "auto"), warmup=1, iters=3, log=lambda _: None)
    assert [(r["variant"], r["backend"], r["batch_size"]) for r in rows] == [
        ("dense", "torch", 1), ("compressed", "torch", 1), ("compressed", "auto", 1),
        ("dense", "torch", 4), ("compressed", "torch", 4), ("compressed", "auto", 4)]
    for row in rows:
        assert all(k in row for k in CONTRACT), set(CONTRACT) - set(row)
        assert row["dtype"] == "fp32" and row["torch_version"] == torch.__version__
        assert row["step_time_p20"] <= row["infer_step_time"] <= row["step_time_p80"]
        assert row["infer_samples_per_sec"] == pytest.approx(1e3 * row["batch_size"] / row["infer_step_time"],
                                                             rel=1e-3, abs=0.006)
        assert all(k in row for k in COMPRESSED) == (row["variant"] == "compressed")
    d, c = rows[0], rows[1]
    assert c["param_count"] < 0.6 * d["param_count"] and c["infer_gmacs"] < d["infer_gmacs"]
    assert c["theoretical_speedup"] == pytest.approx(d["infer_gmacs"] / c["infer_gmacs"], rel=1e-2)

    written = write_rows(rows, tmp_path / "b.json", csv_too=True)
    assert [p.name for p in written] == ["b.json", "b.csv", "b.png"]
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["format"] == BENCH_FORMAT and data["rows"] == rows
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_realized_fraction_is_speedup_over_flop_ratio():
    r = realized(dense_ms=10.0, compressed_ms=4.0, dense_flops=600, compressed_flops=200)
    assert r == {"speedup": 2.5, "theoretical_speedup": 3.0,
                 "realized_fraction": pytest.approx(0.8333, abs=1e-4)}
    dense, compressed, _ = _vit_digits_cut()
    rows = bench(dense, compressed, model_name="vit-digits", input_shape=(1, 16, 16), batch_sizes=(2,),
                 warmup=1, iters=3, log=lambda _: None)
    d, c = rows
    assert c["speedup"] == pytest.approx(d["infer_step_time"] / c["infer_step_time"], rel=1e-3)
    assert c["realized_fraction"] == pytest.approx(c["speedup"] / c["theoretical_speedup"], rel=1e-3)


def test_dense_twin_computes_what_the_compressed_model_computes(tmp_path):
    dense, compressed, plan = _vit_digits_cut()
    config = {"arch": "vit-digits", "source": "builtin", "num_classes": 10, "model_kwargs": VIT_DIGITS_KWARGS}
    save_compressed(compressed, plan, config, tmp_path / "c")
    loaded = load_compressed(tmp_path / "c")
    twin = dense_twin(loaded, Plan.load(tmp_path / "c" / "plan.json"), config)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), loaded(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LowRankLinear) for m in twin.modules())


def test_engines_time_dense_and_compressed_in_the_same_engine():
    """onnxruntime rows time each model's checked ONNX export; a failing engine is a row with its error."""
    from utilrank_kernels.export import missing_packages

    if missing_packages():
        pytest.skip("the deploy extra (onnx, onnxscript, onnxruntime)")
    dense, compressed, _ = _vit_digits_cut(depth=1)
    rows = bench(dense, compressed, model_name="vit-digits", input_shape=(1, 16, 16), batch_sizes=(3,),
                 engines=("eager", "onnxruntime"), warmup=1, iters=3, log=lambda _: None)
    assert [(r["engine"], r["variant"], r["backend"]) for r in rows] == [
        ("eager", "dense", "torch"), ("eager", "compressed", "auto"),
        ("onnxruntime", "dense", "torch"), ("onnxruntime", "compressed", "torch")]
    d, c = rows[2:]
    for row in (d, c):
        assert row["onnxruntime_provider"] == "CPUExecutionProvider" and row["export_max_abs_error"] < 1e-4
        assert row["onnxruntime_version"] and row["timed_steps"] == 3 and row["warmup"] == 1
    assert c["speedup"] == pytest.approx(d["infer_step_time"] / c["infer_step_time"], rel=1e-3)
    assert c["theoretical_speedup"] == rows[1]["theoretical_speedup"]  # one FLOP ratio: the model's


def test_an_engine_that_cannot_run_is_a_row_with_its_error(monkeypatch):
    import utilrank_kernels.export as export

    monkeypatch.setattr(export, "missing_packages", lambda names=export.DEPLOY_PACKAGES: list(names))
    dense, compressed, _ = _vit_digits_cut(depth=1)
    rows = bench(dense, compressed, model_name="vit-digits", input_shape=(1, 16, 16), batch_sizes=(1, 2),
                 engines=("onnxruntime",), warmup=0, iters=1, log=lambda _: None)
    assert [(r["variant"], r["batch_size"]) for r in rows] == [("dense", 1), ("compressed", 1), ("dense", 2),
                                                                ("compressed", 2)]
    assert all(r["error"] == "onnxruntime: ONNX export needs onnx, onnxscript, onnxruntime: pip install -e "
               "'.[deploy]'" and r["engine"] == "onnxruntime" for r in rows)
    with pytest.raises(ValueError, match="engine 'tvm'"):
        bench(dense, compressed, model_name="m", input_shape=(1, 16, 16), engines=("tvm",))
    with pytest.raises(ValueError, match="engine 'tvm'"):
        make_step(dense, torch.randn(1, 1, 16, 16), engine="tvm")


def _compressed_row(dense: tuple[float, float, float], compressed: tuple[float, float, float]) -> dict:
    """A compressed bench row with the given (median, p20, p80) of dense and compressed."""
    return {"model": "m", "device": "cpu", "variant": "compressed", "backend": "torch", "engine": "eager",
            "dtype": "fp32", "batch_size": 8, "infer_step_time": compressed[0], "step_time_p20": compressed[1],
            "step_time_p80": compressed[2], "infer_samples_per_sec": 1.0, "param_count": 0.1, "infer_gmacs": 0.1,
            "speedup": dense[0] / compressed[0], "theoretical_speedup": 2.0,
            "realized_fraction": dense[0] / compressed[0] / 2, "dense_step_time": dense[0],
            "dense_step_time_p20": dense[1], "dense_step_time_p80": dense[2],
            "speedup_measurable": not (dense[1] <= compressed[2] and compressed[1] <= dense[2])}


def test_a_speedup_is_claimed_only_where_the_ranges_do_not_overlap(tmp_path):
    """The issue's case: "speedup 1.38x" printed where the p20-p80 ranges overlapped completely."""
    from utilrank_kernels.bench.output import format_row
    from utilrank_kernels.plots import speedup_range
    from utilrank_kernels.timing import Timing

    wide = Timing(2.0, 0.64, 2.77)
    assert Timing(1.45, 0.7, 2.5).compared_to(wide) == "no measurable difference"
    overlapping = _compressed_row((2.0, 0.64, 2.77), (1.45, 0.7, 2.5))
    line = format_row(overlapping)
    assert "no measurable difference (medians 1.38x" in line and "speedup 1.38x" not in line
    assert "realized" not in line
    apart = _compressed_row((2.0, 1.9, 2.1), (1.0, 0.95, 1.05))
    assert "speedup 2.00x; FLOP ratio 2.00x (realized 1.00)" in format_row(apart)
    slower = _compressed_row((1.0, 0.95, 1.05), (2.0, 1.9, 2.1))
    assert "slower (0.50x); FLOP ratio" in format_row(slower)
    assert speedup_range(apart) == pytest.approx((1.9 / 1.05, 2.1 / 0.95))
    written = write_rows([overlapping, apart], tmp_path / "b.json")
    assert (tmp_path / "b.png").stat().st_size > 10_000 and written[-1].name == "b.png"


def test_rows_carry_the_dense_timing_and_a_wide_spread_is_warned(monkeypatch):
    import utilrank_kernels.bench.run as run

    dense, compressed, _ = _vit_digits_cut(depth=1)
    # a busy machine, as timed: dense steps spread 1-10 ms, compressed 1.0-1.1 ms
    fake = {"dense": [0.001, 0.002, 0.01, 0.001, 0.01], "torch": [0.001, 0.0011, 0.001, 0.0011, 0.001]}
    monkeypatch.setattr(run, "time_interleaved", lambda steps, **kw: {k: fake[k] for k in steps})
    lines = []
    d, c = bench(dense, compressed, model_name="vit-digits", input_shape=(1, 16, 16), batch_sizes=(2,),
                 backends=("torch",), warmup=0, iters=1, log=lines.append)
    assert (c["dense_step_time"], c["dense_step_time_p20"], c["dense_step_time_p80"]) == (
        d["infer_step_time"], d["step_time_p20"], d["step_time_p80"])
    assert c["speedup_measurable"] is False and "no measurable difference" in lines[-2]
    assert lines[-1].startswith("warning: eager fp32 batch 2: dense p80/p20 ") and "busy" in lines[-1]


def test_out_is_checked_before_any_timing(tmp_path):
    from utilrank_kernels.bench.output import check_out

    check_out(tmp_path / "new" / "deeper" / "rows.json")  # folders to be made: fine, and none made yet
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    (tmp_path / "rows.png").mkdir()
    for out, words in ((tmp_path / "file" / "rows.json", "is not a folder"), (tmp_path / "rows.txt", ".json"),
                       (tmp_path / "rows.json", "rows.png is a folder"), ("/proc/rows.json", "cannot write")):
        with pytest.raises(ValueError, match=words):
            check_out(out)
    check_out(tmp_path / "rows.json", plot=False)
