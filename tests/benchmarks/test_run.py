"""benchmarks/run.py: the registry names real modules with a ``main(argv)``, the runner lists and runs them from
any folder and from a clean checkout (the package not installed), and a kernel benchmark's result file is named
``<device>_<what>.json`` with rows that carry what makes them comparable."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.tools.rows import Row, result_path  # noqa: E402
from utilrank_kernels.timing import Timing, device_slug  # noqa: E402


@pytest.mark.parametrize("name", list(run.REGISTRY))
def test_every_entry_is_a_module_with_main(name):
    """Each module imports (so a name the package moved is caught here, not on a lent GPU) and has main(argv)."""
    bench = run.REGISTRY[name]
    assert bench.kind in run.KINDS
    if bench.missing():
        pytest.skip(f"needs {', '.join(bench.missing())}")
    main = importlib.import_module(f"benchmarks.{bench.module}").main
    assert list(inspect.signature(main).parameters) == ["argv"]


def test_no_script_is_left_outside_the_registry():
    registered = {b.module for b in run.REGISTRY.values()}
    # shared by registered ones: the row type, the cases and their timers, gpu_run's pytest plugin
    helpers = {"tools.rows", "kernels.cublas", "kernels.cases", "tools.pytest_outcomes"} - registered
    scripts = {str(p.relative_to(ROOT / "benchmarks").with_suffix("")).replace("/", ".")
               for kind in run.KINDS for p in (ROOT / "benchmarks" / kind).glob("*.py") if p.name != "__init__.py"}
    assert scripts - registered == helpers


def _runner(*args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_list_from_another_folder(tmp_path):
    out = _runner(str(ROOT / "benchmarks" / "run.py"), "--list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in run.REGISTRY)
    kernels = _runner(str(ROOT / "benchmarks" / "run.py"), "--list", "kernels", cwd=tmp_path).stdout
    assert "roofline" in kernels and "readme-table" not in kernels


def test_unknown_name_and_refusals(capsys):
    assert run.main(["rooflin"]) == 2
    assert "did you mean roofline" in capsys.readouterr().err
    assert run.main(["--list", "gadgets"]) == 2
    import torch

    if not torch.cuda.is_available():
        assert run.main(["lowrank", "--quick"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_runs_from_a_clean_checkout(tmp_path):
    """``python -S``: no site-packages processing, so no editable install; torch and the other dependencies
    come from PYTHONPATH, the package and benchmarks/ from the repository root the runner puts first."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    out = _runner("-S", str(ROOT / "benchmarks" / "run.py"), "roofline", "--m", "197", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("M=197 K=768 N=3072 r=192 bf16 on NVIDIA H100 SXM: cublas")
    out = _runner("-S", str(ROOT / "benchmarks" / "run.py"), "eigh-threads", "--sizes", "8", cwd=tmp_path, env=env)
    assert out.returncode == 0 and "d     8: 1 thread(s)" in out.stdout, out.stderr


def test_row_as_dict_carries_the_baselines():
    row = Row("lowrank_linear", "triton", "bf16", {"M": 16}, Timing(0.5, 0.4, 0.6), {"addmm": Timing(1.0, 0.9, 1.1)},
              {"layer": "fc1"})
    got = row.as_dict({"device": "NVIDIA H200", "torch_version": "2"})
    assert got == {"op": "lowrank_linear", "impl": "triton", "dtype": "bf16", "shape": {"M": 16},
                   "median_ms": 0.5, "p20_ms": 0.4, "p80_ms": 0.6, "addmm_median_ms": 1.0, "addmm_p20_ms": 0.9,
                   "addmm_p80_ms": 1.1, "speedup_vs_addmm": 2.0, "layer": "fc1", "device": "NVIDIA H200",
                   "torch_version": "2"}
    failed = Row("lowrank_linear", "cuda", "bf16", {"M": 16}, None, error="RuntimeError: no kernel")
    assert failed.speedup("addmm") is None and failed.as_dict()["error"] == "RuntimeError: no kernel"


def test_result_path_is_device_then_what(tmp_path):
    assert result_path("factored-ops") == ROOT / "benchmarks" / "results" / f"{device_slug('cpu')}_factored-ops.json"
    assert result_path("x", out=tmp_path / "y.json") == tmp_path / "y.json"


@pytest.mark.slow
def test_factored_ops_end_to_end(tmp_path):
    """One cheap CPU benchmark through the runner: each factored op against its dense form, rows with the device,
    versions, dtype, shape, median/p20/p80 and the dense baseline of the same run."""
    out = tmp_path / "ops.json"
    done = _runner(str(ROOT / "benchmarks" / "run.py"), "factored-ops", "--devices", "cpu", "--ops", "linear",
                   "--iters", "2", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["format"] == "utilrank.bench-rows/1" and doc["benchmark"] == "factored-ops"
    dense, factored = doc["rows"][0], doc["rows"][1]
    assert (dense["impl"], factored["impl"]) == ("dense", "torch") and dense["shape"] == factored["shape"]
    for key in ("device", "torch_version", "triton_version", "dtype", "median_ms", "p20_ms", "p80_ms"):
        assert key in factored, key
    assert factored["dense_median_ms"] == dense["median_ms"] and factored["speedup_vs_dense"] > 0
