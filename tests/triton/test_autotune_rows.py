"""Every row of every autotune table, run once on a small shape against an fp64 reference.

The autotuner (and ``UTILRANK_TRITON_CONFIG=first``, implied by the interpreter) runs only a table's first
row; here each row is forced in turn: ``Autotuner.run`` is replaced by a call of the kernel with that row's
meta-parameters, for the launches of that table only, and the test checks that the row did run. The split
variants run too: the covariance kernels with 2 splits along N, the fused low-rank linear (one-pass and
chunked) with its output split over 2 programs per row block (``n_split``), the split-K shrink with each
row's ``SPLIT_K``.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from utilrank_kernels.ops.lowrank import lowrank_linear_reference, lowrank_mlp_reference

pytest.importorskip("triton")

from triton.runtime.autotuner import Autotuner  # noqa: E402

from utilrank_kernels.triton import _autotune  # noqa: E402
from utilrank_kernels.triton.covariance import conv_covariance_update_triton, covariance_update_triton  # noqa: E402
from utilrank_kernels.triton.lowrank_linear import fused_width, linear_epilogue, lowrank_linear_triton  # noqa: E402
from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
ROWS = [(name, i) for name, table in sorted(_autotune.TABLES.items()) for i in range(len(table.configs))]


@contextlib.contextmanager
def forced_row(name: str, row: int):
    """Launches of table ``name`` run its row ``row``; returns the list of rows that ran."""
    table = _autotune.TABLES[name]
    real = Autotuner.run
    ran = []

    def run(self, *args, **kwargs):
        if self is not table.tuner:
            return real(self, *args, **kwargs)
        ran.append(row)
        return self.fn.run(*args, **kwargs, **table.configs[row].all_kwargs())

    Autotuner.run = run
    try:
        yield ran
    finally:
        Autotuner.run = real


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if "fp32" in name else torch.float16


def _close(out: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor):
    """flash-attention's rule: at most twice torch's own error at the same precision, plus a floor."""
    assert torch.isfinite(out).all()
    err = (out.double() - ref64).abs().max().item()
    err_torch = (ref_same.double() - ref64).abs().max().item()
    floor = 1e-5 if out.dtype == torch.float32 else 2e-3
    assert err <= 2 * err_torch + floor, f"error {err:.3g} vs torch's {err_torch:.3g}"


def _gram_close(acc: torch.Tensor, acc0: torch.Tensor, rows: torch.Tensor):
    """fp32 accumulation bound per entry, scaled with the reduction length; exactly symmetric."""
    r64 = rows.double()
    scale = r64.abs().T @ r64.abs() + 1e-30
    err = ((acc - acc0 - r64.T @ r64).abs() / scale).max().item()
    assert err <= 8 * 2.0**-24 * (math.sqrt(max(rows.shape[0], 1)) + 1), err
    assert torch.equal(acc, acc.T)


def _factors(k, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, k, generator=g).div(k**0.5).to(dtype), torch.randn(n, r, generator=g).div(r**0.5).to(dtype),
            torch.randn(n, generator=g).to(dtype))


def run_covariance(name, device):
    dtype = _dtype(name)
    for splits in (1, 2):
        x = torch.randn(300, 45, device=device).to(dtype)
        mask = torch.rand(300, device=device) > 0.3
        acc0 = torch.randn(45, 45, dtype=torch.float64, device=device)
        acc0 = acc0 + acc0.T
        acc = acc0.clone()
        covariance_update_triton(acc, x, mask, splits=splits)
        _gram_close(acc, acc0, x[mask])


def run_conv_covariance(name, device):
    dtype = _dtype(name)
    x = torch.randn(2, 3, 9, 7, device=device).to(dtype)
    for splits, channels_last in ((1, False), (2, True)):
        xi = x.to(memory_format=torch.channels_last) if channels_last else x
        acc = torch.zeros(27, 27, dtype=torch.float64, device=device)
        conv_covariance_update_triton(acc, xi, (3, 3), (2, 1), (1, 1), (1, 1), splits=splits)
        cols = F.unfold(x.double(), (3, 3), padding=(1, 1), stride=(2, 1))
        _gram_close(acc, torch.zeros_like(acc), cols.transpose(1, 2).reshape(-1, 27))


def _run_linear(device, dtype, r, n_splits):
    x = torch.randn(70, 40, device=device).to(dtype)  # two 64-row blocks, the second one partial
    a, b, c = (t.to(device) for t in _factors(40, 72, r, dtype))
    ref64 = lowrank_linear_reference(x.double(), a.double(), b.double(), c.double(), "gelu")
    for n_split in n_splits:
        out = lowrank_linear_triton(x, a, b, c, "gelu", path="fused", n_split=n_split)
        _close(out, ref64, lowrank_linear_reference(x, a, b, c, "gelu"))


def run_linear_fused(name, device):
    """A rank in the table's width bucket, not a multiple of 16, held as two rank blocks where the width
    allows (W = 64: 45 -> 32 + 16; 128: 93 -> 64 + 32; 256: 189 -> 128 + 64; fp32 W = 32: 21 -> 32)."""
    width = int(name.split("W=")[1].rstrip("]"))
    r = 3 * width // 4 - 3
    assert fused_width(r, _dtype(name)) == width
    _run_linear(device, _dtype(name), r, (1, 2))


def run_linear_chunked(name, device):
    """A rank wider than the fused tables hold (16-bit: 256, fp32: 64), not a multiple of any BR."""
    dtype = _dtype(name)
    r = 75 if dtype == torch.float32 else 267
    assert fused_width(r, dtype) is None
    _run_linear(device, dtype, r, (1, 2))


def run_linear_split(name, device):
    dtype = _dtype(name)
    x = torch.randn(5, 72, device=device).to(dtype)
    a, b, c = (t.to(device) for t in _factors(72, 40, 24, dtype))
    out = lowrank_linear_triton(x, a, b, c, "relu", path="split")
    ref64 = lowrank_linear_reference(x.double(), a.double(), b.double(), c.double(), "relu")
    _close(out, ref64, lowrank_linear_reference(x, a, b, c, "relu"))


def run_epilogue_large(name, device):
    dtype = _dtype(name)
    t = torch.randn(90, 24, device=device)  # fp32 rows, rounded to w's dtype in the kernel
    _, w, c = (t_.to(device) for t_ in _factors(24, 40, 24, dtype))
    out = linear_epilogue(t, w, c, "gelu_tanh")
    t_same = t.to(dtype)
    ref64 = F.gelu(F.linear(t_same.double(), w.double(), c.double()), approximate="tanh")
    _close(out, ref64, F.gelu(F.linear(t_same, w, c).float(), approximate="tanh").to(dtype))


def run_mlp(name, device):
    dtype = _dtype(name)
    br = int(name.split("BR=")[1].rstrip("]"))
    r = br // 2 + 3  # a rank in this table's bucket, not a multiple of 16
    r2 = 37  # fc2's rank narrower (BR2 = 64): the tables serve every BR2 up to their BR
    k, hidden = 40, 136  # two hidden tiles or more, the last one partial
    g = torch.Generator().manual_seed(1)
    shapes = [(r, k), (hidden, r), (hidden,), (r2, hidden), (k, r2), (k,)]
    params = [(torch.randn(*s, generator=g) / (s[-1] ** 0.5 if len(s) == 2 else 1)).to(device, dtype) for s in shapes]
    x = torch.randn(70, k, device=device).to(dtype)
    out = lowrank_mlp_triton(x, *params, "gelu", path="fused")
    ref64 = lowrank_mlp_reference(x.double(), *[p.double() for p in params], "gelu")
    _close(out, ref64, lowrank_mlp_reference(x, *params, "gelu"))


CASES = {
    "covariance.syrk": run_covariance, "covariance.conv_syrk": run_conv_covariance,
    "lowrank_linear.fused": run_linear_fused, "lowrank_linear.chunked": run_linear_chunked,
    "lowrank_linear.shrink": run_linear_split,
    "lowrank_linear.epilogue[small": run_linear_split, "lowrank_linear.epilogue[large": run_epilogue_large,
    "lowrank_mlp.fused": run_mlp,
}


def case_of(name: str):
    matches = [fn for prefix, fn in CASES.items() if name.startswith(prefix)]
    assert len(matches) == 1, f"table {name!r} has no case in tests/triton/test_autotune_rows.py"
    return matches[0]


def test_every_table_has_a_case():
    for name in _autotune.TABLES:
        case_of(name)


@pytest.mark.parametrize("name,row", ROWS, ids=[f"{name}-row{row}" for name, row in ROWS])
def test_row(device, name, row):
    with forced_row(name, row) as ran:
        case_of(name)(name, device)
    assert ran and set(ran) == {row}, f"{name} row {row} never launched"
