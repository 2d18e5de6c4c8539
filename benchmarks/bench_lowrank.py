"""pytest-benchmark suite of the factored forward (GPU only; skipped without CUDA).

    pytest benchmarks/bench_lowrank.py --benchmark-enable --benchmark-group-by=param:shape

Each group holds one shape's implementations side by side: the Triton op, the two-call torch path
(addmm, what peers ship) and the dense layer. The full grid and the JSON results are
``benchmarks/lowrank_results.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device")

DTYPE = torch.bfloat16
LINEAR = [(16, 768, 3072, 128), (197, 768, 2304, 256), (197 * 64, 768, 3072, 256), (16, 4096, 1024, 384),
          (197 * 64, 1024, 4096, 384)]
MLP = [(16, 768, 3072, 256), (197 * 64, 768, 3072, 256), (197 * 64, 1024, 4096, 384)]


def _run(benchmark, fn):
    def call():
        fn()
        torch.cuda.synchronize()

    for _ in range(10):  # warm-up: compiles and autotunes outside the timed rounds
        call()
    with torch.inference_mode():
        benchmark.pedantic(call, rounds=40, iterations=1, warmup_rounds=5)


@pytest.mark.parametrize("impl", ["triton", "addmm", "dense"])
@pytest.mark.parametrize("shape", LINEAR, ids=[f"M{m}-K{k}-N{n}-R{r}" for m, k, n, r in LINEAR])
def test_lowrank_linear(benchmark, shape, impl):
    from utilrank_kernels.ops.lowrank import lowrank_linear_reference
    from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton

    m, k, n, r = shape
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    a = torch.randn(r, k, device="cuda", dtype=DTYPE) / k**0.5
    b = torch.randn(n, r, device="cuda", dtype=DTYPE) / r**0.5
    bias = torch.randn(n, device="cuda", dtype=DTYPE)
    w = b @ a
    fns = {"triton": lambda: lowrank_linear_triton(x, a, b, bias, "gelu"),
           "addmm": lambda: lowrank_linear_reference(x, a, b, bias, "gelu"),
           "dense": lambda: F.gelu(F.linear(x, w, bias))}
    _run(benchmark, fns[impl])


@pytest.mark.parametrize("impl", ["triton", "two_layers_gelu", "dense"])
@pytest.mark.parametrize("shape", MLP, ids=[f"M{m}-C{c}-H{h}-R{r}" for m, c, h, r in MLP])
def test_lowrank_mlp(benchmark, shape, impl):
    from timm.layers import Mlp

    from utilrank_kernels.ops.lowrank import lowrank_mlp_reference
    from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton

    m, c, h, r = shape
    x = torch.randn(m, c, device="cuda", dtype=DTYPE)
    p = [torch.randn(r, c) / c**0.5, torch.randn(h, r) / r**0.5, torch.randn(h),
         torch.randn(r, h) / h**0.5, torch.randn(c, r) / r**0.5, torch.randn(c)]
    p = [t.to(device="cuda", dtype=DTYPE) for t in p]
    mlp = Mlp(c, h).to(device="cuda", dtype=DTYPE).eval()
    fns = {"triton": lambda: lowrank_mlp_triton(x, *p, "gelu"),
           "two_layers_gelu": lambda: lowrank_mlp_reference(x, *p, "gelu"),
           "dense": lambda: mlp(x)}
    _run(benchmark, fns[impl])


@pytest.mark.parametrize("impl", ["triton", "two_convs", "dense"])
def test_lowrank_conv2d(benchmark, impl):
    from utilrank_kernels.ops.lowrank import lowrank_conv2d_reference
    from utilrank_kernels.triton.lowrank_conv2d import lowrank_conv2d_triton

    cl = torch.channels_last
    x = torch.randn(32, 128, 28, 28, device="cuda", dtype=DTYPE).contiguous(memory_format=cl)
    a = (torch.randn(64, 128, 3, 3, device="cuda", dtype=DTYPE) / 34).contiguous(memory_format=cl)
    b = (torch.randn(128, 64, 1, 1, device="cuda", dtype=DTYPE) / 8).contiguous(memory_format=cl)
    w = (torch.randn(128, 128, 3, 3, device="cuda", dtype=DTYPE) / 34).contiguous(memory_format=cl)
    bias = torch.randn(128, device="cuda", dtype=DTYPE)
    fns = {"triton": lambda: lowrank_conv2d_triton(x, a, b, bias, (1, 1), (1, 1), (1, 1)),
           "two_convs": lambda: lowrank_conv2d_reference(x, a, b, bias, (1, 1), (1, 1), (1, 1)),
           "dense": lambda: F.conv2d(x, w, bias, 1, 1)}
    _run(benchmark, fns[impl])
