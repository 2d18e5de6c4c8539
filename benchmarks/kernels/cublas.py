"""What decides the kernels' design on a GPU: each factored op of ViT-B/16 at 50% parameters against the two torch
baselines a user would otherwise run, beside the roofline's ideal times (``benchmarks/kernels/roofline.py``):

- ``lowrank_linear`` for fc1 (GELU), fc2, qkv and proj, and fc1 at r 192 (the shape the compiled code was read
  at), at M 12608 (batch 64 x 197 tokens) and 197 (batch 1): ``torch`` (two plain ``F.linear`` calls and the
  activation as a kernel of its own), ``torch-epilogue`` (the second GEMM through cuBLASLt with the bias and
  GELU in its epilogue, ``torch._addmm_activation``), the package's torch path, Triton ``fused`` and ``split``,
  ``auto`` (what a factored layer runs), and the dense layer of the same function (plain and epilogue);
- ``lowrank_mlp`` at r 192 and 304 (304 is 50% parameters): the fused MLP, two Triton factored linears, the
  two torch baselines over two factored linears, ``auto``, and the dense MLP (plain and epilogue).

Every row carries the others of its case as baselines (``benchmarks.tools.rows.Row``), measured in the same run.

    python benchmarks/run.py lowrank-vs-cublas [--quick] [--seconds 600]

writes ``benchmarks/results/<device>_lowrank-vs-cublas.json``; ``bash benchmarks/gpu_run.sh --call 1`` runs the same
cases as its ``linear`` and ``mlp`` steps.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.kernels.cases import Case, Impl, gpu_timer, measure_cases, scaled_rows
from benchmarks.kernels.roofline import (
    Device,
    dense_linear_roofline,
    dense_mlp_roofline,
    device_for,
    lowrank_linear_roofline,
    lowrank_mlp_roofline,
)
from benchmarks.tools.rows import environment, result_path, write_rows
from utilrank_kernels.ops import lowrank_linear, lowrank_mlp
from utilrank_kernels.ops.lowrank import apply_activation
from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton
from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton

# ViT-B/16's linears at 50% parameters as `utilrank bench --param-ratio 0.5` cuts them (rank = half the
# parameters, rounded down to a multiple of 16): (layer, in, out, rank, activation); fc1 at r 192 too
LINEAR_LAYERS = [
    ("vit_b.fc1", 768, 3072, 304, "gelu"), ("vit_b.fc1", 768, 3072, 192, "gelu"),
    ("vit_b.fc2", 3072, 768, 304, None), ("vit_b.qkv", 768, 2304, 288, None), ("vit_b.proj", 768, 768, 192, None),
]
ROWS = (12608, 197)  # tokens of a batch of 64 and of 1
MLP = ("vit_b.mlp", 768, 3072)  # (layer, width, hidden)
MLP_RANKS = (192, 304)
DTYPE = "bf16"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LINEAR_BASELINES = ("torch", "torch-epilogue", "dense")
MLP_BASELINES = ("torch", "torch-epilogue", "dense", "dense-epilogue")


def _ideal(us: float | None) -> dict:
    return {"ideal_us": us} if us is not None else {}


def _factors(m: int, k: int, n: int, r: int, device: str, dtype: torch.dtype) -> tuple:
    """``x``, ``a``, ``b``, ``bias`` at the scale of a trained layer (outputs of order 1), and the dense
    weight ``b a`` of the same function."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    a = (torch.randn(r, k, device=device) / k**0.5).to(dtype)
    b = (torch.randn(n, r, device=device) / r**0.5).to(dtype)
    bias = torch.randn(n, device=device, dtype=dtype)
    return x, a, b, bias, (b.float() @ a.float()).to(dtype)


def linear_impls(m: int, k: int, n: int, r: int, act: str | None, device: str, dtype: torch.dtype,
                 spec: Device | None) -> dict[str, Impl]:
    x, a, b, bias, w = _factors(m, k, n, r, device, dtype)
    e = x.element_size()
    low = lowrank_linear_roofline(m, k, n, r, spec, e) if spec else {}
    dense = dense_linear_roofline(m, k, n, spec, e) if spec else {}
    gelu = act == "gelu"
    sep = "cublas_gelu" if act else "cublas"  # the activation a kernel of its own
    impls = {
        "torch": Impl(lambda: apply_activation(F.linear(F.linear(x, a), b, bias), act), True,
                      extra=_ideal(low.get(sep))),
        "torch-path": Impl(lambda: lowrank_linear(x, a, b, bias, act, backend="torch"), True),
        "triton-fused": Impl(lambda: lowrank_linear_triton(x, a, b, bias, act, path="fused"),
                             extra=_ideal(low.get("fused"))),
        "triton-split": Impl(lambda: lowrank_linear_triton(x, a, b, bias, act, path="split"),
                             extra=_ideal(low.get("fused"))),
        "auto": Impl(lambda: lowrank_linear(x, a, b, bias, act, backend="auto"), True, extra=_ideal(low.get("fused"))),
        "dense": Impl(lambda: apply_activation(F.linear(x, w, bias), act), True, extra=_ideal(dense.get(sep))),
    }
    if gelu:  # cuBLASLt's bias + GELU epilogue (on CUDA the tanh form): the GELU costs no pass over y
        impls["torch-epilogue"] = Impl(lambda: torch._addmm_activation(bias, F.linear(x, a), b.t(), use_gelu=True),
                                       True, extra=_ideal(low.get("cublas")))
        impls["dense-epilogue"] = Impl(lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True), True,
                                       extra=_ideal(dense.get("cublas")))
    return impls


def mlp_impls(m: int, width: int, hidden: int, r: int, device: str, dtype: torch.dtype,
              spec: Device | None) -> dict[str, Impl]:
    x, a1, b1, bias1, w1 = _factors(m, width, hidden, r, device, dtype)
    _, a2, b2, bias2, w2 = _factors(1, hidden, width, r, device, dtype)
    p = (a1, b1, bias1, a2, b2, bias2)
    e = x.element_size()
    low = lowrank_mlp_roofline(m, width, hidden, r, r, spec, e) if spec else {}
    dense = dense_mlp_roofline(m, width, hidden, spec, e) if spec else {}

    def factored_epilogue():
        h = torch._addmm_activation(bias1, F.linear(x, a1), b1.t(), use_gelu=True)
        return F.linear(F.linear(h, a2), b2, bias2)

    return {
        "torch": Impl(lambda: F.linear(F.linear(F.gelu(F.linear(F.linear(x, a1), b1, bias1)), a2), b2, bias2), True,
                      extra=_ideal(low.get("unfused"))),
        "torch-epilogue": Impl(factored_epilogue, True, extra=_ideal(low.get("epilogue"))),
        "torch-path": Impl(lambda: lowrank_mlp(x, *p, "gelu", backend="torch"), True),
        "triton-fused": Impl(lambda: lowrank_mlp_triton(x, *p, "gelu", path="fused"), extra=_ideal(low.get("fused"))),
        "triton-split": Impl(lambda: lowrank_mlp_triton(x, *p, "gelu", path="split"),
                             extra=_ideal(low.get("epilogue"))),
        "auto": Impl(lambda: lowrank_mlp(x, *p, "gelu", backend="auto"), True, extra=_ideal(low.get("fused"))),
        "dense": Impl(lambda: F.linear(F.gelu(F.linear(x, w1, bias1)), w2, bias2), True,
                      extra=_ideal(dense.get("unfused"))),
        "dense-epilogue": Impl(lambda: F.linear(torch._addmm_activation(bias1, x, w1.t(), use_gelu=True), w2, bias2),
                               True, extra=_ideal(dense.get("epilogue"))),
    }


def linear_cases(device: str = "cuda", *, max_rows: int | None = None, quick: bool = False,
                 spec: Device | None = None) -> list[Case]:
    """The linears of ``LINEAR_LAYERS`` at each of ``ROWS`` (``cases.scaled_rows``: the dry run's CPU)."""
    dtype = DTYPES[DTYPE]
    cases = []
    for layer, k, n, r, act in LINEAR_LAYERS[:1] if quick else LINEAR_LAYERS:
        for rows in ROWS:
            m = scaled_rows(rows, max_rows)
            cases.append(Case("lowrank_linear", layer, DTYPE, {"M": m, "in": k, "out": n, "r": r, "act": act},
                              lambda m=m, k=k, n=n, r=r, act=act: linear_impls(m, k, n, r, act, device, dtype, spec),
                              LINEAR_BASELINES))
    return cases


def mlp_cases(device: str = "cuda", *, max_rows: int | None = None, quick: bool = False,
              spec: Device | None = None) -> list[Case]:
    """ViT-B/16's MLP factored at each of ``MLP_RANKS``, at each of ``ROWS``."""
    layer, width, hidden = MLP
    dtype = DTYPES[DTYPE]
    return [Case("lowrank_mlp", layer, DTYPE, {"M": m, "width": width, "hidden": hidden, "r": r},
                 lambda m=m, r=r: mlp_impls(m, width, hidden, r, device, dtype, spec), MLP_BASELINES)
            for r in (MLP_RANKS[:1] if quick else MLP_RANKS)
            for m in (scaled_rows(rows, max_rows) for rows in ROWS)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fc1 and the MLP at r 192 only")
    p.add_argument("--seconds", type=float, default=600.0, help="cases reached after this long are skipped")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_lowrank-vs-cublas.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowrank-vs-cublas: no CUDA device; nothing was measured", file=sys.stderr)
        return 2
    spec = device_for(torch.cuda.get_device_name())
    cases = linear_cases(quick=args.quick, spec=spec) + mlp_cases(quick=args.quick, spec=spec)
    rows = measure_cases(cases, gpu_timer, deadline=time.monotonic() + args.seconds)
    path = write_rows(result_path("lowrank-vs-cublas", "cuda", args.out), "lowrank-vs-cublas", rows,
                      environment("cuda"), roofline_device=spec.name if spec else None)
    print(f"wrote {path} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
