"""What ``benchmarks/tools/gpu_run.sh`` runs on a lent GPU, step by step, each under its own time limit:

1. ``tests``: the GPU tests (``tests/triton``, ``tests/ops/test_cuda_ext.py``, ``tests/ops/test_dispatch.py``) with
   one autotune row per kernel (``UTILRANK_TRITON_CONFIG=first``, so compiles, not tuning, bound the time);
2. ``kernels``: ``lowrank-vs-cublas`` (``benchmarks/kernels/cublas.py``): each factored op against two cuBLAS
   calls, without and with a GELU, eager and compiled, at ViT-B/L shapes in bf16, beside the roofline's ideal;
3. ``vit``: ViT-B/16 at 50% parameters, bf16, batch 1 (CUDA graphs) and 64, end to end (``utilrank bench``).

Each step writes ``benchmarks/results/<device>_gpu-<step>.json`` (atomically); the last line is one summary
table over all steps. ``python benchmarks/run.py gpu-run --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from benchmarks.kernels import cublas
from benchmarks.tools.rows import RESULTS, environment
from utilrank_kernels._files import write_json
from utilrank_kernels.timing import device_slug

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("tests", "kernels", "vit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--step-seconds", type=float, default=150.0, help="time limit of each step")
    p.add_argument("--quick", action="store_true", help="one linear and one MLP shape only")
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    return args


def write_result(out_dir: Path, slug: str, step: str, payload: dict) -> Path:
    """``out_dir/<device>_gpu-<step>.json``, written to a temporary name and renamed."""
    path = out_dir / f"{slug}_gpu-{step}.json"
    write_json(path, {"format": "utilrank.gpu-run/1", "step": step, **payload})
    return path


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def run_tests(seconds: float) -> dict:
    junit = Path(os.environ.get("TMPDIR", "/tmp")) / f"utilrank-gpu-tests-{os.getpid()}.xml"
    env = {**os.environ, "UTILRANK_TRITON_CONFIG": "first"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "tests/triton", "tests/ops/test_cuda_ext.py", "tests/ops/test_dispatch.py"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds)
        tail, rc = (proc.stdout + proc.stderr)[-4000:], proc.returncode
    except subprocess.TimeoutExpired as exc:
        tail, rc = f"timed out after {seconds:.0f}s\n{(exc.stdout or b'')[-3000:]!r}", None
    counts = junit_counts(junit) if junit.exists() else {}
    return {"returncode": rc, "seconds": round(time.perf_counter() - start, 1), **counts, "tail": tail}


def junit_counts(path: Path) -> dict:
    """passed/failed/errors/skipped from a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    failures = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped,
            "failures": failures[:50]}


def run_kernels(seconds: float, quick: bool) -> dict:
    rows = cublas.measure(seconds, quick)
    spec = cublas.device_for(torch.cuda.get_device_name())
    return {"roofline_device": spec.name if spec else None, "rows": [row.as_dict() for row in rows]}


def run_vit(seconds: float, out_dir: Path, slug: str) -> dict:
    out = {}
    for label, batch, extra in (("b1-cuda-graphs", 1, ["--cuda-graphs"]), ("b64", 64, [])):
        path = out_dir / f"{slug}_gpu-vit-{label}-bench.json"
        cmd = [sys.executable, "-c", "import sys; from utilrank_kernels.cli import main; sys.exit(main())", "bench",
               "--model", "vit_base_patch16_224",
               "--param-ratio", "0.5", "--batch-sizes", str(batch), "--dtype", "bf16", "--backend", "torch,auto",
               "--device", "cuda", "--out", str(path), "--no-plot", "--max-seconds", str(int(seconds / 3)), *extra]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds / 2)
            out[label] = {"returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:],
                          "rows": json.loads(path.read_text()).get("rows") if path.exists() else None}
        except subprocess.TimeoutExpired:
            out[label] = {"returncode": None, "tail": f"timed out after {seconds / 2:.0f}s"}
    return out


# ---------------------------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------------------------
def kernel_line(row: dict) -> str:
    """A ``benchmarks.tools.rows.Row`` of the kernels step as a line of the summary table."""
    if "skipped" in row:
        return f"| kernels | {row['layer']} | skipped | | {row['skipped']} |"
    measured = f"{row['median_ms'] * 1e3:.1f} us" if "median_ms" in row else row.get("error", "?")
    ideal = f"ideal {row['ideal_us']:.1f} us" if row.get("ideal_us") else ""
    speedups = [f"x{v:.2f} vs {k.removeprefix('speedup_vs_')}" for k, v in row.items()
                if k.startswith("speedup_vs_") and v]
    return f"| kernels | {row['layer']} {row['impl']} | {measured} | {ideal} | {', '.join(speedups)} |"


def summary_table(results: dict) -> str:
    """One table over every step's result: what ran, the measured value, its baseline or ideal."""
    lines = ["| step | item | measured | baseline / ideal | note |", "|---|---|---|---|---|"]
    tests = results.get("tests")
    if tests:
        lines.append(f"| tests | GPU tests | {tests.get('passed', '?')} passed, {tests.get('failed', '?')} failed, "
                     f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped | | "
                     f"{tests.get('seconds')} s, rc {tests.get('returncode')} |")
    lines += [kernel_line(row) for row in (results.get("kernels") or {}).get("rows", [])]
    for label, vit in (results.get("vit") or {}).items():
        for row in vit.get("rows") or []:
            step_ms = row.get("infer_step_time")
            lines.append(f"| vit | ViT-B/16 50% {label} {row.get('variant')} {row.get('backend')} | "
                         f"{step_ms:.3f} ms | | speedup {row.get('speedup', '')} |" if step_ms is not None else
                         f"| vit | ViT-B/16 50% {label} {row.get('variant')} | ? | | |")
        if not vit.get("rows"):
            lines.append(f"| vit | ViT-B/16 50% {label} | failed | | rc {vit.get('returncode')}: "
                         f"{(vit.get('tail') or '').strip().splitlines()[-1:]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_run: no CUDA device here; this script measures GPU kernels and runs only where one is lent",
              file=sys.stderr)
        return 2
    slug, env = device_slug("cuda"), environment("cuda")
    results = {}
    for step in args.steps:
        print(f"gpu_run: step {step} (at most {args.step_seconds:.0f} s)", flush=True)
        start = time.perf_counter()
        if step == "tests":
            results[step] = run_tests(args.step_seconds)
        elif step == "kernels":
            results[step] = run_kernels(args.step_seconds, args.quick)
        else:
            results[step] = run_vit(args.step_seconds, args.out_dir, slug)
        results[step]["step_seconds"] = round(time.perf_counter() - start, 1)
        path = write_result(args.out_dir, slug, step, {**env, **results[step]})
        print(f"gpu_run: wrote {path}", flush=True)
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
