"""LowRankMlp, fuse_lowrank_mlps, the low-rank custom ops and their dispatch, torch.compile of a factored
ViT: all on the torch path (CPU). The Triton kernels are tested in tests/triton."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from utilrank_kernels.compress.factor import factor_layer, svd_factors
from utilrank_kernels.layers import swap_modules
from utilrank_kernels.nn import LowRankMlp, fuse_lowrank_mlps
from utilrank_kernels.ops import lowrank_conv2d, lowrank_linear, lowrank_mlp
from utilrank_kernels.ops._dispatch import choose
from utilrank_kernels.ops.lowrank import lowrank_linear_reference, lowrank_mlp_reference


def factor_linears(model: nn.Module, keep: float = 0.4) -> nn.Module:
    """Every nn.Linear of ``model`` replaced by a LowRankLinear from its truncated SVD."""

    def factored(child: nn.Module, name: str) -> nn.Module | None:
        if not isinstance(child, nn.Linear):
            return None
        r = max(1, int(keep * min(child.weight.shape)) | 1)  # odd ranks: never a multiple of 16
        return factor_layer(child, *svd_factors(child.weight, r))

    swap_modules(model, factored)
    return model


def tiny_vit(depth: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=2, mlp_ratio=4,
                             num_classes=10)


def factored_mlp(act_layer=nn.GELU, bias=True, norm_layer=None) -> Mlp:
    torch.manual_seed(0)
    mlp = factor_linears(Mlp(40, 72, 24, act_layer=act_layer, bias=bias, norm_layer=norm_layer))
    for layer in (mlp.fc1, mlp.fc2):
        if layer.bias is not None:
            nn.init.normal_(layer.bias, std=0.5)
    return mlp


# ---------------------------------------------------------------------------------------------
# LowRankMlp and fuse_lowrank_mlps
# ---------------------------------------------------------------------------------------------
ACTS = [(nn.GELU, "gelu"), (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.ReLU, "relu")]


@pytest.mark.parametrize("act_layer,name", ACTS, ids=[name for _, name in ACTS])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lowrank_mlp_matches_timm(act_layer, name, bias):
    mlp = factored_mlp(act_layer, bias)
    fused = LowRankMlp.from_mlp(copy.deepcopy(mlp))
    assert fused.activation == name and fused.fc1.in_features == 40 and fused.out_features == 24
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(fused(x), mlp(x), rtol=0, atol=0)  # the torch path is timm's forward
    fused(x).square().sum().backward()
    mlp(x).square().sum().backward()
    for p_fused, p_ref in zip(fused.parameters(), mlp.parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_ref.grad)


def test_lowrank_mlp_op_reference():
    mlp = factored_mlp()
    p = [mlp.fc1.weight_a, mlp.fc1.weight_b, mlp.fc1.bias, mlp.fc2.weight_a, mlp.fc2.weight_b, mlp.fc2.bias]
    x = torch.randn(7, 40)
    with torch.no_grad():
        ref = lowrank_linear_reference(lowrank_linear_reference(x, *p[:3], "gelu"), *p[3:])
        torch.testing.assert_close(lowrank_mlp(x, *p), ref)
        torch.testing.assert_close(lowrank_mlp_reference(x, *p, "gelu"), ref)
    with pytest.raises(ValueError, match="do not chain"):
        lowrank_mlp(x, p[0], p[1], p[2], p[3].T, p[4], p[5])


def test_fuse_lowrank_mlps_keeps_state_dict():
    model = factor_linears(tiny_vit())
    keys = {k: v.shape for k, v in model.state_dict().items()}
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert fuse_lowrank_mlps(model) == 2
    assert all(isinstance(b.mlp, LowRankMlp) for b in model.blocks)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    model.load_state_dict(state)  # a checkpoint of the unfused model loads as is
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert fuse_lowrank_mlps(model) == 0  # nothing left to fuse


def test_fuse_lowrank_mlps_skips_unfusable():
    dense = Mlp(40, 72)
    with_norm = factored_mlp(norm_layer=nn.LayerNorm)
    silu = factored_mlp(act_layer=nn.SiLU)
    model = nn.Sequential(dense, with_norm, silu)
    assert fuse_lowrank_mlps(model) == 0
    for mlp, reason in ((dense, "LowRankLinear"), (with_norm, "norm"), (silu, "activation"),
                        (nn.Linear(3, 3), "not a timm Mlp")):
        with pytest.raises(ValueError, match=reason):
            LowRankMlp.from_mlp(mlp)


# ---------------------------------------------------------------------------------------------
# torch.compile of a factored ViT
# ---------------------------------------------------------------------------------------------
def test_vit_compile_fullgraph_matches_eager():
    """fullgraph: the dispatch of LowRankLinear/LowRankMlp traces without a graph break, in inference and
    in training (where the gradients must match eager's too)."""
    model = factor_linears(tiny_vit())
    fuse_lowrank_mlps(model)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)

    model.train()
    twin = copy.deepcopy(model)
    model(x).sum().backward()
    torch.compile(twin, fullgraph=True, backend="aot_eager")(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.slow
def test_vit_compile_inductor_matches_eager():
    model = factor_linears(tiny_vit(depth=1)).eval()
    fuse_lowrank_mlps(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def test_select():
    """The front ends' use of the dispatch rule (its cases: tests/ops/test_dispatch.py)."""
    x = torch.randn(3, 4)

    def select(op, t, backend, needs_grad):
        return choose(op, backend, t, needs_grad=needs_grad).impl

    assert select("lowrank_linear", x, "auto", needs_grad=False) == "torch"  # CPU: torch path
    assert select("lowrank_linear", x, "torch", needs_grad=True) == "torch"
    with pytest.raises(RuntimeError, match="inference-only"):
        select("lowrank_linear", x, "triton", needs_grad=True)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        select("lowrank_mlp", x, "cuda", needs_grad=False)
    with pytest.raises(ValueError, match="unknown backend"):
        lowrank_linear(x, torch.randn(2, 4), torch.randn(5, 2), backend="cudnn")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            lowrank_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(4, 3, 1, 1),
                           backend="triton")
    if torch.cuda.is_available():
        assert select("lowrank_linear", x.cuda(), "auto", needs_grad=False) == "triton"
        assert select("lowrank_linear", x.cuda(), "auto", needs_grad=True) == "torch"
        assert select("lowrank_linear", x.cuda().double(), "auto", needs_grad=False) == "torch"


# ---------------------------------------------------------------------------------------------
# custom ops: opcheck and flop formulas (implementation "torch")
# ---------------------------------------------------------------------------------------------
def _op_samples():
    x = torch.randn(2, 5, 40)
    a, b, c = torch.randn(5, 40), torch.randn(72, 5), torch.randn(72)
    a2, b2, c2 = torch.randn(24, 72), torch.randn(40, 24), torch.randn(40)
    xc, ac, bc = torch.randn(2, 3, 9, 7), torch.randn(5, 3, 3, 3), torch.randn(6, 5, 1, 1)
    ops = torch.ops.utilrank
    return [
        (ops.lowrank_linear.default, (x, a, b, c, "gelu", "torch")),
        (ops.lowrank_linear.default, (x.transpose(0, 1), a, b, None, None, "torch")),
        (ops.lowrank_mlp.default, (x, a, b, c, a2, b2, c2, "gelu", "torch")),
        (ops.lowrank_conv2d.default, (xc, ac, bc, torch.randn(6), [2, 1], [1, 0], "", [1, 1], "torch")),
        (ops.lowrank_conv2d.default, (xc, ac, bc, None, [1, 1], [0, 0], "same", [1, 2], "torch")),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    op, args = _op_samples()[i]
    torch.library.opcheck(op, args)


def test_flop_formulas():
    from torch.utils.flop_counter import FlopCounterMode

    for op, args in _op_samples():
        with FlopCounterMode(display=False) as as_op:
            op(*args)
        with FlopCounterMode(display=False) as as_aten:  # the same computation, counted by aten's formulas
            if op is torch.ops.utilrank.lowrank_mlp.default:
                lowrank_mlp_reference(*args[:-1])
            elif op is torch.ops.utilrank.lowrank_conv2d.default:
                padding = args[6] or args[5]
                lowrank_conv2d(*args[:4], args[4], padding, args[7], backend="torch")
            else:
                lowrank_linear(*args[:-1], backend="torch")
        assert as_op.get_total_flops() == as_aten.get_total_flops() > 0, op
