"""Each factored op against two cuBLAS calls (``F.linear`` with the bias), without and with a GELU, eager and
fused by ``torch.compile``, at ViT-B/L shapes in bf16, with the roofline's ideal times
(``benchmarks/kernels/roofline.py``) beside the measured ones. The ``kernels`` step of ``tools/gpu_run.py``.

    python benchmarks/run.py lowrank-vs-cublas [--quick] [--seconds 150]

Rows (``benchmarks.tools.rows.Row``, the first implementation of each shape as the baseline) go to
``benchmarks/results/<device>_lowrank-vs-cublas.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.kernels.roofline import device_for, lowrank_linear_roofline, lowrank_mlp_roofline
from benchmarks.tools.rows import Row, cuda_timing, environment, first_line, result_path, write_rows
from utilrank_kernels.ops import lowrank_linear, lowrank_mlp

# (name, M, in, out, rank): ViT-B/16 and ViT-L/16 layers at batch 64 (M = 64 x 197) and batch 1
LINEAR_SHAPES = [
    ("vit_b.fc1", 12608, 768, 3072, 192), ("vit_b.fc2", 12608, 3072, 768, 192), ("vit_b.qkv", 12608, 768, 2304, 288),
    ("vit_l.fc1", 12608, 1024, 4096, 400), ("vit_b.fc1 b1", 197, 768, 3072, 192),
]
MLP_SHAPES = [("vit_b.mlp", 12608, 768, 3072, 192), ("vit_l.mlp", 12608, 1024, 4096, 256)]
DTYPE = torch.bfloat16


def two_gemms(x, a, b, bias):
    return F.linear(F.linear(x, a), b, bias)


def two_gemms_gelu(x, a, b, bias):
    return F.gelu(F.linear(F.linear(x, a), b, bias))


def linear_impls(m: int, k: int, n: int, r: int, spec, compiled_gelu) -> dict[str, tuple[Callable, float | None]]:
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    a = torch.randn(r, k, device="cuda", dtype=DTYPE) / k**0.5
    b = torch.randn(n, r, device="cuda", dtype=DTYPE) / r**0.5
    bias = torch.randn(n, device="cuda", dtype=DTYPE)
    ideal = lowrank_linear_roofline(m, k, n, r, spec) if spec else {}
    w = (x, a, b, bias)
    return {
        "cublas": (lambda: two_gemms(*w), ideal.get("cublas")),
        "cublas+gelu": (lambda: two_gemms_gelu(*w), ideal.get("cublas_gelu")),
        "cublas+gelu-compiled": (lambda: compiled_gelu(*w), ideal.get("cublas")),
        "triton": (lambda: lowrank_linear(*w, backend="triton"), ideal.get("fused")),
        "triton+gelu": (lambda: lowrank_linear(*w, "gelu", backend="triton"), ideal.get("fused")),
    }


def mlp_impls(m: int, width: int, hidden: int, r: int, spec) -> dict[str, tuple[Callable, float | None]]:
    x = torch.randn(m, width, device="cuda", dtype=DTYPE)
    p = [torch.randn(r, width), torch.randn(hidden, r), torch.randn(hidden), torch.randn(r, hidden),
         torch.randn(width, r), torch.randn(width)]
    p = [(t / t.shape[-1] ** 0.5 if t.dim() == 2 else t).to("cuda", DTYPE) for t in p]
    ideal = lowrank_mlp_roofline(m, width, hidden, r, r, spec) if spec else {}

    def two_layers():
        return two_gemms(two_gemms_gelu(x, p[0], p[1], p[2]), p[3], p[4], p[5])

    return {
        "two-layers+gelu": (two_layers, ideal.get("unfused")),
        "two-layers-compiled": (torch.compile(two_layers, dynamic=False), ideal.get("unfused")),
        "triton-fused-mlp": (lambda: lowrank_mlp(x, *p, "gelu", backend="triton"), ideal.get("fused")),
    }


def measure_impls(op: str, layer: str, shape: dict, impls: dict) -> list[Row]:
    """One row per implementation, each against the first (measured in the same run)."""
    rows: list[Row] = []
    for impl, (fn, ideal) in impls.items():
        extra = {"layer": layer, "ideal_us": ideal}
        try:
            with torch.inference_mode():
                timing, error = cuda_timing(fn), None
        except Exception as exc:  # one impl that cannot run is a finding, not the end of the run
            timing, error = None, first_line(exc)
        first = rows[0] if rows else None
        baselines = {first.impl: first.timing} if first and first.timing and timing else {}
        rows.append(Row(op, impl, "bf16", shape, timing, baselines, extra, error))
        print(f"  {layer:14s} {impl:30s} " + (f"{timing.median * 1e3:9.1f} us" if timing else error)
              + (f"  (ideal {ideal:.1f} us)" if ideal else ""), flush=True)
    return rows


def skipped(op: str, layer: str, shape: dict) -> Row:
    return Row(op, "-", "bf16", shape, None, extra={"layer": layer, "skipped": "step time limit"})


def measure(seconds: float, quick: bool) -> list[Row]:
    """Every shape's rows, within ``seconds`` (shapes past it are recorded as skipped)."""
    spec = device_for(torch.cuda.get_device_name())
    deadline = time.perf_counter() + seconds
    rows: list[Row] = []
    compiled_gelu = torch.compile(two_gemms_gelu, dynamic=False)
    for name, m, k, n, r in LINEAR_SHAPES[:1] if quick else LINEAR_SHAPES:
        shape = {"M": m, "in": k, "out": n, "r": r}
        if time.perf_counter() > deadline:
            rows.append(skipped("lowrank_linear", name, shape))
            continue
        rows += measure_impls("lowrank_linear", name, shape, linear_impls(m, k, n, r, spec, compiled_gelu))
    for name, m, width, hidden, r in MLP_SHAPES[:1] if quick else MLP_SHAPES:
        shape = {"M": m, "width": width, "hidden": hidden, "r": r}
        if time.perf_counter() > deadline:
            rows.append(skipped("lowrank_mlp", name, shape))
            continue
        rows += measure_impls("lowrank_mlp", name, shape, mlp_impls(m, width, hidden, r, spec))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one linear and one MLP shape only")
    p.add_argument("--seconds", type=float, default=600.0, help="shapes after this long are skipped")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_lowrank-vs-cublas.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowrank-vs-cublas: no CUDA device; nothing was measured", file=sys.stderr)
        return 2
    rows = measure(args.seconds, args.quick)
    spec = device_for(torch.cuda.get_device_name())
    path = write_rows(result_path("lowrank-vs-cublas", "cuda", args.out), "lowrank-vs-cublas", rows,
                      environment("cuda"), roofline_device=spec.name if spec else None)
    print(f"wrote {path} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
