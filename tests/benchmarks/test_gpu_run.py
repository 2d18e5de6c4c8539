"""The CPU-side parts of benchmarks/tools/gpu_run.sh: argument parsing, the result writer, the summary table, the
roofline (known answers worked by hand), and the script's refusal where no GPU is visible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.kernels import cublas, roofline  # noqa: E402
from benchmarks.tools import gpu_run  # noqa: E402
from benchmarks.tools.rows import Row  # noqa: E402
from utilrank_kernels.timing import Timing  # noqa: E402


def test_roofline_vit_b_fc1_on_h100():
    """ViT-B fc1 at batch 64, r = 192, bf16, H100 SXM (989 TFLOP/s, 3.35 TB/s), by hand: the first GEMM moves
    x (19.37 MB) + a (0.29 MB) + t (4.84 MB) = 24.5 MB -> 7.3 us (its 3.72 GFLOP take 3.8 us); the second moves
    t + b (1.18 MB) + y (77.46 MB) = 83.5 MB -> 24.9 us (14.9 GFLOP: 15.0 us); GELU reads and writes y: 46.2 us;
    fused: x + a + b + y = 98.3 MB -> 29.3 us (18.6 GFLOP: 18.8 us)."""
    t = roofline.lowrank_linear_roofline(12608, 768, 3072, 192, roofline.DEVICES["h100"])
    assert t["cublas"] == pytest.approx(32.2, abs=0.1)
    assert t["cublas_gelu"] == pytest.approx(78.5, abs=0.1)
    assert t["fused"] == pytest.approx(29.3, abs=0.1)


def test_roofline_compute_bound_and_dtype():
    """A square GEMM-like shape with a large rank is bound by FLOPs: 2 M r (K + N) / peak."""
    dev = roofline.DEVICES["a100"]
    m = k = n = r = 8192
    t = roofline.lowrank_linear_roofline(m, k, n, r, dev)
    assert t["fused"] == pytest.approx(2 * m * r * (k + n) / 312e12 * 1e6, rel=1e-9)
    t32 = roofline.lowrank_linear_roofline(m, k, n, r, dev, element_size=4)
    assert t32["fused"] == pytest.approx(2 * m * r * (k + n) / 19.5e12 * 1e6, rel=1e-9)


def test_roofline_mlp_fused_saves_the_hidden_round_trips():
    """ViT-B MLP at batch 64, r = 192, bf16, H200 (4.8 TB/s): fused, only x, y and the weights move (8 us), so
    the 37.3 GFLOP bound it: 37.6 us. Unfused, the 77.5 MB hidden activations are written by fc1, read and
    written by the GELU, read by fc2: 4 x 77.5 MB = 310 MB, 64.6 us on their own."""
    dev = roofline.DEVICES["h200"]
    t = roofline.lowrank_mlp_roofline(12608, 768, 3072, 192, 192, dev)
    assert t["fused"] == pytest.approx(2 * 12608 * 192 * (768 + 3072) * 2 / 989e12 * 1e6, rel=1e-9)
    assert t["unfused"] >= 4 * 12608 * 3072 * 2 / 4.8e12 * 1e6


def test_device_for():
    assert roofline.device_for("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert roofline.device_for("NVIDIA H200").name == "NVIDIA H200"
    assert roofline.device_for("NVIDIA A100-SXM4-40GB").name.startswith("NVIDIA A100")
    assert roofline.device_for("NVIDIA GeForce RTX 4090") is None


def test_parse_args():
    args = gpu_run.parse_args(["--steps", "kernels,vit", "--quick", "--step-seconds", "30"])
    assert args.steps == ["kernels", "vit"] and args.quick and args.step_seconds == 30
    assert gpu_run.parse_args([]).steps == list(gpu_run.STEPS)
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["--steps", "tests,fly"])


def test_write_result_is_atomic_and_named_by_device(tmp_path):
    path = gpu_run.write_result(tmp_path, "nvidia-h100-80gb-hbm3", "kernels", {"rows": [{"median_ms": 1.5}]})
    assert path == tmp_path / "nvidia-h100-80gb-hbm3_gpu-kernels.json"
    assert json.loads(path.read_text()) == {"format": "utilrank.gpu-run/1", "step": "kernels",
                                            "rows": [{"median_ms": 1.5}]}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
                   '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
                   '<testcase classname="t" name="c"><error/></testcase></testsuite></testsuites>')
    counts = gpu_run.junit_counts(xml)
    assert counts == {"passed": 2, "failed": 1, "errors": 1, "skipped": 1, "failures": ["t::b", "t::c"]}


def test_summary_table_has_a_line_per_result():
    shape = {"M": 12608, "in": 768, "out": 3072, "r": 192}
    results = {
        "tests": {"passed": 10, "failed": 0, "errors": 0, "skipped": 2, "seconds": 50.0, "returncode": 0},
        "kernels": {"rows": [row.as_dict() for row in (
            Row("lowrank_linear", "cublas", "bf16", shape, Timing(0.040, 0.039, 0.041), extra={
                "layer": "vit_b.fc1", "ideal_us": 32.2}),
            Row("lowrank_linear", "triton", "bf16", shape, Timing(0.032, 0.031, 0.033),
                {"cublas": Timing(0.040, 0.039, 0.041)}, {"layer": "vit_b.fc1", "ideal_us": 29.3}),
            Row("lowrank_mlp", "triton-fused-mlp", "bf16", shape, None, extra={"layer": "vit_b.mlp"},
                error="RuntimeError: x"),
            cublas.skipped("lowrank_linear", "vit_l.fc1", shape))]},
        "vit": {"b64": {"rows": [{"variant": "compressed", "backend": "auto", "infer_step_time": 12.5,
                                  "speedup": 1.4}]},
                "b1-cuda-graphs": {"returncode": 1, "tail": "boom\nValueError: bad", "rows": None}},
    }
    table = gpu_run.summary_table(results).splitlines()
    assert table[0].startswith("| step |") and len(table) == 2 + 1 + 4 + 2
    assert "10 passed, 0 failed" in table[2]
    assert "| vit_b.fc1 triton | 32.0 us | ideal 29.3 us | x1.25 vs cublas |" in table[4]
    assert "RuntimeError: x" in table[5] and "skipped" in table[6]
    assert "12.500 ms" in table[7] and "failed" in table[8] and "ValueError: bad" in table[8]


def test_scripts_refuse_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the scripts would run")
    script = ROOT / "benchmarks" / "tools" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert out.returncode == 2 and "no CUDA device" in out.stderr
    assert gpu_run.main([]) == 2
