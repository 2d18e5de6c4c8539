"""The factored forward on a GPU: fused Triton kernels against what peers ship, side by side (issue 5).

    python benchmarks/run.py lowrank                 # full grid, bf16
    python benchmarks/run.py lowrank --quick         # a few shapes, to check the script
    UTILRANK_TRITON_CONFIG=first python benchmarks/run.py lowrank   # no autotuning

Writes ``benchmarks/results/<device>_lowrank.json``: ``benchmarks.tools.rows.Row`` s (device, torch/triton
versions, dtype, shape, median/p20/p80 in ms by ``cuda_timing``: CUDA events, L2 flushed between calls) with the
baselines measured in the same run, so a row's ratios are side-by-side measurements:

- ``lowrank_linear``: Triton ("triton-auto" and each path, "triton-fused"/"triton-split", to tune
  ``SMALL_M``) against the two-call torch path (``F.linear`` twice: addmm, what peers ship) and the dense
  ``F.linear`` of the same (in, out);
- ``lowrank_mlp``: ``LowRankMlp`` (fused) against two factored layers plus a separate GELU (torch path), the
  same with the bias and GELU in cuBLASLt's epilogue (``torch._addmm_activation``), and timm's dense ``Mlp``;
- ``lowrank_conv2d``: cuDNN ``r``-filter conv + Triton 1x1 GEMM against two cuDNN convs and the dense
  conv, all channels_last.

``targets`` in the file checks the issue's bars: fused never slower than the two-call path, >= 1.3x at
M <= 64, LowRankMlp >= 1.2x over two factored layers + GELU at M = 197*64.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from timm.layers import Mlp

from benchmarks.tools.rows import Row, cuda_timing, environment, result_path, write_rows
from utilrank_kernels.ops.lowrank import lowrank_conv2d_reference, lowrank_linear_reference, lowrank_mlp_reference
from utilrank_kernels.triton.lowrank_conv2d import lowrank_conv2d_triton
from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton
from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton

LINEAR_SHAPES = [(768, 2304), (768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]
RANKS = [64, 128, 256, 384]
MS = [1, 16, 197, 197 * 64]
MLP_SHAPES = [(768, 3072), (1024, 4096)]  # (width, hidden): ViT-B, ViT-L
CONV_SHAPES = [  # (N, C, H, W, out, r, k)
    (32, 64, 56, 56, 64, 32, 3), (32, 128, 28, 28, 128, 64, 3), (32, 256, 14, 14, 256, 128, 3),
    (32, 512, 7, 7, 512, 256, 3), (1, 256, 14, 14, 256, 64, 3),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def linear_rows(dtype: str, shapes, ranks, ms) -> list[Row]:
    kw = {"device": "cuda", "dtype": DTYPES[dtype]}
    rows = []
    for k, n in shapes:
        w, bias = torch.randn(n, k, **kw) / k**0.5, torch.randn(n, **kw)
        for m in ms:
            x = torch.randn(m, k, **kw)
            dense = cuda_timing(lambda x=x, w=w, bias=bias: F.linear(x, w, bias))
            for r in ranks:
                a, b = torch.randn(r, k, **kw) / k**0.5, torch.randn(n, r, **kw) / r**0.5
                addmm = cuda_timing(lambda x=x, a=a, b=b, bias=bias: lowrank_linear_reference(x, a, b, bias))
                shape = {"M": m, "in": k, "out": n, "r": r}
                rows += [Row("lowrank_linear", "addmm", dtype, shape, addmm, {"dense": dense}),
                         Row("lowrank_linear", "dense", dtype, shape, dense)]
                for path in ("auto", "fused", "split"):
                    t = cuda_timing(lambda x=x, a=a, b=b, bias=bias, path=path:
                                    lowrank_linear_triton(x, a, b, bias, path=path))
                    rows.append(Row("lowrank_linear", f"triton-{path}", dtype, shape, t,
                                    {"addmm": addmm, "dense": dense}))
                    print(f"linear M={m:6d} {k:5d}->{n:5d} r={r:3d} triton-{path:5s} {t.median:.4f} ms  "
                          f"x{rows[-1].speedup('addmm'):.2f} vs addmm  x{rows[-1].speedup('dense'):.2f} vs dense",
                          flush=True)
    return rows


def two_layers_epilogue(x, a1, b1, bias1, a2, b2, bias2):
    """Two factored layers with fc1's bias and GELU in cuBLASLt's GEMM epilogue (``torch._addmm_activation``,
    on CUDA the tanh GELU): the stronger torch baseline."""
    h = torch._addmm_activation(bias1, F.linear(x, a1), b1.t(), use_gelu=True)
    return F.linear(F.linear(h, a2), b2, bias2)


def mlp_rows(dtype: str, shapes, ranks, ms) -> list[Row]:
    rows = []
    for width, hidden in shapes:
        mlp = Mlp(width, hidden).to(device="cuda", dtype=DTYPES[dtype]).eval()
        for m in ms:
            x = torch.randn(m, width, device="cuda", dtype=DTYPES[dtype])
            dense = cuda_timing(lambda x=x, mlp=mlp: mlp(x))
            for r in ranks:
                p = [torch.randn(r, width), torch.randn(hidden, r), torch.randn(hidden),
                     torch.randn(r, hidden), torch.randn(width, r), torch.randn(width)]
                p = [(t / t.shape[-1] ** 0.5 if t.dim() == 2 else t).to("cuda", DTYPES[dtype]) for t in p]
                two = cuda_timing(lambda x=x, p=p: lowrank_mlp_reference(x, *p, "gelu"))
                epilogue = cuda_timing(lambda x=x, p=p: two_layers_epilogue(x, *p))
                shape = {"M": m, "in": width, "hidden": hidden, "r1": r, "r2": r}
                rows += [Row("lowrank_mlp", "two_layers_gelu", dtype, shape, two, {"dense": dense}),
                         Row("lowrank_mlp", "two_layers_epilogue", dtype, shape, epilogue, {"dense": dense}),
                         Row("lowrank_mlp", "dense", dtype, shape, dense)]
                for path in ("auto", "fused", "split"):
                    t = cuda_timing(lambda x=x, p=p, path=path: lowrank_mlp_triton(x, *p, "gelu", path=path))
                    rows.append(Row("lowrank_mlp", f"triton-{path}", dtype, shape, t,
                                    {"two_layers_gelu": two, "two_layers_epilogue": epilogue, "dense": dense}))
                    print(f"mlp M={m:6d} {width}->{hidden} r={r:3d} triton-{path:5s} {t.median:.4f} ms "
                          f"x{rows[-1].speedup('two_layers_gelu'):.2f} vs two layers", flush=True)
    return rows


def conv_rows(dtype: str, shapes) -> list[Row]:
    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, device="cuda", dtype=DTYPES[dtype]) * scale
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    rows = []
    for n, c, h, w, out, r, k in shapes:
        x = randn(n, c, h, w)
        wd, a = randn(out, c, k, k, scale=(c * k * k) ** -0.5), randn(r, c, k, k, scale=(c * k * k) ** -0.5)
        b = randn(out, r, 1, 1, scale=r**-0.5)
        bias = randn(out)
        pad = (k // 2, k // 2)
        dense = cuda_timing(lambda x=x, wd=wd, bias=bias, pad=pad: F.conv2d(x, wd, bias, 1, pad))
        two = cuda_timing(lambda x=x, a=a, b=b, bias=bias, pad=pad:
                          lowrank_conv2d_reference(x, a, b, bias, (1, 1), pad, (1, 1)))
        t = cuda_timing(lambda x=x, a=a, b=b, bias=bias, pad=pad:
                        lowrank_conv2d_triton(x, a, b, bias, (1, 1), pad, (1, 1)))
        shape = {"N": n, "C": c, "H": h, "W": w, "out": out, "r": r, "k": k}
        rows += [Row("lowrank_conv2d", "two_convs", dtype, shape, two, {"dense": dense}),
                 Row("lowrank_conv2d", "dense", dtype, shape, dense),
                 Row("lowrank_conv2d", "cudnn+triton1x1", dtype, shape, t, {"two_convs": two, "dense": dense})]
        print(f"conv {shape} {t.median:.4f} ms  x{rows[-1].speedup('two_convs'):.2f} vs two convs", flush=True)
    return rows


def targets(rows: list[Row]) -> dict:
    fused = [r for r in rows if r.op == "lowrank_linear" and r.impl == "triton-auto"]
    small = [r for r in fused if r.shape["M"] <= 64]
    mlp = [r for r in rows if r.op == "lowrank_mlp" and r.impl == "triton-auto" and r.shape["M"] == 197 * 64]

    def worst(rs, baseline):
        return min((r.speedup(baseline) for r in rs), default=None)

    return {
        "linear_never_slower_than_addmm": {"worst_speedup": worst(fused, "addmm"), "bar": 1.0},
        "linear_small_m_speedup": {"worst_speedup": worst(small, "addmm"), "bar": 1.3},
        "mlp_speedup_at_12608_rows": {"worst_speedup": worst(mlp, "two_layers_gelu"), "bar": 1.2},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--ops", default="linear,mlp,conv", help="comma-separated subset of linear,mlp,conv")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_lowrank.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowrank: measures GPU kernels and needs a CUDA device; none is available here.", file=sys.stderr)
        return 2
    shapes, ranks, ms = LINEAR_SHAPES, RANKS, MS
    mlp_shapes, conv_shapes = MLP_SHAPES, CONV_SHAPES
    if args.quick:
        shapes, ranks, ms = shapes[:2], [128], [1, 197 * 64]
        mlp_shapes, conv_shapes = mlp_shapes[:1], conv_shapes[:1]
    ops = set(args.ops.split(","))
    rows: list[Row] = []
    with torch.inference_mode():
        if "linear" in ops:
            rows += linear_rows(args.dtype, shapes, ranks, ms)
        if "mlp" in ops:
            rows += mlp_rows(args.dtype, mlp_shapes, ranks, ms)
        if "conv" in ops:
            rows += conv_rows(args.dtype, conv_shapes)
    found = targets(rows)
    out = write_rows(result_path("lowrank", "cuda", args.out), "lowrank", rows, environment("cuda"),
                     quick=args.quick, targets=found)
    print(json.dumps(found, indent=2))
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
