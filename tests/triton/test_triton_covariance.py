"""Triton covariance kernels against an fp64 reference (``X^T X`` of the same, input-dtype, values).

Run on the CPU with ``TRITON_INTERPRET=1 pytest tests/triton`` (fp32/fp16, small shapes) or on a GPU
(everything, including the ``gpu``-marked bf16, large-shape and 1e8-token cases).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utilrank_kernels.ops import conv_covariance_update, covariance_update, mirror_upper_

pytest.importorskip("triton")

from triton.runtime.autotuner import Autotuner  # noqa: E402

from utilrank_kernels.triton import _autotune  # noqa: E402
from utilrank_kernels.triton import covariance as tcov  # noqa: E402

U32 = 2.0**-24  # unit roundoff of the fp32 accumulation
U_TF32 = 2.0**-11  # TF32 rounds the fp32 operands to 10 mantissa bits


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.").replace("float", "fp")


def _sym(d: int, device) -> torch.Tensor:
    """A nonzero symmetric starting accumulator: the kernel must add to it, not overwrite it."""
    a = torch.randn(d, d, dtype=torch.float64, device=device)
    return a + a.T


def assert_gram_close(acc: torch.Tensor, acc0: torch.Tensor, rows: torch.Tensor, u: float = U32) -> None:
    """``acc == acc0 + rows^T rows`` within the fp32-accumulation bound, scaled with the reduction
    length: every entry is a sum of ``n`` products, so its error is a few ``u * sqrt(n)`` times the
    sum of the products' magnitudes (FlagGems-style tolerance, per entry)."""
    r64 = rows.double()
    ref = acc0 + r64.T @ r64
    scale = r64.abs().T @ r64.abs() + 1e-30
    n = max(rows.shape[0], 1)
    err = ((acc.double() - ref).abs() / scale).max().item()
    tol = 8 * u * (n**0.5 + 1)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g} (n={n}, d={rows.shape[-1]})"
    assert torch.allclose(acc, acc.T, rtol=1e-12, atol=0), "result is not symmetric"


# ---------------------------------------------------------------------------------------------
# covariance_update
# ---------------------------------------------------------------------------------------------
SHAPES = [(1, 1), (1, 45), (64, 17), (300, 45), (33, 145), (1100, 17)]  # 1100 rows: split along N


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
@pytest.mark.parametrize("n,d", SHAPES, ids=[f"N{n}-d{d}" for n, d in SHAPES])
def test_covariance_update(device, n, d, dtype):
    x = torch.randn(n, d, device=device).to(dtype)
    acc0 = _sym(d, device)
    acc = acc0.clone()
    covariance_update(acc, x, backend="triton")
    assert_gram_close(acc, acc0, x)


NONCONTIG = {
    "transposed": lambda n, d, **kw: torch.randn(d, n, **kw).T,
    "sliced-cols": lambda n, d, **kw: torch.randn(n, 2 * d, **kw)[:, ::2],
    "sliced-rows": lambda n, d, **kw: torch.randn(3 * n, d, **kw)[1::3],
    "3d-permuted": lambda n, d, **kw: torch.randn(5, n // 5, d, **kw).transpose(0, 1),
    "3d-token-major": lambda n, d, **kw: torch.randn(d, 5, n // 5, **kw).permute(1, 2, 0),
    "4d-uncollapsible": lambda n, d, **kw: torch.randn(2, n // 10, 5, d, **kw).permute(2, 0, 1, 3),
    "broadcast": lambda n, d, **kw: torch.randn(n // 5, 1, d, **kw).expand(n // 5, 5, d),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
@pytest.mark.parametrize("layout", list(NONCONTIG), ids=str)
def test_covariance_noncontiguous(device, layout, dtype):
    x = NONCONTIG[layout](60, 19, device=device, dtype=dtype)
    assert not x.is_contiguous()
    acc0 = _sym(19, device)
    acc = acc0.clone()
    covariance_update(acc, x, backend="triton")
    assert_gram_close(acc, acc0, x.reshape(-1, 19))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
@pytest.mark.parametrize("shape", [(70, 33), (4, 13, 33), (3, 1, 5, 33)], ids=lambda s: "x".join(map(str, s)))
def test_covariance_mask(device, shape, dtype):
    x = torch.randn(shape, device=device).to(dtype)
    mask = torch.rand(shape[:-1], device=device) > 0.4
    x[~mask] = float("nan")  # masked tokens are never read: no NaN may reach the statistics
    acc0 = _sym(33, device)
    acc = acc0.clone()
    covariance_update(acc, x, mask, backend="triton")
    assert_gram_close(acc, acc0, x[mask])


def test_covariance_mask_noncontiguous(device):
    """A transposed (B, T) input with its transposed mask: rows and mask stay in step."""
    x = torch.randn(9, 6, 21, device=device).transpose(0, 1)
    mask = (torch.rand(9, 6, device=device) > 0.5).T
    acc = torch.zeros(21, 21, dtype=torch.float64, device=device)
    covariance_update(acc, x, mask, backend="triton")
    assert_gram_close(acc, torch.zeros_like(acc), x[mask])


@pytest.mark.parametrize("fill", ["none", "all"])
def test_covariance_mask_extremes(device, fill):
    x = torch.randn(40, 9, device=device)
    mask = torch.full((40,), fill == "all", dtype=torch.bool, device=device)
    acc0 = _sym(9, device)
    acc = acc0.clone()
    covariance_update(acc, x, mask, backend="triton")
    assert_gram_close(acc, acc0, x[mask])


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_covariance_splits(device, splits):
    """Every split count gives the same sums: chunks meet in the fp64 accumulator (atomics if > 1)."""
    x = torch.randn(250, 150, device=device)
    mask = torch.rand(250, device=device) > 0.2
    acc0 = _sym(150, device)
    acc = acc0.clone()
    tcov.covariance_update_triton(acc, x, mask, splits=splits)
    assert_gram_close(acc, acc0, x[mask])


def _nan_lower(acc0: torch.Tensor) -> torch.Tensor:
    """``acc0`` with NaN below the diagonal: an upper-triangle update must neither read nor write there."""
    lower = torch.ones_like(acc0, dtype=torch.bool).tril(-1)
    return acc0.masked_fill(lower, float("nan"))


def assert_upper_then_mirror(acc: torch.Tensor, acc0: torch.Tensor, rows: torch.Tensor) -> None:
    lower = torch.ones_like(acc, dtype=torch.bool).tril(-1)
    assert acc[lower].isnan().all(), "an upper-triangle update wrote below the diagonal"
    mirror_upper_(acc)
    assert torch.equal(acc, acc.T)
    assert_gram_close(acc, acc0, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
@pytest.mark.parametrize("splits", [1, 3])
def test_covariance_upper_then_mirror(device, splits, dtype):
    """The statistics pass's update: the upper triangle only (the lower one untouched), mirrored once at the end."""
    x = torch.randn(3, 70, 150, device=device).to(dtype)
    mask = torch.rand(3, 70, device=device) > 0.2
    acc0 = _sym(150, device)
    acc = _nan_lower(acc0)
    for i in range(3):  # several batches, then one mirror
        tcov.covariance_update_triton(acc, x[i], mask[i], upper=True, splits=splits)
    assert_upper_then_mirror(acc, acc0, x[mask])


@pytest.mark.parametrize("splits", [1, 2])
def test_conv_covariance_upper_then_mirror(device, splits):
    x = torch.randn(2, 5, 7, 8, device=device).to(memory_format=torch.channels_last)
    acc0 = _sym(45, device)
    acc = _nan_lower(acc0)
    conv_covariance_update(acc, x, 3, 1, 1, 1, backend="triton", upper=True)
    tcov.conv_covariance_update_triton(acc, x, (3, 3), (1, 1), (1, 1), (1, 1), upper=True, splits=splits)
    rows = _unfold_rows(x, (3, 3), (1, 1), (1, 1), (1, 1))
    assert_upper_then_mirror(acc, acc0, torch.cat([rows, rows]))


def test_no_split_where_the_tiles_fill_the_sms():
    """The split rule: no split (so no atomics) once the tile pairs alone fill the SMs; below that, enough
    splits to fill them. On CPU tensors the interpreter stands in 4 SMs."""
    cpu = torch.device("cpu")
    slots = tcov.sm_count(cpu)
    n = 1 << 20
    for tiles in (slots, 3 * slots + 1, 1000):
        assert tcov._num_splits(tiles, n, tcov._EPILOGUE_ROWS_TENSOR_CORE, cpu) == 1
    for tiles in range(1, slots):
        s = tcov._num_splits(tiles, n, tcov._EPILOGUE_ROWS_TENSOR_CORE, cpu)
        assert s > 1 and tiles * s >= slots
    assert tcov._num_splits(1, 300, tcov._EPILOGUE_ROWS_TENSOR_CORE, cpu) == 1  # too short to split


def test_fp32_precision_choice():
    """fp32 inputs take tf32x3 (TF32 when allowed); 16-bit inputs their own products."""
    x = torch.empty(2, 2)
    assert tcov._precision(x) == "tf32x3"
    assert tcov._precision(x, allow_tf32=True) == "tf32"
    assert tcov._precision(x.half()) == "ieee"


COV_TABLES = [(name, i) for name, table in sorted(_autotune.TABLES.items()) if name.startswith("covariance.")
              for i in range(len(table.configs))]


@pytest.mark.parametrize("name,row", COV_TABLES, ids=[f"{n}-row{i}" for n, i in COV_TABLES])
def test_every_row_upper(device, name, row, monkeypatch):
    """Each autotune row in the statistics pass's mode (upper triangle, no mirror), with 1 and 2 splits; the
    full mode's rows run in tests/triton/test_autotune_rows.py."""
    table = _autotune.TABLES[name]
    real, ran = Autotuner.run, []

    def run(self, *args, **kwargs):
        if self is not table.tuner:
            return real(self, *args, **kwargs)
        ran.append(row)
        return self.fn.run(*args, **kwargs, **table.configs[row].all_kwargs())

    monkeypatch.setattr(Autotuner, "run", run)
    dtype = torch.float32 if "fp32" in name else torch.float16
    for splits in (1, 2):
        acc0 = _sym(27, device)
        acc = _nan_lower(acc0)
        if name.startswith("covariance.syrk"):
            x = torch.randn(130, 27, device=device).to(dtype)
            tcov.covariance_update_triton(acc, x, None, upper=True, splits=splits)
            rows = x
        else:
            x = torch.randn(2, 3, 9, 7, device=device).to(dtype)
            if splits == 2:  # tap-major columns: stored at permuted indices
                x = x.to(memory_format=torch.channels_last)
            tcov.conv_covariance_update_triton(acc, x, (3, 3), (2, 1), (1, 1), (1, 1), upper=True, splits=splits)
            rows = _unfold_rows(x, (3, 3), (2, 1), (1, 1), (1, 1))
        assert_upper_then_mirror(acc, acc0, rows)
    assert ran == [row, row]


def test_covariance_fp32_accumulator_and_repeats(device):
    x1, x2 = torch.randn(50, 20, device=device), torch.randn(30, 20, device=device)
    acc = torch.zeros(20, 20, dtype=torch.float32, device=device)
    covariance_update(acc, x1, backend="triton")
    covariance_update(acc, x2, backend="triton")
    assert acc.dtype == torch.float32
    assert_gram_close(acc, torch.zeros(20, 20, dtype=torch.float64, device=device), torch.cat([x1, x2]))


def test_covariance_fp64_input_and_empty(device):
    x = torch.randn(20, 7, dtype=torch.float64, device=device)
    acc = torch.zeros(7, 7, dtype=torch.float64, device=device)
    covariance_update(acc, x, backend="triton")  # products formed in fp32, as the torch reference does
    assert_gram_close(acc, torch.zeros_like(acc), x.float())
    before = acc.clone()
    covariance_update(acc, x[:0], backend="triton")
    assert torch.equal(acc, before)


def test_covariance_matches_torch_backend(device):
    x = torch.randn(3, 40, 24, device=device)
    mask = torch.rand(3, 40, device=device) > 0.3
    a, b = (torch.zeros(24, 24, dtype=torch.float64, device=device) for _ in range(2))
    covariance_update(a, x, mask, backend="triton")
    covariance_update(b, x, mask, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# conv_covariance_update
# ---------------------------------------------------------------------------------------------
def _unfold_rows(x: torch.Tensor, k, s, p, dil) -> torch.Tensor:
    cols = F.unfold(x.double(), k, dilation=dil, padding=p, stride=s)  # [N, K, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


# n, c, h, w, kernel, stride, padding, dilation, channels_last
CONV_CASES = [
    (2, 3, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), False),
    (2, 3, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), False),
    (1, 4, 10, 9, (3, 3), (1, 1), (2, 2), (2, 2), False),
    (2, 5, 7, 6, (3, 1), (1, 1), (1, 0), (1, 1), False),
    (2, 3, 8, 9, (2, 3), (2, 1), (0, 1), (1, 2), True),
    (2, 3, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), True),
    (1, 3, 8, 8, (4, 4), (4, 4), (0, 0), (1, 1), False),
    (1, 8, 6, 6, (1, 1), (1, 1), (0, 0), (1, 1), True),
    (1, 16, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), False),
    (1, 2, 3, 3, (3, 3), (1, 1), (0, 0), (1, 1), False),
]


def _conv_id(case) -> str:
    n, c, h, w, k, s, p, dil, cl = case
    return (f"N{n}-C{c}-{h}x{w}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{dil[0]}{dil[1]}-"
            + ("cl" if cl else "nchw"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dt)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_covariance(device, case, dtype):
    n, c, h, w, k, s, p, dil, channels_last = case
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    d = c * k[0] * k[1]
    acc0 = _sym(d, device)
    acc = acc0.clone()
    conv_covariance_update(acc, x, k, s, p, dil, backend="triton")
    assert_gram_close(acc, acc0, _unfold_rows(x, k, s, p, dil))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(
    "layout", [(False, False), (False, True), (True, False), (True, True)],
    ids=["chan-major-kfast", "chan-major-pixfast", "tap-major-kfast", "tap-major-pixfast"],
)
def test_conv_layouts(device, layout, channels_last):
    """Each (column order, tile orientation) path, whatever the memory layout picks by default."""
    x = torch.randn(2, 5, 7, 8, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    acc = torch.zeros(5 * 6, 5 * 6, dtype=torch.float64, device=device)
    tcov.conv_covariance_update_triton(acc, x, (2, 3), (1, 2), (1, 1), (2, 1), layout=layout, splits=2)
    assert_gram_close(acc, torch.zeros_like(acc), _unfold_rows(x, (2, 3), (1, 2), (1, 1), (2, 1)))


@pytest.mark.parametrize("view", ["sliced", "permuted-hw"])
def test_conv_noncontiguous(device, view):
    base = torch.randn(2, 6, 9, 10, device=device)
    x = base[:, ::2, 1:] if view == "sliced" else base.transpose(2, 3)
    d = x.shape[1] * 9
    acc = torch.zeros(d, d, dtype=torch.float64, device=device)
    conv_covariance_update(acc, x, 3, 1, 1, 1, backend="triton")
    assert_gram_close(acc, torch.zeros_like(acc), _unfold_rows(x, (3, 3), (1, 1), (1, 1), (1, 1)))


def test_conv_never_unfolds(device, monkeypatch):
    def no_unfold(*args, **kwargs):
        raise AssertionError("the Triton path must not unfold")

    monkeypatch.setattr(F, "unfold", no_unfold)
    monkeypatch.setattr(torch.nn.functional, "unfold", no_unfold)
    x = torch.randn(1, 3, 6, 6, device=device)
    acc = torch.zeros(27, 27, dtype=torch.float64, device=device)
    conv_covariance_update(acc, x, 3, 1, 1, 1, backend="triton")
    assert acc.diagonal().gt(0).all()


def test_conv_empty_output(device):
    acc = torch.zeros(27, 27, dtype=torch.float64, device=device)
    conv_covariance_update(acc, torch.randn(0, 3, 6, 6, device=device), 3, backend="triton")
    assert not acc.any()


# ---------------------------------------------------------------------------------------------
# registration and integration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_covariance_update(device, backend):
    x = torch.randn(4, 5, 9, device=device)
    mask = torch.rand(4, 5, device=device) > 0.5
    for m in (mask, None):
        acc = torch.zeros(9, 9, dtype=torch.float64, device=device)
        torch.library.opcheck(torch.ops.utilrank.covariance_update.default, (acc, x, m, backend, False))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_conv_covariance_update(device, backend):
    x = torch.randn(2, 3, 6, 6, device=device).to(memory_format=torch.channels_last)
    acc = torch.zeros(27, 27, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.utilrank.conv_covariance_update.default,
                          (acc, x, [3, 3], [2, 2], [1, 1], [1, 1], backend))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # [B, T, 4] tokens, not contiguous
        return self.head(self.proj(t))


def test_collect_stats_triton_matches_torch(device):
    from utilrank_kernels.analysis import collect_stats

    model = _Tiny().to(device)
    batches = [torch.randn(2, 3, 8, 8, device=device) for _ in range(2)]

    def mask_fn(b):
        return torch.arange(16, device=b.device).expand(b.shape[0], 16) < 11

    stats = {be: collect_stats(model, batches, backend=be, mask_fn=mask_fn, progress=False)
             for be in ("torch", "triton")}
    for name, s in stats["torch"].layers.items():
        t = stats["triton"].layers[name]
        assert t.tokens == s.tokens
        torch.testing.assert_close(t.cov, s.cov, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, large shapes, accumulation over 1e8 tokens
# ---------------------------------------------------------------------------------------------
LARGE = [(8192, 384), (65536, 768), (8192, 3072), (4096, 4096), (30000, 1000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=_dt)
@pytest.mark.parametrize("n,d", LARGE, ids=[f"N{n}-d{d}" for n, d in LARGE])
def test_covariance_large(n, d, dtype):
    x = (torch.randn(n, d, device="cuda") + 0.3).to(dtype)
    acc0 = _sym(d, "cuda")
    acc = acc0.clone()
    covariance_update(acc, x, backend="triton")
    assert_gram_close(acc, acc0, x)


@pytest.mark.gpu
def test_covariance_bf16_mask_3d():
    x = torch.randn(16, 512, 768, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(16, 512, device="cuda") > 0.25
    acc = torch.zeros(768, 768, dtype=torch.float64, device="cuda")
    covariance_update(acc, x, mask, backend="triton")
    assert_gram_close(acc, torch.zeros_like(acc), x[mask])


@pytest.mark.gpu
def test_covariance_tf32_opt_in():
    x = torch.randn(8192, 512, device="cuda")
    acc = torch.zeros(512, 512, dtype=torch.float64, device="cuda")
    covariance_update(acc, x, backend="triton", allow_tf32=True)
    assert_gram_close(acc, torch.zeros_like(acc), x, u=U_TF32)


@pytest.mark.gpu
def test_covariance_fp32_tf32x3_against_fp32_gemm():
    """fp32 inputs run tf32x3 on the tensor cores: at most twice the error of torch's fp32 GEMM (TF32 off),
    flash-attention's rule; the CPU emulation (benchmarks/studies/covariance_tf32x3.py) predicts ~7x below
    an FMA loop's."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 768, device="cuda", generator=gen) * (1 + torch.rand(768, device="cuda", generator=gen)) + 0.3
    ref = x.double().T @ x.double()
    acc = torch.zeros_like(ref)
    covariance_update(acc, x, backend="triton", upper=True)
    mirror_upper_(acc)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gemm = (x.T @ x).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    err, err_gemm = ((acc - ref).norm() / ref.norm()).item(), ((gemm - ref).norm() / ref.norm()).item()
    assert err <= 2 * err_gemm + 1e-7, f"tf32x3 {err:.3g} against the fp32 GEMM's {err_gemm:.3g}"


@pytest.mark.gpu
def test_covariance_1e8_tokens_fp64_across_batches():
    """Per-batch fp32, across-batch fp64: 1e8 tokens stay within 1e-6 of an fp64 reference."""
    d, batch, n_batches = 128, 1 << 20, 96  # 1.007e8 tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    ref = torch.zeros_like(acc)
    for _ in range(n_batches):
        x = torch.randn(batch, d, device="cuda", generator=gen) + 0.5  # activations are not centered
        covariance_update(acc, x, backend="triton")
        ref.addmm_(x.double().T, x.double())
    rel = ((acc - ref).norm() / ref.norm()).item()
    assert rel <= 1e-6, f"relative error {rel:.3g} after {batch * n_batches:.3g} tokens"


@pytest.mark.gpu
def test_autotune_keeps_accumulator():
    """Autotuning runs the kernel once per candidate: the accumulator is restored in between."""
    x = torch.randn(6000, 640, device="cuda", dtype=torch.bfloat16)
    acc0 = _sym(640, "cuda")
    acc = acc0.clone()
    covariance_update(acc, x, backend="triton")  # a shape bucket seen for the first time: tunes
    assert_gram_close(acc, acc0, x)


CONV_LARGE = [
    # n, c, h, w, kernel, stride, padding, channels_last
    (8, 64, 56, 56, 3, 1, 1, False),
    (8, 64, 56, 56, 3, 1, 1, True),
    (4, 128, 28, 28, 3, 2, 1, True),
    (8, 3, 224, 224, 16, 16, 0, False),
    (8, 3, 224, 224, 7, 2, 3, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dt)
@pytest.mark.parametrize(
    "case", CONV_LARGE,
    ids=lambda c: f"N{c[0]}-C{c[1]}-{c[2]}-k{c[4]}-s{c[5]}-p{c[6]}-" + ("cl" if c[7] else "nchw"),
)
def test_conv_covariance_large(case, dtype):
    n, c, h, w, k, s, p, channels_last = case
    x = torch.randn(n, c, h, w, device="cuda").to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    d = c * k * k
    acc = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    # the first call of a shape bucket autotunes, which clones the accumulator: measure the second
    conv_covariance_update(torch.zeros_like(acc), x, k, s, p, 1, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    conv_covariance_update(acc, x, k, s, p, 1, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 1 << 20, f"{extra} bytes allocated during the update: something was materialized"
    assert_gram_close(acc, torch.zeros_like(acc), _unfold_rows(x, (k, k), (s, s), (p, p), (1, 1)))


@pytest.mark.gpu
def test_auto_backend_uses_triton_on_cuda(monkeypatch):
    calls = []
    real = tcov.covariance_update_triton
    monkeypatch.setattr(tcov, "covariance_update_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    acc = torch.zeros(16, 16, dtype=torch.float64, device="cuda")
    covariance_update(acc, torch.randn(64, 16, device="cuda"))
    assert calls
