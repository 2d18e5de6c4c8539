"""Whole models against their factored forms, on the CPU (fp32) and on the GPU when there is one (bf16, per
backend): the built-in ``vit-digits`` and timm's ViT-B/16 (random init), each cut to 50% of its parameters by
``bench.cut_to_ratio`` (ranks rounded down to a multiple of 16).

    python benchmarks/run.py factored-models                       # CPU, and CUDA where visible
    python benchmarks/run.py factored-models --models vit-digits --iters 5

Per model, the dense model and the factored one (under each backend) are timed interleaved
(``timing.time_interleaved``), each factored row against the dense one; rows (``benchmarks.tools.rows.Row``) go
to ``benchmarks/results/<device>_factored-models.json``. For comparing commits on one machine; the README's rows
come from ``utilrank bench`` (``benchmarks/models/vit_b_engines.py``).
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch
from torch import nn

from benchmarks.tools.rows import Row, against_dense, environment, result_path, write_rows
from utilrank_kernels.bench import cut_to_ratio
from utilrank_kernels.models import BUILTIN_MODELS, build_builtin
from utilrank_kernels.nn import set_backend
from utilrank_kernels.timing import time_interleaved

DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
DTYPE_NAME = {"cpu": "fp32", "cuda": "bf16"}
BACKENDS = {"cpu": ["torch"], "cuda": ["torch", "triton", "auto"]}
# model -> (input shape, batch on the CPU, batch on the GPU)
MODELS = {"vit-digits": ((1, 16, 16), 32, 256), "vit_base_patch16_224": ((3, 224, 224), 2, 64)}


def dense_and_factored(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = build_builtin(name) if name in BUILTIN_MODELS else timm.create_model(name, pretrained=False)
    compressed, _ = cut_to_ratio(dense.eval(), 0.5, 16, arch=name)
    return dense.eval(), compressed.eval()


def model_rows(name: str, device: str, iters: int) -> list[Row]:
    shape, cpu_batch, gpu_batch = MODELS[name]
    batch = gpu_batch if device == "cuda" else cpu_batch
    dense, compressed = (m.to(device=device, dtype=DTYPE[device]) for m in dense_and_factored(name))
    x = torch.randn(batch, *shape, device=device, dtype=DTYPE[device])
    fns = {"dense": lambda: dense(x)}
    fns |= {f"factored-{b}": lambda b=b: set_backend(compressed, b)(x) for b in BACKENDS[device]}
    with torch.inference_mode():
        times = time_interleaved(fns, warmup=3, iters=iters, device=torch.device(device))
    return against_dense(name, DTYPE_NAME[device], {"batch_size": batch, "input": list(shape)}, times,
                         {"param_ratio": 0.5}, digits=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=20, help="interleaved rounds per model (default: 20)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_factored-models.json")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    devices = [d for d in args.devices.split(",") if d]
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--devices cuda: no CUDA device is visible")
    for device in devices:
        rows = [row for name in models for row in model_rows(name, device, args.iters)]
        out = write_rows(result_path("factored-models", device, args.out if len(devices) == 1 else None),
                         "factored-models", rows, environment(device))
        print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
