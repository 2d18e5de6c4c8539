"""``bash benchmarks/gpu_run.sh --dry-run`` from a copy of the tree where the package is not installed (what a lent
GPU machine has: its own python with torch, and this tree): every step's setup runs on the CPU, each step writes
its results file under $OUT, the package is imported from the copy, and the script exits 0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Imported at start-up from PYTHONPATH: removes what an install of the package put on the import path (an editable
# install's finder, a .pth entry for the original tree), so that only PYTHONPATH can find utilrank_kernels.
_NOT_INSTALLED = """import sys
ORIGINAL = {original!r}

def _installed(finder):
    module = finder.__module__ if isinstance(finder, type) else type(finder).__module__
    return module.startswith("__editable__")

sys.meta_path[:] = [f for f in sys.meta_path if not _installed(f)]
sys.path[:] = [p for p in sys.path if p.rstrip("/") != ORIGINAL]
"""


def _tree_copy(dest: Path) -> Path:
    """The files a clean clone would have (tracked, and new files git does not ignore), copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
def test_dry_run_from_a_tree_where_the_package_is_not_installed(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to copy the tree from")
    tree, guard, out = _tree_copy(tmp_path / "tree"), tmp_path / "guard", tmp_path / "out"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NOT_INSTALLED.format(original=str(ROOT)))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHON": sys.executable, "PYTHONPATH": str(guard),
           "OUT": str(out), "TMPDIR": str(tmp_path), "UTILRANK_CACHE": str(tmp_path / "cache")}
    # the guard works: without the tree on the path, the package cannot be imported
    probe = subprocess.run([sys.executable, "-c", "import utilrank_kernels"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'utilrank_kernels'" in probe.stderr

    done = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--dry-run"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    steps = ("probe", "build", "linear", "mlp", "tests", "covariance", "small-m", "tune", "vit")
    results = {}
    for step in steps:
        [name] = [f for f in files if f.endswith(f"_gpu-{step}.json")]
        results[step] = json.loads((out / name).read_text())
        assert results[step]["status"] == "done", (step, results[step].get("error"))
    machine = results["probe"]["machine"]
    assert machine["package_from_tree"] and Path(machine["package_path"]) == (tree / "utilrank_kernels").resolve()
    assert "gpu_run-dry-run.log" in files and "| step | status |" in (out / "gpu_run-dry-run.log").read_text()
    assert (results["tests"]["passed"], results["tests"]["failed"], results["tests"]["skipped"]) == (1, 1, 1)
    ops = {row["impl"] for row in results["linear"]["rows"]}
    assert {"torch", "torch-epilogue", "triton-fused", "triton-split", "auto", "dense"} <= ops
    assert all("median_ms" in row or "error" in row for step in steps for row in results[step].get("rows", []))


@pytest.mark.slow
def test_a_step_in_its_own_process_writes_its_file_and_a_killed_one_says_so(tmp_path, monkeypatch):
    """What a lent GPU runs: each step a child process; one that finishes leaves its own status, one stopped at its
    limit (here the vit step, given too little time to start) is marked by the parent, its rows kept."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.tools import gpu_run

    done = gpu_run._child("build", 60, tmp_path, dry=True)
    assert done["status"] == "done" and done["step"] == "build"
    monkeypatch.setattr(gpu_run, "KILL_GRACE", 0.0)
    killed = gpu_run._child("tune", 1, tmp_path, dry=True)  # imports alone take longer than a second
    assert killed["status"].startswith("killed after")
    assert sorted(p.name.split("_gpu-")[1] for p in tmp_path.iterdir()) == ["build.json", "tune.json"]
