"""Roofline times of the factored forward: what two ideal cuBLAS GEMMs, the same plus a separate GELU (the
torch path), and one ideal fused kernel would take on a GPU, each bound by its FLOPs at the tensor cores' peak
or its DRAM bytes at the memory bandwidth, whichever is slower.

    python benchmarks/run.py roofline                    # ViT-B fc1 at batch 64, bf16, H100 SXM
    python benchmarks/run.py roofline --m 197 --k 3072 --n 768 --r 192 --device h200

ViT-B fc1 (M = 12608, K = 768, N = 3072, r = 192, bf16) on an H100 SXM: cuBLAS-ideal 32 us, plus GELU 79 us,
fused 29 us: the fused kernel's edge over well-used cuBLAS is about 10%; its real gain is the activation it
fuses. ``lowrank-vs-cublas`` (``benchmarks/kernels/cublas.py``) prints these beside the measured times.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    tflops: dict[int, float]  # dense tensor-core TFLOP/s by operand bytes (2: fp16/bf16, 4: fp32 on FMA units)
    tb_per_s: float  # DRAM bandwidth


# Vendor datasheets (dense, no sparsity): H100 SXM5 989 bf16 / 67 fp32 TFLOP/s, 3.35 TB/s; H200 the same
# compute, 4.8 TB/s; A100 SXM4 312 / 19.5 TFLOP/s, 2.04 TB/s (80 GB).
DEVICES = {
    "h100": Device("NVIDIA H100 SXM", {2: 989.0, 4: 67.0}, 3.35),
    "h200": Device("NVIDIA H200", {2: 989.0, 4: 67.0}, 4.8),
    "a100": Device("NVIDIA A100 SXM4 80GB", {2: 312.0, 4: 19.5}, 2.04),
}


def device_for(name: str) -> Device | None:
    """The spec sheet entry for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    lowered = name.lower()
    for key in ("h200", "h100", "a100"):  # h200 before h100: "H200" never contains "h100"
        if key in lowered:
            return DEVICES[key]
    return None


def bound_us(flops: float, nbytes: float, device: Device, element_size: int) -> float:
    """Microseconds of a kernel that does ``flops`` and moves ``nbytes`` through DRAM, at the roofline."""
    return max(flops / (device.tflops[element_size] * 1e12), nbytes / (device.tb_per_s * 1e12)) * 1e6


def lowrank_linear_roofline(m: int, k: int, n: int, r: int, device: Device, element_size: int = 2) -> dict:
    """Ideal times (us) of ``y = (x a^T) b^T + bias``: ``cublas`` (two GEMMs, the second with the bias in its
    epilogue, ``t`` through DRAM), ``cublas_gelu`` (the same and a separate GELU reading and writing ``y``),
    ``fused`` (one kernel: reads x and the factors, writes y)."""
    e = element_size
    x, a, b, bias, t, y = m * k * e, r * k * e, n * r * e, n * e, m * r * e, m * n * e
    first = bound_us(2 * m * k * r, x + a + t, device, e)
    second = bound_us(2 * m * r * n, t + b + bias + y, device, e)
    gelu = bound_us(0, 2 * y, device, e)
    fused = bound_us(2 * m * r * (k + n), x + a + b + bias + y, device, e)
    return {"cublas": first + second, "cublas_gelu": first + second + gelu, "fused": fused}


def dense_linear_roofline(m: int, k: int, n: int, device: Device, element_size: int = 2) -> dict:
    """Ideal times (us) of the dense ``y = x w^T + bias``: ``cublas`` (one GEMM, the bias, and a GELU if any,
    in its epilogue) and ``cublas_gelu`` (the same and a separate GELU reading and writing ``y``)."""
    e = element_size
    y = m * n * e
    gemm = bound_us(2 * m * k * n, (m * k + n * k + n) * e + y, device, e)
    return {"cublas": gemm, "cublas_gelu": gemm + bound_us(0, 2 * y, device, e)}


def dense_mlp_roofline(m: int, width: int, hidden: int, device: Device, element_size: int = 2) -> dict:
    """Ideal times (us) of timm's dense Mlp: ``unfused`` (the GELU a kernel of its own) and ``epilogue`` (the
    GELU in fc1's GEMM epilogue, as cuBLASLt's ``torch._addmm_activation`` runs it)."""
    fc1 = dense_linear_roofline(m, width, hidden, device, element_size)
    fc2 = dense_linear_roofline(m, hidden, width, device, element_size)
    return {"unfused": fc1["cublas_gelu"] + fc2["cublas"], "epilogue": fc1["cublas"] + fc2["cublas"]}


def lowrank_mlp_roofline(m: int, width: int, hidden: int, r1: int, r2: int, device: Device,
                         element_size: int = 2) -> dict:
    """Ideal times (us) of timm's Mlp with both layers factored: ``unfused`` (two factored layers as four
    GEMMs and a separate GELU, every intermediate through DRAM), ``epilogue`` (the same with the GELU in a
    GEMM's epilogue) and ``fused`` (one kernel, the hidden activations on chip)."""
    fc1 = lowrank_linear_roofline(m, width, hidden, r1, device, element_size)
    fc2 = lowrank_linear_roofline(m, hidden, width, r2, device, element_size)
    e = element_size
    weights = (r1 * (width + hidden) + hidden + r2 * (hidden + width) + width) * e
    flops = 2 * m * (r1 * (width + hidden) + r2 * (hidden + width))
    fused = bound_us(flops, 2 * m * width * e + weights, device, e)
    return {"unfused": fc1["cublas_gelu"] + fc2["cublas"], "epilogue": fc1["cublas"] + fc2["cublas"],
            "fused": fused}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=12608)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--r", type=int, default=192)
    p.add_argument("--device", default="h100", choices=sorted(DEVICES))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    args = p.parse_args(argv)
    times = lowrank_linear_roofline(args.m, args.k, args.n, args.r, DEVICES[args.device],
                                    4 if args.dtype == "fp32" else 2)
    print(f"M={args.m} K={args.k} N={args.n} r={args.r} {args.dtype} on {DEVICES[args.device].name}: "
          + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
