"""The low-rank ops' kernel implementations, and their ``torch.library`` custom ops.

Eager calls run the chosen implementation directly (the custom op's Python dispatch costs tens of
microseconds a call, which batch-1 latency feels). Under ``torch.compile``, ``ops/lowrank.py``'s front ends
call ``utilrank::lowrank_linear``, ``utilrank::lowrank_mlp`` and ``utilrank::lowrank_conv2d`` instead:
opaque nodes with a fake implementation for shapes and a flop formula so that ``FlopCounterMode`` counts
them. The implementation ("triton", "cuda", or "torch": the reference, for ``opcheck`` and tests) is
chosen before, by ``ops/_dispatch.py``. The ops are inference paths (no autograd formula): the rule sends
anything that needs a gradient to the torch path, which is plain autograd.

The CUDA extension's entry points live in ``ops/_cuda_ext.py`` (``lowrank_linear_cuda(x, a, b, bias,
activation)``, ``lowrank_mlp_cuda(x, a1, b1, bias1, a2, b2, bias2, activation)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from ..layers import conv_output_size
from ._dispatch import through_op
from .lowrank import lowrank_conv2d_reference, lowrank_linear_reference


def _cuda_function(op: str):
    from . import _cuda_ext

    return getattr(_cuda_ext, f"{op}_cuda")


def run_linear(impl: str, x, a, b, bias, activation) -> torch.Tensor:
    if impl == "triton":
        from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton

        return lowrank_linear_triton(x, a, b, bias, activation)
    if impl == "cuda":
        return _cuda_function("lowrank_linear")(x, a, b, bias, activation)
    if impl == "torch":
        return lowrank_linear_reference(x, a, b, bias, activation).contiguous()
    raise ValueError(f"lowrank_linear: unknown implementation {impl!r}")


def run_mlp(impl: str, x, a1, b1, bias1, a2, b2, bias2, activation) -> torch.Tensor:
    if impl == "triton":
        from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton

        return lowrank_mlp_triton(x, a1, b1, bias1, a2, b2, bias2, activation)
    if impl == "cuda":
        return _cuda_function("lowrank_mlp")(x, a1, b1, bias1, a2, b2, bias2, activation)
    if impl == "torch":
        h = lowrank_linear_reference(x, a1, b1, bias1, activation)
        return lowrank_linear_reference(h, a2, b2, bias2).contiguous()
    raise ValueError(f"lowrank_mlp: unknown implementation {impl!r}")


def run_conv2d(impl: str, x, a, b, bias, stride, padding, dilation) -> torch.Tensor:
    """Every implementation returns channels_last, the layout the Triton path produces."""
    if impl == "triton":
        from utilrank_kernels.triton.lowrank_conv2d import lowrank_conv2d_triton

        return lowrank_conv2d_triton(x, a, b, bias, stride, padding, dilation)
    if impl == "torch":
        y = lowrank_conv2d_reference(x, a, b, bias, stride, padding, dilation)
        return y.clone(memory_format=torch.channels_last)
    raise ValueError(f"lowrank_conv2d: unknown implementation {impl!r}")


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ---------------------------------------------------------------------------------------------
# utilrank::lowrank_linear
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("utilrank::lowrank_linear", mutates_args=())
def _lowrank_linear_op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                       activation: str | None, impl: str) -> torch.Tensor:
    return run_linear(impl, x, a, b, bias, activation)


@_lowrank_linear_op.register_fake
def _(x, a, b, bias, activation, impl):
    return x.new_empty(*x.shape[:-1], b.shape[0])


def _lowrank_linear_flops(x_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Two GEMMs: ``2 M r (in + out)``; bias and activation are not counted (as for ``addmm``)."""
    m = _numel(x_shape[:-1])
    r, k = a_shape
    return 2 * m * r * (k + b_shape[0])


# ---------------------------------------------------------------------------------------------
# utilrank::lowrank_mlp
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("utilrank::lowrank_mlp", mutates_args=())
def _lowrank_mlp_op(x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
                    a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, activation: str | None,
                    impl: str) -> torch.Tensor:
    return run_mlp(impl, x, a1, b1, bias1, a2, b2, bias2, activation)


@_lowrank_mlp_op.register_fake
def _(x, a1, b1, bias1, a2, b2, bias2, activation, impl):
    return x.new_empty(*x.shape[:-1], b2.shape[0])


def _lowrank_mlp_flops(x_shape, a1_shape, b1_shape, bias1_shape, a2_shape, b2_shape, *args,
                       out_shape=None, **kwargs) -> int:
    m = _numel(x_shape[:-1])
    (r1, k), hidden, (r2, n) = a1_shape, b1_shape[0], (a2_shape[0], b2_shape[0])
    return 2 * m * (r1 * (k + hidden) + r2 * (hidden + n))


# ---------------------------------------------------------------------------------------------
# utilrank::lowrank_conv2d
# ---------------------------------------------------------------------------------------------
def _conv_padding(padding_str: str, padding: Sequence[int]) -> Sequence[int] | str:
    return padding_str if padding_str else padding


@torch.library.custom_op("utilrank::lowrank_conv2d", mutates_args=())
def _lowrank_conv2d_op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                       stride: list[int], padding: list[int], padding_str: str, dilation: list[int],
                       impl: str) -> torch.Tensor:
    """``padding_str`` is "same"/"valid" (``padding`` then unused) or "" (``padding`` used). Every
    implementation returns channels_last, the layout the Triton path produces."""
    return run_conv2d(impl, x, a, b, bias, stride, _conv_padding(padding_str, padding), dilation)


def _conv_out_size(size, k: int, stride: int, pad: int, dilation: int, padding_str: str):
    if padding_str == "same":
        return size
    if padding_str == "valid":
        pad = 0
    return conv_output_size((size,), (k,), (stride,), (pad,), (dilation,))[0]


@_lowrank_conv2d_op.register_fake
def _(x, a, b, bias, stride, padding, padding_str, dilation, impl):
    n, _, h, w = x.shape
    kh, kw = a.shape[-2:]
    ho = _conv_out_size(h, kh, stride[0], padding[0], dilation[0], padding_str)
    wo = _conv_out_size(w, kw, stride[1], padding[1], dilation[1], padding_str)
    return x.new_empty(n, ho, wo, b.shape[0]).permute(0, 3, 1, 2)


def _lowrank_conv2d_flops(x_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The ``r``-filter conv and the 1x1 conv at every output pixel: ``2 N Ho Wo r (C kh kw + out)``."""
    n, out, ho, wo = out_shape
    r = a_shape[0]
    return 2 * n * ho * wo * r * (_numel(a_shape[1:]) + out)


for _packet, _formula in ((torch.ops.utilrank.lowrank_linear, _lowrank_linear_flops),
                          (torch.ops.utilrank.lowrank_mlp, _lowrank_mlp_flops),
                          (torch.ops.utilrank.lowrank_conv2d, _lowrank_conv2d_flops)):
    if _packet not in flop_registry:  # a module reload must not register twice (that raises)
        register_flop_formula(_packet)(_formula)


# ---------------------------------------------------------------------------------------------
# entry points used by ops/lowrank.py once the implementation is chosen: eager calls skip the custom op
# ---------------------------------------------------------------------------------------------
def lowrank_linear(impl: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                   activation: str | None) -> torch.Tensor:
    if not through_op():
        return run_linear(impl, x, a, b, bias, activation)
    return torch.ops.utilrank.lowrank_linear(x, a, b, bias, activation, impl)


def lowrank_mlp(impl: str, x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
                a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None,
                activation: str | None) -> torch.Tensor:
    if not through_op():
        return run_mlp(impl, x, a1, b1, bias1, a2, b2, bias2, activation)
    return torch.ops.utilrank.lowrank_mlp(x, a1, b1, bias1, a2, b2, bias2, activation, impl)


def lowrank_conv2d(impl: str, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                   stride: Sequence[int], padding: Sequence[int] | str,
                   dilation: Sequence[int]) -> torch.Tensor:
    if not through_op():
        return run_conv2d(impl, x, a, b, bias, stride, padding, dilation)
    padding_str, pads = (padding, [0, 0]) if isinstance(padding, str) else ("", _pair(padding))
    return torch.ops.utilrank.lowrank_conv2d(x, a, b, bias, _pair(stride), pads, padding_str, _pair(dilation),
                                             impl)
