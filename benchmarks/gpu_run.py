"""What ``benchmarks/gpu_run.sh`` runs on a lent GPU, step by step, each under its own time limit:

1. ``tests``: the GPU tests (``tests/triton``, ``tests/ops/test_cuda_ext.py``, ``tests/ops/test_dispatch.py``) with
   one autotune row per kernel (``UTILRANK_TRITON_CONFIG=first``, so compiles, not tuning, bound the time);
2. ``kernels``: each factored op against two cuBLAS calls (``F.linear`` with the bias), without and with a
   GELU, eager and fused by ``torch.compile``, at ViT-B/L shapes in bf16, with the roofline's ideal times
   (``benchmarks/roofline.py``) beside the measured ones;
3. ``vit``: ViT-B/16 at 50% parameters, bf16, batch 1 (CUDA graphs) and 64, end to end (``utilrank bench``).

Each step writes ``benchmarks/results/<device>-gpu-<step>.json`` (atomically); the last line is one summary
table over all steps. ``python benchmarks/gpu_run.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = ("tests", "kernels", "vit")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import device_for, lowrank_linear_roofline, lowrank_mlp_roofline  # noqa: E402

# (name, M, in, out, rank): ViT-B/16 and ViT-L/16 layers at batch 64 (M = 64 x 197) and batch 1
LINEAR_SHAPES = [
    ("vit_b.fc1", 12608, 768, 3072, 192), ("vit_b.fc2", 12608, 3072, 768, 192), ("vit_b.qkv", 12608, 768, 2304, 288),
    ("vit_l.fc1", 12608, 1024, 4096, 400), ("vit_b.fc1 b1", 197, 768, 3072, 192),
]
MLP_SHAPES = [("vit_b.mlp", 12608, 768, 3072, 192), ("vit_l.mlp", 12608, 1024, 4096, 256)]


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


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (the result files' prefix)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device_name: str) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name, "torch_version": torch.__version__, "triton_version": triton_version,
            "cuda_version": torch.version.cuda, "date": datetime.date.today().isoformat()}


def write_result(out_dir: Path, device_name: str, step: str, payload: dict) -> Path:
    """``out_dir/<device>-gpu-<step>.json``, written to a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_slug(device_name)}-gpu-{step}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": "utilrank.gpu-run/1", "step": step, **payload}, indent=1) + "\n")
    tmp.rename(path)
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


def bench_us(fn) -> dict:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"us": median * 1e3, "us_p20": p20 * 1e3, "us_p80": p80 * 1e3}


def run_kernels(seconds: float, quick: bool, device_name: str) -> dict:
    import torch
    import torch.nn.functional as F

    from utilrank_kernels.ops import lowrank_linear, lowrank_mlp

    spec = device_for(device_name)
    deadline = time.perf_counter() + seconds
    rows, dtype = [], torch.bfloat16

    def two_gemms(x, a, b, bias):
        return F.linear(F.linear(x, a), b, bias)

    def two_gemms_gelu(x, a, b, bias):
        return F.gelu(F.linear(F.linear(x, a), b, bias))

    compiled_gelu = torch.compile(two_gemms_gelu, dynamic=False)
    for name, m, k, n, r in LINEAR_SHAPES[:1] if quick else LINEAR_SHAPES:
        if time.perf_counter() > deadline:
            rows.append({"shape": name, "skipped": "step time limit"})
            continue
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        a = torch.randn(r, k, device="cuda", dtype=dtype) / k**0.5
        b = torch.randn(n, r, device="cuda", dtype=dtype) / r**0.5
        bias = torch.randn(n, device="cuda", dtype=dtype)
        ideal = lowrank_linear_roofline(m, k, n, r, spec) if spec else {}
        w = (x, a, b, bias)
        impls = {
            "cublas": (lambda w=w: two_gemms(*w), ideal.get("cublas")),
            "cublas+gelu": (lambda w=w: two_gemms_gelu(*w), ideal.get("cublas_gelu")),
            "cublas+gelu compiled": (lambda w=w: compiled_gelu(*w), ideal.get("cublas")),
            "triton": (lambda w=w: lowrank_linear(*w, backend="triton"), ideal.get("fused")),
            "triton+gelu": (lambda w=w: lowrank_linear(*w, "gelu", backend="triton"), ideal.get("fused")),
        }
        rows += measure_impls("lowrank_linear", name, {"M": m, "in": k, "out": n, "r": r}, impls)
    for name, m, width, hidden, r in MLP_SHAPES[:1] if quick else MLP_SHAPES:
        if time.perf_counter() > deadline:
            rows.append({"shape": name, "skipped": "step time limit"})
            continue
        x = torch.randn(m, width, device="cuda", dtype=dtype)
        p = [torch.randn(r, width), torch.randn(hidden, r), torch.randn(hidden), torch.randn(r, hidden),
             torch.randn(width, r), torch.randn(width)]
        p = [(t / t.shape[-1] ** 0.5 if t.dim() == 2 else t).to("cuda", dtype) for t in p]
        ideal = lowrank_mlp_roofline(m, width, hidden, r, r, spec) if spec else {}

        def two_layers(x=x, p=p):
            return two_gemms(two_gemms_gelu(x, p[0], p[1], p[2]), p[3], p[4], p[5])

        impls = {
            "two factored layers + gelu": (two_layers, ideal.get("unfused")),
            "two factored layers compiled": (torch.compile(two_layers, dynamic=False), ideal.get("unfused")),
            "triton fused mlp": (lambda x=x, p=p: lowrank_mlp(x, *p, "gelu", backend="triton"), ideal.get("fused")),
        }
        rows += measure_impls("lowrank_mlp", name, {"M": m, "width": width, "hidden": hidden, "r": r}, impls)
    return {"dtype": "bf16", "roofline_device": spec.name if spec else None, "rows": rows}


def measure_impls(op: str, name: str, shape: dict, impls: dict) -> list[dict]:
    import torch

    rows = []
    base = None
    for impl, (fn, ideal) in impls.items():
        row = {"op": op, "shape": name, **shape, "impl": impl, "ideal_us": ideal}
        try:
            with torch.inference_mode():
                row.update(bench_us(fn))
        except Exception as exc:  # one impl that cannot run is a finding, not the end of the run
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
        base = base or row.get("us")
        if row.get("us") and base:
            row["vs_first"] = base / row["us"]
        print(f"  {name:14s} {impl:30s} " + (f"{row['us']:9.1f} us" if "us" in row else row["error"])
              + (f"  (ideal {ideal:.1f} us)" if ideal else ""), flush=True)
        rows.append(row)
    return rows


def run_vit(seconds: float, out_dir: Path, device_name: str) -> dict:
    out = {}
    for label, batch, extra in (("b1-cuda-graphs", 1, ["--cuda-graphs"]), ("b64", 64, [])):
        path = out_dir / f"{device_slug(device_name)}-gpu-vit-{label}-bench.json"
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
def summary_table(results: dict) -> str:
    """One table over every step's result: what ran, the measured value, its baseline or ideal."""
    lines = ["| step | item | measured | baseline / ideal | note |", "|---|---|---|---|---|"]
    tests = results.get("tests")
    if tests:
        lines.append(f"| tests | GPU tests | {tests.get('passed', '?')} passed, {tests.get('failed', '?')} failed, "
                     f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped | | "
                     f"{tests.get('seconds')} s, rc {tests.get('returncode')} |")
    for row in (results.get("kernels") or {}).get("rows", []):
        if "skipped" in row:
            lines.append(f"| kernels | {row['shape']} | skipped | | {row['skipped']} |")
            continue
        measured = f"{row['us']:.1f} us" if "us" in row else row.get("error", "?")
        ideal = f"ideal {row['ideal_us']:.1f} us" if row.get("ideal_us") else ""
        note = f"x{row['vs_first']:.2f} vs {'cuBLAS' if row['op'] == 'lowrank_linear' else 'two layers'}" \
            if row.get("vs_first") else ""
        lines.append(f"| kernels | {row['shape']} {row['impl']} | {measured} | {ideal} | {note} |")
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
    import torch

    if not torch.cuda.is_available():
        print("gpu_run: no CUDA device here; this script measures GPU kernels and runs only where one is lent",
              file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name()
    env = environment(device_name)
    results = {}
    for step in args.steps:
        print(f"gpu_run: step {step} (at most {args.step_seconds:.0f} s)", flush=True)
        start = time.perf_counter()
        if step == "tests":
            results[step] = run_tests(args.step_seconds)
        elif step == "kernels":
            results[step] = run_kernels(args.step_seconds, args.quick, device_name)
        else:
            results[step] = run_vit(args.step_seconds, args.out_dir, device_name)
        results[step]["step_seconds"] = round(time.perf_counter() - start, 1)
        path = write_result(args.out_dir, device_name, step, {**env, **results[step]})
        print(f"gpu_run: wrote {path}", flush=True)
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
