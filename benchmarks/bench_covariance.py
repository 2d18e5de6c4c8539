"""pytest-benchmark suite for the covariance kernels (needs CUDA; skipped without it).

    python -m pytest benchmarks/bench_covariance.py --benchmark-enable --benchmark-group-by=group

Each group holds the Triton kernel and its baseline on the same input, so the comparison table reads
as a ratio. ``benchmarks/covariance_results.py`` writes the same comparisons to a results file.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from covariance_results import CONV_SHAPES, DTYPES, SYRK_D, SYRK_N

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="covariance benchmarks time CUDA kernels")


def _run(benchmark, fn, **info) -> None:
    import triton

    fn()  # the first call of a shape autotunes
    torch.cuda.synchronize()

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(info, device=torch.cuda.get_device_name(), torch_version=torch.__version__,
                                triton_version=triton.__version__)
    # timm's habit: 10 warm-up and 40 timed iterations
    benchmark.pedantic(call, rounds=40, warmup_rounds=10, iterations=1)


@pytest.fixture(autouse=True)
def _fp32_baseline():
    """Baselines are fp32 as peers run them: TF32 off."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("impl", ["triton", "addmm_fp32"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", SYRK_N, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("d", SYRK_D, ids=lambda d: f"d{d}")
def test_syrk(benchmark, d, n, dtype, impl):
    from utilrank_kernels.ops import covariance_update

    benchmark.group = f"syrk-{dtype}-N{n}-d{d}"
    x = (torch.randn(n, d, device="cuda") + 0.1).to(DTYPES[dtype])
    if impl == "triton":
        acc = torch.zeros(d, d, dtype=torch.float64, device="cuda")
        fn = lambda: covariance_update(acc, x, backend="triton")
    else:
        acc = torch.zeros(d, d, dtype=torch.float32, device="cuda")

        def fn():
            xf = x.float()
            acc.addmm_(xf.T, xf)

    _run(benchmark, fn, dtype=dtype, shape=[n, d], impl=impl)


@pytest.mark.parametrize("impl", ["triton", "unfold_addmm_fp32"])
@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CONV_SHAPES, ids=lambda c: c[0])
def test_conv(benchmark, case, dtype, memory_format, impl):
    from utilrank_kernels.ops import conv_covariance_update

    name, shape, k, s, p = case
    benchmark.group = f"conv-{dtype}-{memory_format}-{name}"
    x = torch.randn(shape, device="cuda").to(DTYPES[dtype])
    if memory_format == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    kdim = shape[1] * k * k
    if impl == "triton":
        acc = torch.zeros(kdim, kdim, dtype=torch.float64, device="cuda")
        fn = lambda: conv_covariance_update(acc, x, k, s, p, 1, backend="triton")
    else:
        acc = torch.zeros(kdim, kdim, dtype=torch.float32, device="cuda")

        def fn():
            patches = F.unfold(x.float(), k, padding=p, stride=s).transpose(1, 2).reshape(-1, kdim)
            acc.addmm_(patches.T, patches)

    _run(benchmark, fn, dtype=dtype, shape=list(shape), kernel_size=k, stride=s, padding=p,
         memory_format=memory_format, impl=impl)
