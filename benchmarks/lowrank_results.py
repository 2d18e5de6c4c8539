"""The factored forward on a GPU: fused Triton kernels against what peers ship, side by side (issue 5).

    python benchmarks/lowrank_results.py                 # full grid, bf16
    python benchmarks/lowrank_results.py --quick         # a few shapes, to check the script
    UTILRANK_TRITON_CONFIG=first python benchmarks/lowrank_results.py   # no autotuning

Writes benchmarks/results/<device>-lowrank.json. Every row carries the device name, torch/triton
versions, dtype, shape, median/p20/p80 in ms (``triton.testing.do_bench``, L2 flushed between calls) and
the baselines measured in the same run, so a row's ratios are side-by-side measurements:

- ``lowrank_linear``: Triton ("triton-auto" and each path, "triton-fused"/"triton-split", to tune
  ``SMALL_M``) against the two-call torch path (``F.linear`` twice: addmm, what peers ship) and the dense
  ``F.linear`` of the same (in, out);
- ``lowrank_mlp``: ``LowRankMlp`` (fused) against two factored layers plus a separate GELU (torch path)
  and timm's dense ``Mlp``;
- ``lowrank_conv2d``: cuDNN ``r``-filter conv + Triton 1x1 GEMM against two cuDNN convs and the dense
  conv, all channels_last.

``targets`` in the file checks the issue's bars: fused never slower than the two-call path, >= 1.3x at
M <= 64, LowRankMlp >= 1.2x over two factored layers + GELU at M = 197*64.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

LINEAR_SHAPES = [(768, 2304), (768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]
RANKS = [64, 128, 256, 384]
MS = [1, 16, 197, 197 * 64]
MLP_SHAPES = [(768, 3072), (1024, 4096)]  # (width, hidden): ViT-B, ViT-L
CONV_SHAPES = [  # (N, C, H, W, out, r, k)
    (32, 64, 56, 56, 64, 32, 3), (32, 128, 28, 28, 128, 64, 3), (32, 256, 14, 14, 256, 128, 3),
    (32, 512, 7, 7, 512, 256, 3), (1, 256, 14, 14, 256, 64, 3),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn) -> dict:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def row(op: str, impl: str, shape: dict, timing: dict, baselines: dict, env: dict) -> dict:
    out = {"op": op, "impl": impl, "shape": shape, **timing, **env}
    for name, base in baselines.items():
        out[f"{name}_median_ms"] = base["median_ms"]
        out[f"speedup_vs_{name}"] = base["median_ms"] / timing["median_ms"]
    return out


def linear_rows(dtype, env, shapes, ranks, ms) -> list[dict]:
    from utilrank_kernels.ops.lowrank import lowrank_linear_reference
    from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton

    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
        bias = torch.randn(n, device="cuda", dtype=dtype)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            dense = bench(lambda x=x, w=w, bias=bias: F.linear(x, w, bias))
            for r in ranks:
                a = torch.randn(r, k, device="cuda", dtype=dtype) / k**0.5
                b = torch.randn(n, r, device="cuda", dtype=dtype) / r**0.5
                addmm = bench(lambda x=x, a=a, b=b, bias=bias: lowrank_linear_reference(x, a, b, bias))
                shape = {"M": m, "in": k, "out": n, "r": r}
                base = {"addmm": addmm, "dense": dense}
                rows.append(row("lowrank_linear", "addmm", shape, addmm, {"dense": dense}, env))
                rows.append(row("lowrank_linear", "dense", shape, dense, {}, env))
                for path in ("auto", "fused", "split"):
                    t = bench(lambda x=x, a=a, b=b, bias=bias, path=path:
                              lowrank_linear_triton(x, a, b, bias, path=path))
                    rows.append(row("lowrank_linear", f"triton-{path}", shape, t, base, env))
                    print(f"linear M={m:6d} {k:5d}->{n:5d} r={r:3d} triton-{path:5s} "
                          f"{t['median_ms']:.4f} ms  x{addmm['median_ms'] / t['median_ms']:.2f} vs addmm  "
                          f"x{dense['median_ms'] / t['median_ms']:.2f} vs dense", flush=True)
    return rows


def mlp_rows(dtype, env, shapes, ranks, ms) -> list[dict]:
    from timm.layers import Mlp

    from utilrank_kernels.ops.lowrank import lowrank_mlp_reference
    from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton

    rows = []
    for width, hidden in shapes:
        mlp = Mlp(width, hidden).to(device="cuda", dtype=dtype).eval()
        for m in ms:
            x = torch.randn(m, width, device="cuda", dtype=dtype)
            dense = bench(lambda x=x, mlp=mlp: mlp(x))
            for r in ranks:
                p = [torch.randn(r, width), torch.randn(hidden, r), torch.randn(hidden),
                     torch.randn(r, hidden), torch.randn(width, r), torch.randn(width)]
                p = [(t / t.shape[-1] ** 0.5 if t.dim() == 2 else t).to("cuda", dtype) for t in p]
                two = bench(lambda x=x, p=p: lowrank_mlp_reference(x, *p, "gelu"))
                shape = {"M": m, "in": width, "hidden": hidden, "r1": r, "r2": r}
                base = {"two_layers_gelu": two, "dense": dense}
                rows.append(row("lowrank_mlp", "two_layers_gelu", shape, two, {"dense": dense}, env))
                rows.append(row("lowrank_mlp", "dense", shape, dense, {}, env))
                for path in ("auto", "fused", "split"):
                    t = bench(lambda x=x, p=p, path=path: lowrank_mlp_triton(x, *p, "gelu", path=path))
                    rows.append(row("lowrank_mlp", f"triton-{path}", shape, t, base, env))
                    print(f"mlp M={m:6d} {width}->{hidden} r={r:3d} triton-{path:5s} {t['median_ms']:.4f} ms "
                          f"x{two['median_ms'] / t['median_ms']:.2f} vs two layers", flush=True)
    return rows


def conv_rows(dtype, env, shapes) -> list[dict]:
    from utilrank_kernels.ops.lowrank import lowrank_conv2d_reference
    from utilrank_kernels.triton.lowrank_conv2d import lowrank_conv2d_triton

    rows = []
    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, device="cuda", dtype=dtype) * scale
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    for n, c, h, w, out, r, k in shapes:
        x = randn(n, c, h, w)
        wd, a = randn(out, c, k, k, scale=(c * k * k) ** -0.5), randn(r, c, k, k, scale=(c * k * k) ** -0.5)
        b = randn(out, r, 1, 1, scale=r**-0.5)
        bias = torch.randn(out, device="cuda", dtype=dtype)
        pad = (k // 2, k // 2)
        dense = bench(lambda x=x, wd=wd, bias=bias, pad=pad: F.conv2d(x, wd, bias, 1, pad))
        two = bench(lambda x=x, a=a, b=b, bias=bias, pad=pad:
                    lowrank_conv2d_reference(x, a, b, bias, (1, 1), pad, (1, 1)))
        t = bench(lambda x=x, a=a, b=b, bias=bias, pad=pad:
                  lowrank_conv2d_triton(x, a, b, bias, (1, 1), pad, (1, 1)))
        shape = {"N": n, "C": c, "H": h, "W": w, "out": out, "r": r, "k": k}
        rows.append(row("lowrank_conv2d", "two_convs", shape, two, {"dense": dense}, env))
        rows.append(row("lowrank_conv2d", "dense", shape, dense, {}, env))
        base = {"two_convs": two, "dense": dense}
        rows.append(row("lowrank_conv2d", "cudnn+triton1x1", shape, t, base, env))
        print(f"conv {shape} {t['median_ms']:.4f} ms  x{two['median_ms'] / t['median_ms']:.2f} vs two convs",
              flush=True)
    return rows


def targets(rows: list[dict]) -> dict:
    fused = [r for r in rows if r["op"] == "lowrank_linear" and r["impl"] == "triton-auto"]
    small = [r for r in fused if r["shape"]["M"] <= 64]
    mlp = [r for r in rows
           if r["op"] == "lowrank_mlp" and r["impl"] == "triton-auto" and r["shape"]["M"] == 197 * 64]

    def worst(rs, key):
        return min((r[key] for r in rs), default=None)

    return {
        "linear_never_slower_than_addmm": {"worst_speedup": worst(fused, "speedup_vs_addmm"), "bar": 1.0},
        "linear_small_m_speedup": {"worst_speedup": worst(small, "speedup_vs_addmm"), "bar": 1.3},
        "mlp_speedup_at_12608_rows": {"worst_speedup": worst(mlp, "speedup_vs_two_layers_gelu"), "bar": 1.2},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--ops", default="linear,mlp,conv", help="comma-separated subset of linear,mlp,conv")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>-lowrank.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("lowrank_results.py measures GPU kernels and needs a CUDA device; none is available here.")
    import triton

    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name()
    env = {"device": device, "torch_version": torch.__version__, "triton_version": triton.__version__,
           "dtype": args.dtype}
    shapes, ranks, ms = LINEAR_SHAPES, RANKS, MS
    mlp_shapes, conv_shapes = MLP_SHAPES, CONV_SHAPES
    if args.quick:
        shapes, ranks, ms = shapes[:2], [128], [1, 197 * 64]
        mlp_shapes, conv_shapes = mlp_shapes[:1], conv_shapes[:1]
    ops = set(args.ops.split(","))
    rows: list[dict] = []
    with torch.inference_mode():
        if "linear" in ops:
            rows += linear_rows(dtype, env, shapes, ranks, ms)
        if "mlp" in ops:
            rows += mlp_rows(dtype, env, mlp_shapes, ranks, ms)
        if "conv" in ops:
            rows += conv_rows(dtype, env, conv_shapes)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{slug}-lowrank.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"format": "utilrank.bench-lowrank/1", "date": datetime.date.today().isoformat(),
              "quick": args.quick, "targets": targets(rows), "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
