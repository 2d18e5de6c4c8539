"""Triton low-rank kernels (linear, MLP, conv) against fp64 references.

Rule (flash-attention's): the kernel's error against fp64 is at most twice the error of the torch path at
the same precision, plus a small floor. Shapes are odd on purpose: M in {1, 17, 197}, ranks that are not
multiples of 16, widths that are not multiples of the blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from utilrank_kernels.nn import LowRankLinear, LowRankMlp, fuse_lowrank_mlps
from utilrank_kernels.ops import lowrank_conv2d, lowrank_linear, lowrank_mlp
from utilrank_kernels.ops._dispatch import choose
from utilrank_kernels.ops.lowrank import (
    lowrank_conv2d_reference,
    lowrank_linear_reference,
    lowrank_mlp_reference,
)

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from utilrank_kernels.triton import lowrank_mlp as mlp_module  # noqa: E402
from utilrank_kernels.triton._autotune import make_configs  # noqa: E402
from utilrank_kernels.triton.lowrank_linear import _gelu_erf, lowrank_linear_triton  # noqa: E402
from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton, mlp_fused_refusal  # noqa: E402

# GELU-tanh's sigmoid(2u) overflows exp to inf (and gives the right 0) for large negative inputs: numpy in
# the interpreter warns where the GPU silently does the same
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def assert_fp64_close(out: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor, dtype: torch.dtype):
    assert out.shape == ref64.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "non-finite output (a tile left unwritten?)"
    err = (out.double() - ref64).abs().max().item()
    err_torch = (ref_same.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + FLOOR[dtype], f"error {err:.3g} vs torch's {err_torch:.3g}"


def factors(k: int, n: int, r: int, dtype, device, bias: bool = True, seed: int = 0):
    """``a`` (r, k), ``b`` (n, r) and bias scaled so that outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    c = torch.randn(n, generator=g) if bias else None
    return [None if t is None else t.to(device=device, dtype=dtype) for t in (a, b, c)]


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def linear_refs(x, a, b, bias, act):
    ref64 = lowrank_linear_reference(x.double(), a.double(), b.double(), _double(bias), act)
    return ref64, lowrank_linear_reference(x, a, b, bias, act)


# ---------------------------------------------------------------------------------------------
# lowrank_linear
# ---------------------------------------------------------------------------------------------
EPILOGUES = [(True, None), (False, "relu"), (True, "gelu"), (True, "gelu_tanh")]
LINEAR_CASES = [
    pytest.param(m, k, n, r, bias, act, dtype,
                 id=f"M{m}-K{k}-N{n}-R{r}-{DTYPE_ID[dtype]}-{'bias' if bias else 'nobias'}-{act}")
    for m in (1, 17, 197)
    for (k, n, r) in ((40, 72, 5), (72, 40, 24), (40, 72, 40))
    for dtype in (torch.float32, torch.float16)
    for bias, act in EPILOGUES
]


@pytest.mark.parametrize("m,k,n,r,bias,act,dtype", LINEAR_CASES)
def test_lowrank_linear(device, m, k, n, r, bias, act, dtype):
    x = torch.randn(m, k, device=device).to(dtype)
    a, b, c = factors(k, n, r, dtype, device, bias)
    out = lowrank_linear(x, a, b, c, act, backend="triton")
    assert_fp64_close(out, *linear_refs(x, a, b, c, act), dtype)


@pytest.fixture
def launches(monkeypatch):
    """The autotune tables the launchers call, with their grids: ``launches(run=False)`` records only (no
    kernel runs: for shapes too large for the interpreter), else every launch also runs."""
    from triton.runtime.autotuner import Autotuner

    from utilrank_kernels.triton import _autotune

    names = {id(t.tuner): name for name, t in _autotune.TABLES.items()}
    real = Autotuner.run
    seen: list[tuple[str, object, dict]] = []

    def start(run: bool = True):
        def wrapped(self, *args, **kwargs):
            seen.append((names[id(self)], kwargs.get("grid"), kwargs))
            return real(self, *args, **kwargs) if run else None

        monkeypatch.setattr(Autotuner, "run", wrapped)
        return seen

    return start


# (path, rank, dtype) -> the kernel that runs: one pass over x with the rank as one block or two, the chunked
# kernel for ranks wider than the one-pass tables (fp32: 64, 16-bit: 256), or the split path
PATH_CASES = [
    ("fused", 24, torch.float32, "lowrank_linear.fused[fp32,W=32]"),  # one block of 32
    ("fused", 40, torch.float16, "lowrank_linear.fused[16-bit,W=64]"),  # 32 + 16
    ("fused", 189, torch.float16, "lowrank_linear.fused[16-bit,W=256]"),  # 128 + 64
    ("fused", 75, torch.float32, "lowrank_linear.chunked[fp32]"),
    ("fused", 267, torch.float16, "lowrank_linear.chunked[16-bit]"),
    ("split", 24, torch.float32, "lowrank_linear.shrink[fp32]"),
    ("split", 189, torch.float16, "lowrank_linear.shrink[16-bit]"),
]


@pytest.mark.parametrize("m", [1, 17, 197])
@pytest.mark.parametrize("path,r,dtype,table", PATH_CASES,
                         ids=[f"{p}-R{r}-{DTYPE_ID[d]}" for p, r, d, _ in PATH_CASES])
def test_lowrank_linear_paths(device, launches, path, r, dtype, table, m):
    """Every kernel at every M, whichever "auto" would pick; the fused path also with its output tiles
    split over 3 programs per row block (an uneven share: 40 outputs are 1 tile of 64)."""
    x = torch.randn(m, 72, device=device).to(dtype)
    a, b, c = factors(72, 40, r, dtype, device)
    ran = launches()
    for n_split in (None, 3) if path == "fused" else (None,):
        out = lowrank_linear_triton(x, a, b, c, "gelu", path=path, n_split=n_split)
        assert_fp64_close(out, *linear_refs(x, a, b, c, "gelu"), dtype)
    assert ran[0][0] == table


def test_rank_blocks():
    """The fused kernel's rank blocks: powers of two of at least 16 covering r, two blocks only where they
    are narrower than one; known answers for ViT ranks."""
    from utilrank_kernels.triton.lowrank_linear import rank_blocks

    assert [rank_blocks(r) for r in (1, 5, 24, 40, 96, 144, 192, 200, 256)] == [
        (16, 0), (16, 0), (32, 0), (32, 16), (64, 32), (128, 16), (128, 64), (256, 0), (256, 0)]
    for r in range(1, 600):
        r1, r2 = rank_blocks(r)
        one = max(16, 1 << (r - 1).bit_length())
        assert r1 + r2 >= r and r1 >= 16 and r1 & (r1 - 1) == 0, r
        assert r2 == 0 or (16 <= r2 < r1 and r2 & (r2 - 1) == 0 and r1 + r2 < one), r
        assert r1 + r2 <= one and r1 + r2 - r < max(16, (r1 + r2) // 3), r  # at most a third wasted past 16


def test_lowrank_linear_grid_rule(monkeypatch, launches):
    """``path="auto"`` on a 132-SM GPU (H100 SXM), recorded, not run: fused where 64-row blocks times the
    splits allowed fill the SMs, else split; the fused grid fills the SMs at most once."""
    from utilrank_kernels.triton import lowrank_linear as ll

    monkeypatch.setattr(ll, "sm_count", lambda device: 132)
    seen = launches(run=False)
    cases = [  # (M, K, N, r) -> tables, and the fused grid of the first row (BM = 128)
        ((12608, 768, 3072, 192), ["lowrank_linear.fused[16-bit,W=256]"], (99, 1)),  # ViT-B/16 fc1, batch 64
        ((12608, 3072, 768, 192), ["lowrank_linear.fused[16-bit,W=256]"], (99, 1)),  # fc2
        ((197, 768, 3072, 192), ["lowrank_linear.shrink[16-bit]", "lowrank_linear.epilogue[large,16-bit]"], None),
        ((2048, 768, 3072, 192), ["lowrank_linear.shrink[16-bit]", "lowrank_linear.epilogue[large,16-bit]"], None),
        ((4096, 768, 3072, 192), ["lowrank_linear.fused[16-bit,W=256]"], (32, 3)),  # 32 blocks, 3 splits each
        ((4096, 3072, 768, 192), ["lowrank_linear.shrink[16-bit]", "lowrank_linear.epilogue[large,16-bit]"], None),
        ((8448, 3072, 768, 192), ["lowrank_linear.fused[16-bit,W=256]"], (66, 1)),  # 132 blocks of 64
        ((12608, 768, 3072, 384), ["lowrank_linear.chunked[16-bit]"], (99, 1)),
    ]
    for (m, k, n, r), tables, grid in cases:
        seen.clear()
        x = torch.empty(m, k, dtype=torch.float16)
        lowrank_linear_triton(x, torch.empty(r, k, dtype=x.dtype), torch.empty(n, r, dtype=x.dtype), None, "gelu")
        assert [name for name, _, _ in seen] == tables, (m, k, n, r)
        if grid is not None:
            assert tuple(seen[0][1]({**seen[0][2], "BM": 128})) == grid, (m, k, n, r)


@triton.jit
def _gelu_kernel(x, out, n, OUT16: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(out + o, _gelu_erf(tl.load(x + o, mask=m), OUT16), mask=m)


@pytest.mark.parametrize("out16,rel,edge,tail", [(False, 2.0**-16, 8, 6.3e-16), (True, 2.0e-5, 7, 1.3e-12)],
                         ids=["fp32-out", "16-bit-out"])
def test_gelu_erf_accuracy(device, out16, rel, edge, tail):
    """The kernels' erf GELU (one exp2 and a polynomial) in fp32 against fp64 ``y Phi(y)``: within ``rel`` of
    the result (fp32 outputs: 2^-16, 1/32 of an fp16 ulp; 16-bit outputs: 2e-5, 1/50 of one), plus
    ``|y| Phi(-edge)`` absolute beyond |y| = edge, where the polynomial stops; never a larger absolute error
    than torch's own fp32 ``F.gelu`` (off by up to 100% in the negative tail, where its ``1 + erf``
    cancels); finite up to |y| = 1e4."""
    tail_y = torch.logspace(-8, 4, 2001)
    y = torch.cat([torch.linspace(-12, 12, 48001), -tail_y, tail_y]).to(device)
    out = torch.empty_like(y)
    _gelu_kernel[(triton.cdiv(y.numel(), 4096),)](y, out, y.numel(), out16, BLOCK=4096)
    y64 = y.double()
    ref = 0.5 * y64 * torch.special.erfc(-y64 / 2**0.5)
    err = (out.double() - ref).abs()
    assert torch.isfinite(out).all()
    bound = rel * ref.abs() + torch.where(y64.abs() <= edge, 0.0, tail * y64.abs())
    assert (err <= bound).all(), (err / bound).max().item()
    assert err.max() <= (torch.nn.functional.gelu(y).double() - ref).abs().max()


def _noncontiguous_inputs(device):
    base = torch.randn(5, 9, 80, device=device)
    yield "3d", torch.randn(2, 9, 40, device=device)
    yield "3d-permuted", torch.randn(9, 2, 40, device=device).transpose(0, 1)  # rows not mergeable
    yield "3d-strided-k", base[..., ::2]  # stride 2 along K
    yield "2d-transposed", torch.randn(40, 17, device=device).T
    yield "4d-permuted", torch.randn(3, 2, 5, 40, device=device).permute(1, 0, 2, 3)
    yield "1d", torch.randn(40, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
def test_lowrank_linear_layouts(device, dtype):
    a, b, c = factors(40, 72, 5, dtype, device)
    a_t = a.T.contiguous().T  # column-major factor: strides are honoured for the weights too
    for name, x in _noncontiguous_inputs(device):
        x = x.to(dtype)
        for path in ("fused", "split"):
            out = lowrank_linear_triton(x, a_t, b, c, "gelu_tanh", path=path)
            assert out.is_contiguous(), name
            assert_fp64_close(out, *linear_refs(x, a, b, c, "gelu_tanh"), dtype)


def test_lowrank_linear_empty_and_errors(device):
    a, b, c = factors(40, 72, 5, torch.float32, device)
    assert lowrank_linear(torch.randn(0, 40, device=device), a, b, c, backend="triton").shape == (0, 72)
    with pytest.raises(ValueError, match="dtype"):
        lowrank_linear(torch.randn(3, 40, device=device, dtype=torch.float16), a, b, c, backend="triton")
    with pytest.raises(ValueError, match="activation"):
        lowrank_linear(torch.randn(3, 40, device=device), a, b, c, "swish", backend="triton")
    with pytest.raises(RuntimeError, match="inference-only"):
        lowrank_linear(torch.randn(3, 40, device=device, requires_grad=True), a, b, c, backend="triton")


# ---------------------------------------------------------------------------------------------
# lowrank_mlp and LowRankMlp
# ---------------------------------------------------------------------------------------------
ACT_LAYERS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


def factored_timm_mlp(k: int, hidden: int, r1: int, r2: int, act: str, bias=(True, True), seed: int = 0,
                      ) -> Mlp:
    """A timm Mlp whose fc1 and fc2 are LowRankLinear (torch backend) with random factors (outputs O(1))."""
    torch.manual_seed(seed)
    mlp = Mlp(k, hidden, act_layer=ACT_LAYERS[act], bias=bias)
    for name, r in (("fc1", r1), ("fc2", r2)):
        dense = getattr(mlp, name)
        a, b, _ = factors(dense.in_features, dense.out_features, r, torch.float32, "cpu", seed=seed + r)
        layer = LowRankLinear.from_dense(dense, a, b)
        layer.backend = "torch"  # the reference: the fused module picks its own backend
        if layer.bias is not None:
            nn.init.normal_(layer.bias, std=0.5)
        setattr(mlp, name, layer)
    return mlp.eval()


MLP_CASES = [
    pytest.param(m, k, hidden, r1, r2, act, bias, dtype,
                 id=f"M{m}-K{k}-H{hidden}-R{r1}x{r2}-{act}-{DTYPE_ID[dtype]}-bias{int(bias[0])}{int(bias[1])}")
    for m in (1, 17, 145)
    for (k, hidden, r1, r2, act, bias) in ((40, 72, 5, 24, "gelu", (True, True)),
                                           (72, 136, 24, 5, "gelu_tanh", (True, False)),
                                           (40, 96, 16, 8, "relu", (False, True)))
    for dtype in (torch.float32, torch.float16)
]


@pytest.mark.parametrize("m,k,hidden,r1,r2,act,bias,dtype", MLP_CASES)
def test_lowrank_mlp_module(device, m, k, hidden, r1, r2, act, bias, dtype):
    """LowRankMlp (Triton) against the timm Mlp with factored layers it was made from."""
    mlp = factored_timm_mlp(k, hidden, r1, r2, act, bias)
    ref64 = copy.deepcopy(mlp).double()
    mlp = mlp.to(device=device, dtype=dtype)
    fused = LowRankMlp.from_mlp(copy.deepcopy(mlp), backend="triton")
    x = torch.randn(1, m, k, device=device).to(dtype)
    with torch.no_grad():
        out = fused(x)
        assert_fp64_close(out, ref64(x.double().cpu()).to(device), mlp(x), dtype)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("m", [1, 20])
def test_lowrank_mlp_paths(device, path, m):
    mlp = factored_timm_mlp(72, 136, 24, 5, "gelu")
    fc1, fc2 = mlp.fc1, mlp.fc2
    params = [None if t is None else t.detach().to(device)
              for t in (fc1.weight_a, fc1.weight_b, fc1.bias, fc2.weight_a, fc2.weight_b, fc2.bias)]
    x = torch.randn(9, m, 80, device=device)[:, :, 4:76].transpose(0, 1)  # 3-D, permuted, sliced
    # the fused kernel is 16-bit only (fp32 runs as two linears: its FMA tiles spilled, kernel_resources.py)
    dtype = torch.float16 if path == "fused" else torch.float32
    if path == "fused":
        with pytest.raises(ValueError, match="16-bit inputs"):
            lowrank_mlp_triton(x, *params, "gelu", path=path)
    x, params = x.to(dtype), [None if p is None else p.to(dtype) for p in params]
    out = lowrank_mlp_triton(x, *params, "gelu", path=path)
    ref64 = lowrank_mlp_reference(x.double(), *[None if p is None else p.double() for p in params], "gelu")
    ref_same = lowrank_mlp_reference(x.float(), *[None if p is None else p.float() for p in params], "gelu")
    assert_fp64_close(out, ref64, ref_same.to(dtype), dtype)


MLP_FUSED_CASES = [  # ranks of unequal widths (the tables' BR is the wider), odd M, biases and activations
    pytest.param(145, 72, 136, r1, r2, act, bias, id=f"M145-R{r1}x{r2}-{act}-bias{int(bias[0])}{int(bias[1])}")
    for r1, r2, act, bias in ((200, 40, "gelu", (True, True)), (40, 131, "gelu_tanh", (False, True)),
                              (67, 67, "relu", (True, False)), (5, 24, "gelu", (False, False)))
]


@pytest.mark.parametrize("m,k,hidden,r1,r2,act,bias", MLP_FUSED_CASES)
def test_lowrank_mlp_fused(device, m, k, hidden, r1, r2, act, bias):
    """The fused kernel (first row of each table) against fp64, x 3-D and sliced."""
    params = [*factors(k, hidden, r1, torch.float16, device, bias[0], seed=1),
              *factors(hidden, k + 3, r2, torch.float16, device, bias[1], seed=2)]
    x = torch.randn(5, m, k + 8, device=device)[:, :, 8:].to(torch.float16)
    out = lowrank_mlp_triton(x, *params, act, path="fused")
    ref64 = lowrank_mlp_reference(x.double(), *map(_double, params), act)
    ref_same = lowrank_mlp_reference(x.float(), *[None if p is None else p.float() for p in params], act)
    assert_fp64_close(out, ref64, ref_same.half(), torch.float16)


def test_mlp_fused_refusal():
    """Known answers of the eligibility rule (ViT-B/16's MLP, H100's 132 SMs)."""
    vit = (768, 3072, 768)
    assert mlp_fused_refusal(64 * 197, *vit, 192, 192, torch.bfloat16, 132) is None
    assert mlp_fused_refusal(64 * 197, *vit, 48, 96, torch.float16, 132) is None
    assert "programs" in mlp_fused_refusal(197, *vit, 192, 192, torch.bfloat16, 132)  # batch 1: 4 row blocks
    assert "pad to 512" in mlp_fused_refusal(64 * 197, *vit, 304, 304, torch.bfloat16, 132)  # 50% parameters
    assert "useful" in mlp_fused_refusal(64 * 197, *vit, 160, 160, torch.bfloat16, 132)  # 160 -> 256: 62%
    assert "16-bit" in mlp_fused_refusal(64 * 197, *vit, 192, 192, torch.float32, 132)
    assert mlp_fused_refusal(132 * 64, *vit, 192, 192, torch.bfloat16, 132) is None
    assert mlp_fused_refusal(132 * 64 - 64, *vit, 192, 192, torch.bfloat16, 132) is not None


@pytest.mark.parametrize("m,fused", [(256, True), (192, False)])
def test_lowrank_mlp_auto_follows_the_rule(device, monkeypatch, m, fused):
    """``path="auto"`` runs fused exactly where mlp_fused_refusal has no objection (4 row blocks needed
    under the interpreter's 4 stand-in SMs)."""
    split_calls = []
    real = mlp_module.lowrank_linear_triton
    monkeypatch.setattr(mlp_module, "lowrank_linear_triton", lambda *a, **kw: split_calls.append(1) or real(*a, **kw))
    params = [*factors(40, 72, 48, torch.float16, device, seed=1), *factors(72, 40, 48, torch.float16, device, seed=2)]
    x = torch.randn(m, 40, device=device).to(torch.float16)
    sms = mlp_module.sm_count(x.device)
    assert (mlp_fused_refusal(m, 40, 72, 40, 48, 48, torch.float16, sms) is None) == fused
    out = lowrank_mlp_triton(x, *params, "gelu")
    assert bool(split_calls) != fused
    ref_same = lowrank_mlp_reference(x.float(), *[p.float() for p in params], "gelu").half()
    assert_fp64_close(out, lowrank_mlp_reference(x.double(), *map(_double, params), "gelu"), ref_same, torch.float16)


def test_mlp_tables_layout_rules():
    """The compiled-code rules of the tables (lowrank_mlp.py): the chained dot's warps cover the hidden tile
    exactly (BH = 16 * num_warps: no warp repeats another's hidden rows or GELU), and each table's first row,
    which runs on any target, passes sm_80's layout and register rules for every rank width of its table."""
    for br, rows in mlp_module._MLP_ROWS.items():
        configs = make_configs(mlp_module._MLP_KEYS, rows)
        for c in configs:
            assert c.kwargs["BH"] == 16 * c.num_warps, (br, c)
            assert c.kwargs["BM"] >= 32
        for br2 in (64, 128, 256):
            if br2 <= br:
                assert mlp_module._row_fits(configs[0], br2, hopper=False), (br, br2)
    assert max(mlp_module._MLP_ROWS) == 256


def test_lowrank_mlp_module_paths_and_grad(device):
    """Hooks and gradients take the modules path; inference takes the op."""
    mlp = factored_timm_mlp(40, 72, 5, 24, "gelu").to(device)
    fused = LowRankMlp.from_mlp(copy.deepcopy(mlp))
    fused.backend = "triton"
    x = torch.randn(5, 40, device=device)
    with torch.no_grad():
        ref = mlp(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    seen = []
    handle = fused.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert seen == [(5, 72)]
    fused.backend = "auto"  # a gradient is needed: auto takes the torch path
    fused(x).sum().backward()
    mlp(x).sum().backward()
    torch.testing.assert_close(fused.fc1.weight_a.grad, mlp.fc1.weight_a.grad)


# ---------------------------------------------------------------------------------------------
# lowrank_conv2d
# ---------------------------------------------------------------------------------------------
CONV_CASES = [  # (C, H, W, out, r, kernel, stride, padding, dilation, bias)
    pytest.param(3, 9, 7, 10, 5, (3, 3), (1, 1), (1, 1), (1, 1), True, id="3x3-pad1"),
    pytest.param(4, 11, 10, 6, 5, (3, 2), (2, 1), (0, 1), (1, 2), False, id="3x2-stride2-dil2-nobias"),
    pytest.param(3, 8, 8, 7, 6, (3, 3), (1, 1), "same", (1, 1), True, id="same"),
    pytest.param(5, 6, 6, 9, 3, (1, 1), (1, 1), "valid", (1, 1), True, id="1x1-valid"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("c,h,w,n_out,r,kernel,stride,padding,dilation,bias", CONV_CASES)
def test_lowrank_conv2d(device, c, h, w, n_out, r, kernel, stride, padding, dilation, bias, dtype):
    x = torch.randn(2, c, h, w, device=device).to(dtype)
    a = (torch.randn(r, c, *kernel, device=device) / (c * kernel[0] * kernel[1]) ** 0.5).to(dtype)
    b = (torch.randn(n_out, r, 1, 1, device=device) / r**0.5).to(dtype)
    bias_t = torch.randn(n_out, device=device).to(dtype) if bias else None
    out = lowrank_conv2d(x, a, b, bias_t, stride, padding, dilation, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref64 = lowrank_conv2d_reference(*map(_double, (x, a, b, bias_t)), stride, padding, dilation)
    if dtype == torch.float16 and device == "cpu":  # CPU conv has no fp16 kernel everywhere: fp32, rounded
        ref_same = lowrank_conv2d_reference(x.float(), a.float(), b.float(), None if bias_t is None else
                                            bias_t.float(), stride, padding, dilation).to(dtype)
    else:
        ref_same = lowrank_conv2d_reference(x, a, b, bias_t, stride, padding, dilation)
    assert_fp64_close(out, ref64, ref_same, dtype)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, FlopCounterMode, torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck(device):
    x = torch.randn(2, 9, 40, device=device)
    a, b, c = factors(40, 72, 5, torch.float32, device)
    a2, b2, c2 = factors(72, 40, 24, torch.float32, device)
    ops = torch.ops.utilrank
    torch.library.opcheck(ops.lowrank_linear.default, (x, a, b, c, "gelu", "triton"))
    torch.library.opcheck(ops.lowrank_linear.default, (x[0].T.contiguous().T, a, b, None, None, "triton"))
    torch.library.opcheck(ops.lowrank_mlp.default, (x, a, b, c, a2, b2, c2, "gelu_tanh", "triton"))
    xc = torch.randn(2, 3, 9, 7, device=device)
    ac, bc = torch.randn(5, 3, 3, 3, device=device), torch.randn(6, 5, 1, 1, device=device)
    bias_c = torch.randn(6, device=device)
    conv = ops.lowrank_conv2d.default
    torch.library.opcheck(conv, (xc, ac, bc, bias_c, [2, 1], [1, 0], "", [1, 1], "triton"))
    torch.library.opcheck(conv, (xc, ac, bc, None, [1, 1], [0, 0], "same", [1, 2], "triton"))


def test_flop_counter(device):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(3, 7, 40, device=device)
    a, b, c = factors(40, 72, 5, torch.float32, device)
    a2, b2, c2 = factors(72, 40, 24, torch.float32, device)
    xc = torch.randn(2, 3, 9, 7, device=device)
    ac, bc = torch.randn(5, 3, 3, 3, device=device), torch.randn(6, 5, 1, 1, device=device)
    counts = {}
    for backend in ("torch", "triton"):
        with FlopCounterMode(display=False) as counter:
            lowrank_linear(x, a, b, c, backend=backend)
            lowrank_mlp(x, a, b, c, a2, b2, c2, backend=backend)
            lowrank_conv2d(xc, ac, bc, None, (2, 1), (1, 0), (1, 1), backend=backend)
        counts[backend] = counter.get_total_flops()
    m = 21
    expected = (2 * m * 5 * (40 + 72) + 2 * m * (5 * (40 + 72) + 24 * (72 + 40))
                + 2 * 2 * 5 * 5 * 5 * (3 * 9 + 6))  # conv: 5 x 5 output pixels
    assert counts == {"torch": expected, "triton": expected}


def test_compile_fullgraph(device):
    """Dynamo traces the dispatch and keeps the custom ops as single nodes: no graph break."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = LowRankLinear(40, 72, 5, backend="triton")
            self.mlp = Mlp(72, 136, 40)
            self.mlp.fc1 = LowRankLinear(72, 136, 24)
            self.mlp.fc2 = LowRankLinear(136, 40, 8)

        def forward(self, x):
            return self.mlp(self.proj(x))

    net = Net().to(device).eval()
    assert fuse_lowrank_mlps(net) == 1
    net.mlp.backend = "triton"
    x = torch.randn(2, 9, 40, device=device)
    with torch.no_grad():
        eager = net(x)
        compiled = torch.compile(net, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 and ViT-B/L shapes (never in the interpreter)
# ---------------------------------------------------------------------------------------------
VIT_SHAPES = [  # (M, in, out, r)
    (197 * 8, 768, 2304, 128), (197, 768, 3072, 256), (16, 3072, 768, 256), (1, 1024, 4096, 384),
    (197 * 8, 4096, 1024, 384), (64, 1024, 4096, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_ID.get)
@pytest.mark.parametrize("m,k,n,r", VIT_SHAPES, ids=[f"M{m}-K{k}-N{n}-R{r}" for m, k, n, r in VIT_SHAPES])
@pytest.mark.parametrize("path", ["auto", "fused", "split"])
def test_lowrank_linear_gpu(device, path, m, k, n, r, dtype):
    x = torch.randn(m, k, device=device).to(dtype)
    a, b, c = factors(k, n, r, dtype, device)
    out = lowrank_linear_triton(x, a, b, c, "gelu", path=path)
    assert_fp64_close(out, *linear_refs(x, a, b, c, "gelu"), dtype)
    assert choose("lowrank_linear", "auto", x, (a, b, c), rows=m, shape=(k, n, r)).impl != "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("r", [96, 192])
def test_lowrank_mlp_fused_gpu(device, r):
    """The fused kernel, every row the autotuner keeps on this GPU, at ViT-B/16's batch 64."""
    mlp = factored_timm_mlp(768, 3072, r, r, "gelu")
    ref64 = copy.deepcopy(mlp).double().to(device)
    mlp = mlp.to(device=device, dtype=torch.bfloat16)
    params = [t.detach() for t in (mlp.fc1.weight_a, mlp.fc1.weight_b, mlp.fc1.bias, mlp.fc2.weight_a,
                                   mlp.fc2.weight_b, mlp.fc2.bias)]
    x = torch.randn(64 * 197, 768, device=device).to(torch.bfloat16)
    with torch.no_grad():
        out = lowrank_mlp_triton(x, *params, "gelu", path="fused")
        assert_fp64_close(out, ref64(x.double()), mlp(x), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("m", [1, 197, 197 * 16])
@pytest.mark.parametrize("width,r", [(768, 192), (768, 304), (1024, 384)])
def test_lowrank_mlp_gpu(device, dtype, m, width, r):
    mlp = factored_timm_mlp(width, 4 * width, r, r, "gelu")
    ref64 = copy.deepcopy(mlp).double().to(device)
    mlp = mlp.to(device=device, dtype=dtype)
    fused = LowRankMlp.from_mlp(copy.deepcopy(mlp), backend="auto")  # auto: Triton on CUDA
    x = torch.randn(m, width, device=device).to(dtype)
    with torch.no_grad():
        assert_fp64_close(fused(x), ref64(x.double()), mlp(x), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_ID.get)
def test_lowrank_conv2d_gpu(device, dtype):
    x = torch.randn(8, 64, 56, 56, device=device).to(dtype)
    a = (torch.randn(48, 64, 3, 3, device=device) / 24).to(dtype)
    b = (torch.randn(128, 48, 1, 1, device=device) / 7).to(dtype)
    bias = torch.randn(128, device=device).to(dtype)
    out = lowrank_conv2d(x, a, b, bias, (1, 1), (1, 1), (1, 1))
    ref64 = lowrank_conv2d_reference(*(t.double() for t in (x, a, b, bias)), (1, 1), (1, 1), (1, 1))
    ref_same = lowrank_conv2d_reference(x, a, b, bias, (1, 1), (1, 1), (1, 1))
    assert_fp64_close(out, ref64, ref_same, dtype)
