"""Each factored op against its dense form, on the CPU (fp32) and on the GPU when there is one (bf16, per
backend): ViT-B/16's linear layers (qkv, proj, fc1, fc2, head) and two convs (ViT-B's patch embedding, a VGG 3x3).

    python benchmarks/run.py factored-ops                  # CPU, and CUDA where visible
    python benchmarks/run.py factored-ops --devices cpu --iters 10

Ranks are the ones ``utilrank bench --param-ratio 0.5`` uses (ViT-B/16: 192 for 768x768, 288 for qkv, 304 for
the MLP). Per case, the dense op and each backend's factored op are timed interleaved
(``timing.time_interleaved``), and each factored row is compared with the dense one; rows
(``benchmarks.tools.rows.Row``) go to ``benchmarks/results/<device>_factored-ops.json``. For comparing commits
on one machine; the whole-model rows of the README come from ``utilrank bench``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.tools.rows import Row, against_dense, environment, result_path, write_rows
from utilrank_kernels.ops import lowrank_conv2d, lowrank_linear
from utilrank_kernels.timing import time_interleaved

DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
DTYPE_NAME = {"cpu": "fp32", "cuda": "bf16"}
BACKENDS = {"cpu": ["torch"], "cuda": ["torch", "triton", "auto"]}
BATCH = {"cpu": 2, "cuda": 64}
# (tokens per sample, in, out, rank): ViT-B/16 layers
LINEAR = [(197, 768, 2304, 288), (197, 768, 768, 192), (197, 768, 3072, 304), (197, 3072, 768, 304),
          (1, 768, 1000, 208)]
# (batch, C, H, out, kernel, stride, rank): ViT-B's patch embedding, a VGG 3x3 conv
CONV = [(2, 3, 224, 768, 16, 16, 192), (8, 128, 28, 128, 3, 1, 48)]


def linear_case(device: str, tokens: int, k: int, n: int, r: int) -> tuple[dict, dict[str, Callable]]:
    kw = {"device": device, "dtype": DTYPE[device]}
    m = BATCH[device] * tokens
    x, bias = torch.randn(m, k, **kw), torch.randn(n, **kw)
    w = torch.randn(n, k, **kw) / k**0.5
    a, b = torch.randn(r, k, **kw) / k**0.5, torch.randn(n, r, **kw) / r**0.5
    fns = {"dense": lambda: F.linear(x, w, bias)}
    fns |= {backend: lambda backend=backend: lowrank_linear(x, a, b, bias, backend=backend)
            for backend in BACKENDS[device]}
    return {"M": m, "in": k, "out": n, "r": r}, fns


def conv_case(device: str, n: int, c: int, h: int, o: int, k: int, s: int, r: int) -> tuple[dict, dict]:
    kw = {"device": device, "dtype": DTYPE[device]}
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    x = torch.randn(n, c, h, h, **kw).contiguous(memory_format=fmt)
    pad = k // 2 if s == 1 else 0
    w = (torch.randn(o, c, k, k, **kw) / (c * k * k) ** 0.5).contiguous(memory_format=fmt)
    a = (torch.randn(r, c, k, k, **kw) / (c * k * k) ** 0.5).contiguous(memory_format=fmt)
    b = (torch.randn(o, r, 1, 1, **kw) / r**0.5).contiguous(memory_format=fmt)
    fns = {"dense": lambda: F.conv2d(x, w, None, s, pad)}
    fns |= {backend: lambda backend=backend: lowrank_conv2d(x, a, b, None, (s, s), (pad, pad), backend=backend)
            for backend in BACKENDS[device]}
    return {"N": n, "C": c, "H": h, "W": h, "out": o, "k": k, "stride": s, "r": r}, fns


def case_rows(op: str, device: str, shape: dict, fns: dict[str, Callable], iters: int) -> list[Row]:
    """The dense op and each backend, interleaved; every factored row against the dense one."""
    with torch.inference_mode():
        times = time_interleaved(fns, warmup=5, iters=iters, device=torch.device(device))
    return against_dense(op, DTYPE_NAME[device], shape, times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default="linear,conv", help="comma-separated subset of linear,conv")
    p.add_argument("--iters", type=int, default=20, help="interleaved rounds per case (default: 20)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_factored-ops.json")
    args = p.parse_args(argv)
    devices = [d for d in args.devices.split(",") if d]
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--devices cuda: no CUDA device is visible")
    ops = set(args.ops.split(","))
    for device in devices:
        rows = []
        if "linear" in ops:
            for shape in LINEAR:
                rows += case_rows("lowrank_linear", device, *linear_case(device, *shape), args.iters)
        if "conv" in ops:
            for shape in CONV:
                rows += case_rows("lowrank_conv2d", device, *conv_case(device, *shape), args.iters)
        out = write_rows(result_path("factored-ops", device, args.out if len(devices) == 1 else None),
                         "factored-ops", rows, environment(device))
        print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
