"""The CPU-side parts of benchmarks/gpu_run.sh: the roofline (known answers worked by hand), the cases' baselines
against fp64 references, the row and summary machinery on made-up timings, the argument parsing, the result
writer, the test counts that survive a stopped run, the kill of a whole process group, and the script's refusal
where no GPU is visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.kernels import covariance, cublas, roofline  # noqa: E402
from benchmarks.kernels.cases import Case, FakeTimer, Impl, measure_cases, scaled_rows  # noqa: E402
from benchmarks.tools import gpu_run, pytest_outcomes  # noqa: E402
from utilrank_kernels.timing import Timing  # noqa: E402


# --- the roofline ---
def test_roofline_vit_b_fc1_on_h100():
    """ViT-B fc1 at batch 64, r = 192, bf16, H100 SXM (989 TFLOP/s, 3.35 TB/s), by hand: the first GEMM moves
    x (19.37 MB) + a (0.29 MB) + t (4.84 MB) = 24.5 MB -> 7.3 us (its 3.72 GFLOP take 3.8 us); the second moves
    t + b (1.18 MB) + y (77.46 MB) = 83.5 MB -> 24.9 us (14.9 GFLOP: 15.0 us); GELU reads and writes y: 46.2 us;
    fused: x + a + b + y = 98.3 MB -> 29.3 us (18.6 GFLOP: 18.8 us)."""
    t = roofline.lowrank_linear_roofline(12608, 768, 3072, 192, roofline.DEVICES["h100"])
    assert t["cublas"] == pytest.approx(32.2, abs=0.1)
    assert t["cublas_gelu"] == pytest.approx(78.5, abs=0.1)
    assert t["fused"] == pytest.approx(29.3, abs=0.1)


def test_roofline_dense_vit_b_fc1_on_h100():
    """The dense fc1 at batch 64: 2 x 12608 x 768 x 3072 = 59.5 GFLOP -> 60.1 us at 989 TFLOP/s; it moves x
    (19.37 MB) + w (4.72 MB) + y (77.46 MB) = 101.5 MB -> 30.3 us: bound by FLOPs. A separate GELU adds 46.2 us."""
    t = roofline.dense_linear_roofline(12608, 768, 3072, roofline.DEVICES["h100"])
    assert t["cublas"] == pytest.approx(60.1, abs=0.1)
    assert t["cublas_gelu"] == pytest.approx(60.1 + 46.2, abs=0.2)
    mlp = roofline.dense_mlp_roofline(12608, 768, 3072, roofline.DEVICES["h100"])
    assert mlp["epilogue"] == pytest.approx(2 * 60.1, abs=0.2) and mlp["unfused"] > mlp["epilogue"]


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
    assert t["fused"] < t["epilogue"] < t["unfused"]


def test_device_for():
    assert roofline.device_for("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert roofline.device_for("NVIDIA H200").name == "NVIDIA H200"
    assert roofline.device_for("NVIDIA A100-SXM4-40GB").name.startswith("NVIDIA A100")
    assert roofline.device_for("NVIDIA GeForce RTX 4090") is None


# --- the cases compute what they claim ---
@pytest.mark.parametrize("act", [None, "gelu"])
def test_linear_baselines_compute_the_factored_layer(act):
    """Every CPU-capable implementation of a linear case is ``act(x a^T b^T + bias)`` against an fp64 reference,
    fp32 error far under 1e-4; the dense weight is ``b a``. (``torch._addmm_activation`` computes the exact GELU on
    a CPU; on CUDA cuBLASLt's epilogue computes the tanh form.)"""
    torch.manual_seed(1)
    x, a, b, bias, _ = (t.double() for t in cublas._factors(17, 96, 80, 24, "cpu", torch.float32))
    torch.manual_seed(1)  # the case draws the same inputs
    impls = cublas.linear_impls(17, 96, 80, 24, act, "cpu", torch.float32, None)
    t = x @ a.T @ b.T + bias
    for name, impl in impls.items():
        if impl.cpu:
            ref = t if act is None else F.gelu(t)
            assert (impl.fn().double() - ref).norm() / ref.norm() < 1e-5, name
    assert ({"torch-epilogue", "dense-epilogue"} <= set(impls)) == (act == "gelu")
    assert "torch-epilogue" in impls or act is None


def test_mlp_baselines_compute_the_factored_mlp():
    """The MLP cases' CPU implementations against ``fc2(gelu(fc1(x)))`` in fp64 with the factored weights."""
    torch.manual_seed(2)
    x, a1, b1, bias1, _ = (t.double() for t in cublas._factors(9, 64, 256, 16, "cpu", torch.float32))
    _, a2, b2, bias2, _ = (t.double() for t in cublas._factors(1, 256, 64, 16, "cpu", torch.float32))
    torch.manual_seed(2)
    impls = cublas.mlp_impls(9, 64, 256, 16, "cpu", torch.float32, None)
    for name, impl in impls.items():
        if impl.cpu:
            ref = F.gelu(x @ a1.T @ b1.T + bias1) @ a2.T @ b2.T + bias2
            assert (impl.fn().double() - ref).norm() / ref.norm() < 1e-5, name


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_syrk_cases_measure_their_error_against_fp64(dtype_name):
    """The covariance case records each CPU implementation's error against the fp64 product of the same
    (rounded) inputs: the torch path accumulates in fp32 into fp64, far under 1e-5."""
    impls = covariance.syrk_impls(64, 48, dtype_name, "cpu")
    assert impls["torch-path"].extra["rel_err_vs_fp64"] < 1e-5
    assert impls["addmm-fp32"].extra["rel_err_vs_fp64"] < 1e-5
    assert "rel_err_vs_fp64" not in impls["triton"].extra  # not run on a CPU
    assert ("triton-tf32" in impls) == (dtype_name == "fp32")


def test_scaled_rows():
    assert scaled_rows(12608, None) == 12608
    assert (scaled_rows(12608, 16), scaled_rows(197, 16), scaled_rows(12608, 8)) == (13, 1, 8)


# --- rows, baselines and the summary on made-up timings ---
def _case(op="lowrank_linear", layer="vit_b.fc1", fail=False) -> Case:
    def build():
        def boom():
            raise RuntimeError("too wide for the fused path")

        return {"torch": Impl(lambda: None, True, extra={"ideal_us": 30.0}),
                "triton-fused": Impl(boom if fail else (lambda: None), extra={"bytes": 1e6, "flops": 2e9}),
                "dense": Impl(lambda: None, True)}

    return Case(op, layer, "bf16", {"M": 197}, build, ("torch", "dense"))


class CallingTimer(FakeTimer):
    """Calls every implementation (a GPU timer would), then gives fixed times."""

    def __call__(self, name, impl):
        impl.fn()
        return Timing({"torch": 0.04, "triton-fused": 0.02, "dense": 0.05}[name], 0.01, 0.06)


def test_case_rows_carry_their_baselines_and_errors():
    rows = measure_cases([_case(), _case(layer="vit_b.fc2", fail=True)], CallingTimer())
    fused = rows[1]
    assert fused.impl == "triton-fused" and fused.speedup("torch") == pytest.approx(2.0)
    assert fused.speedup("dense") == pytest.approx(2.5)
    assert fused.extra["gbps"] == pytest.approx(1e6 / 2e-5 / 1e9) and fused.extra["tflops"] == pytest.approx(100.0)
    assert set(rows[0].baselines) == {"dense"}  # a row is not its own baseline
    failed = rows[4]
    assert failed.timing is None and failed.error == "RuntimeError: too wide for the fused path"
    assert rows[3].baselines == {"dense": Timing(0.05, 0.01, 0.06)}


def test_cases_past_the_deadline_are_skipped_rows():
    rows = measure_cases([_case(), _case(layer="vit_b.fc2")], FakeTimer(), deadline=time.monotonic() - 1)
    assert [(r.extra["layer"], r.extra["skipped"]) for r in rows] == [("vit_b.fc1", "step time limit"),
                                                                      ("vit_b.fc2", "step time limit")]


def test_fake_timer_reports_a_cpu_baseline_that_breaks():
    timer = FakeTimer()
    rows = measure_cases([Case("op", "l", "bf16", {}, lambda: {"torch": Impl(lambda: 1 / 0, True)})], timer)
    assert rows[0].error.startswith("ZeroDivisionError") and timer.failures == ["torch: ZeroDivisionError: " +
                                                                                "division by zero"]


def test_summary_table_has_a_line_per_case_and_per_step(tmp_path):
    rows = [r.as_dict() for r in measure_cases([_case(), _case(layer="vit_b.fc2", fail=True)], CallingTimer())]
    results = {
        "linear": {"status": "done", "seconds": 3.0, "rows": rows},
        "tests": {"status": "done", "seconds": 50.0, "passed": 10, "failed": 1, "errors": 0, "skipped": 2,
                  "not_run": 3, "collected": 16, "failures": ["tests/triton/test_x.py::test_y: assert 1 == 2"]},
        "vit": {"status": "killed after 160 s", "rows": [r.as_dict() for r in gpu_run.bench_rows(
            gpu_run._fake_bench_rows(1, "eager", "auto"), "b1-eager")]},
    }
    table = gpu_run.summary_table(results).splitlines()
    lines = [line for line in table if line.startswith(("| linear", "| vit"))]
    assert len(lines) == 3 + 2  # two linear cases and one vit case; the two steps' status lines
    assert "torch 40.0 us; triton-fused 20.0 us; dense 50.0 us | triton-fused | ideal 30.0 us |" in lines[0]
    assert "triton-fused: RuntimeError: too wide" in lines[1]
    assert "compressed-auto 800.0 us" in lines[2] and "compressed-cuda: eager: made-up failure" in lines[2]
    tests = next(line for line in table if line.startswith("| tests |"))
    assert "10 passed, 1 failed, 0 errors, 2 skipped, 3 not run of 16" in tests and "test_y" in tests
    assert "| vit | killed after 160 s |" in table[-1]


def test_bench_rows_compare_each_compressed_row_with_its_dense_row():
    rows = gpu_run.bench_rows(gpu_run._fake_bench_rows(64, "compile", "torch,auto"), "b64-compile")
    assert [r.impl for r in rows] == ["dense", "compressed-torch", "compressed-auto", "compressed-cuda"]
    assert rows[1].speedup("dense") == pytest.approx(1.25) and rows[1].extra["speedup"] == 1.25
    assert rows[3].timing is None and rows[3].baselines == {} and "made-up" in rows[3].error
    assert rows[0].shape == {"batch": 64, "engine": "compile", "cuda_graphs": False}


# --- arguments, files ---
def test_parse_args(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_run.parse_args(["--call", "1"])
    assert args.steps == list(gpu_run.CALLS[1]) and args.out_dir == tmp_path
    assert gpu_run.parse_args(["--steps", "linear,vit"]).steps == ["linear", "vit"]
    dry = gpu_run.parse_args(["--dry-run"]).steps
    assert set(dry) == set(gpu_run.STEPS) and len(dry) == len(gpu_run.STEPS)
    for bad in (["--steps", "tests,fly"], [], ["--call", "3"], ["--call", "1", "--steps", "vit"]):
        with pytest.raises(SystemExit):
            gpu_run.parse_args(bad)
    monkeypatch.delenv("OUT")
    assert gpu_run.parse_args(["--call", "2"]).out_dir.name.startswith("utilrank-gpu-run-")


def test_calls_fit_their_budget_and_the_files_a_lent_machine_returns():
    """Each call's floors fit in its budget; a call writes at most 8 files (the device tool's limit): one
    JSON per step and the log."""
    for steps in gpu_run.CALLS.values():
        assert sum(gpu_run.STEPS[s].floor for s in steps) < gpu_run.CALL_SECONDS
        assert len(steps) + 1 <= 8


def test_write_result_is_atomic_and_named_by_device(tmp_path):
    path = gpu_run.write_result(tmp_path, "nvidia-h100-80gb-hbm3", "linear", {"rows": [{"median_ms": 1.5}]})
    assert path == tmp_path / "nvidia-h100-80gb-hbm3_gpu-linear.json"
    assert json.loads(path.read_text()) == {"format": gpu_run.FORMAT, "step": "linear", "rows": [{"median_ms": 1.5}]}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


# --- the tests step's counts, and stopping a whole process group ---
def test_outcome_counts_take_each_test_once_by_its_worst_phase(tmp_path):
    lines = [{"collected": 6},
             {"nodeid": "a", "when": "call", "outcome": "passed", "seconds": 0.1, "message": ""},
             {"nodeid": "b", "when": "call", "outcome": "failed", "seconds": 0.1, "message": "assert 1 == 2"},
             {"nodeid": "c", "when": "setup", "outcome": "failed", "seconds": 0.1, "message": "fixture broke"},
             {"nodeid": "d", "when": "setup", "outcome": "skipped", "seconds": 0.0, "message": "needs CUDA"},
             {"nodeid": "a", "when": "teardown", "outcome": "failed", "seconds": 0.0, "message": "leak"}]
    path = tmp_path / "o.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"nodeid": "e", "wh')  # a line cut by a kill
    got = pytest_outcomes.counts(path)
    assert got == {"collected": 6, "passed": 0, "failed": 1, "errors": 2, "skipped": 1, "not_run": 2,
                   "exitstatus": None, "failures": ["a: leak", "b: assert 1 == 2", "c: fixture broke"]}


def test_a_stopped_test_run_still_has_its_counts(tmp_path):
    """pytest with the outcomes plugin, stopped at its limit while one test hangs: the test that finished is
    counted, the hung one is 'not run', and the whole process group is gone."""
    (tmp_path / "test_two.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                          "def test_hangs():\n    time.sleep(120)\n")
    outcomes = tmp_path / "o.jsonl"
    env = {**os.environ, pytest_outcomes.ENV: str(outcomes), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.tools.pytest_outcomes",
           "test_two.py"]
    rc, seconds = gpu_run.run_limited(cmd, 15, cwd=tmp_path, env=env, log=tmp_path / "log")  # pytest starts in ~2 s
    assert rc is None and seconds < 40
    got = pytest_outcomes.counts(outcomes)
    assert (got["collected"], got["passed"], got["not_run"], got["exitstatus"]) == (2, 1, 1, None)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by whoever adopted it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_run_limited_stops_the_children_too(tmp_path):
    pid_file = tmp_path / "pid"
    rc, _ = gpu_run.run_limited(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], 3, cwd=tmp_path)
    assert rc is None
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)
    assert gpu_run.run_limited(["bash", "-c", "exit 3"], 10, cwd=tmp_path)[0] == 3


def test_scripts_refuse_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    script = ROOT / "benchmarks" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(script), "--call", "1"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "no CUDA device" in out.stdout + out.stderr
    assert "no CUDA device" in (tmp_path / "gpu_run-call1.log").read_text()
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert usage.returncode == 2 and "--call 1 | --call 2 | --dry-run" in usage.stderr
    assert gpu_run.main(["--call", "1", "--out-dir", str(tmp_path)]) == 2
