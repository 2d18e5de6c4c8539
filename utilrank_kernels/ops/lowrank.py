"""Factored layers' forward: ``y = act(b (a x) + bias)`` for linear and conv layers, and timm's ``Mlp`` with
both layers factored (``lowrank_mlp``): the torch references, the ``torch.library`` custom ops
(``utilrank::lowrank_linear``, ``utilrank::lowrank_mlp``, ``utilrank::lowrank_conv2d``) with their fakes and
FLOP formulas, and the front ends.

The torch path (two ``F.linear`` / ``F.conv2d`` calls) is the reference, the CPU path and the training
path: it is plain autograd-, ``torch.compile``- and ``FlopCounterMode``-friendly torch. In eager inference on
CUDA, the second call of a linear with a bias and a ReLU or tanh-GELU is ``torch._addmm_activation``, which runs
bias and activation in cuBLASLt's GEMM epilogue (:func:`epilogue_applies`). Kernel backends
(Triton, the CUDA extension of ``ops/_cuda_ext.py``) are inference paths behind the same functions; which one
runs is decided by the one rule in ``ops/_dispatch.py`` (anything that needs a gradient goes to the torch
path, so the custom ops have no autograd formula).

Eager calls run the chosen implementation directly (the custom op's Python dispatch costs tens of
microseconds a call, which batch-1 latency feels). Under ``torch.compile`` and dispatch modes the front ends
call the custom ops instead: opaque nodes with a fake implementation for shapes and a flop formula so that
``FlopCounterMode`` counts them. The ops take the implementation ("triton", "cuda", or "torch": the
reference, for ``opcheck`` and tests) as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry, register_flop_formula

from .._kernel_args import check_activation, conv_output_size, pair
from . import _tune
from ._cuda_ext import lowrank_linear_cuda, lowrank_mlp_cuda
from ._dispatch import Choice, cast, choose, needs_grad, rows_of, through_op


# ---------------------------------------------------------------------------------------------
# torch references
# ---------------------------------------------------------------------------------------------
def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """One of ``_kernel_args.ACTIVATIONS`` (the epilogues the kernels fuse) on ``y``."""
    check_activation(activation)
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


# cuBLASLt's GELU epilogue is the tanh approximation (and so is torch's fallback for _addmm_activation on CUDA),
# so erf GELU ("gelu", nn.GELU's default) has none: it keeps F.linear, then F.gelu. activation -> use_gelu
EPILOGUE_ACTIVATIONS = {"relu": False, "gelu_tanh": True}
EPILOGUE_DEVICES = ("cuda",)  # on the CPU, _addmm_activation's GELU is erf GELU: the CPU keeps two calls
EPILOGUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # cuBLASLt's, on CUDA


def epilogue_applies(t: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> bool:
    """Whether ``act(t b^T + bias)`` runs as one ``torch._addmm_activation`` (bias and activation in the GEMM's
    cuBLASLt epilogue): an eager inference call on CUDA (it has no autograd formula, no FLOP formula and no ONNX
    export; ``torch.compile`` fuses the activation itself), a ReLU or tanh GELU, a 1-D bias, one dtype of
    ``EPILOGUE_DTYPES`` (autocast's, where it is on), ``t`` contiguous (flattened to 2-D without a copy)."""
    if activation not in EPILOGUE_ACTIVATIONS or bias is None or t.device.type not in EPILOGUE_DEVICES:
        return False
    if not (t.dtype == b.dtype == bias.dtype and t.dtype in EPILOGUE_DTYPES and bias.dim() == 1
            and t.is_contiguous() and t.dim() >= 1):
        return False
    autocast = torch.is_autocast_enabled(t.device.type) and torch.get_autocast_dtype(t.device.type) != t.dtype
    return not (autocast or through_op() or needs_grad(t, b, bias) or torch.onnx.is_in_onnx_export())


def lowrank_linear_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    t = F.linear(x, a)
    if epilogue_applies(t, b, bias, activation):
        y = torch._addmm_activation(bias, t.reshape(-1, t.shape[-1]), b.t(),
                                    use_gelu=EPILOGUE_ACTIVATIONS[activation])
        return y.view(*t.shape[:-1], b.shape[0])
    return apply_activation(F.linear(t, b, bias), activation)


def lowrank_mlp_reference(
    x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
    a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, activation: str | None = "gelu",
) -> torch.Tensor:
    return lowrank_linear_reference(lowrank_linear_reference(x, a1, b1, bias1, activation), a2, b2, bias2)


def lowrank_conv2d_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
    stride: Sequence[int], padding: Sequence[int] | str, dilation: Sequence[int],
) -> torch.Tensor:
    return F.conv2d(F.conv2d(x, a, None, stride, padding, dilation), b, bias)


# ---------------------------------------------------------------------------------------------
# implementations by name (what the custom ops and eager calls run once the rule has chosen)
# ---------------------------------------------------------------------------------------------
# The Triton launchers are imported where they run: importing triton (and deciding TRITON_INTERPRET) is left
# to the first kernel call, so that the CPU path never needs it.
# "triton:fused" / "triton:split": the Triton launcher with that ``path=`` (the measured choice's candidates);
# "triton" leaves the path to the launcher.
def run_linear(impl: str, x, a, b, bias, activation) -> torch.Tensor:
    kind, _, path = impl.partition(":")
    if kind == "triton":
        from ..triton.lowrank_linear import lowrank_linear_triton  # optional: triton

        return lowrank_linear_triton(x, a, b, bias, activation, path=path or "auto")
    if impl == "cuda":
        return lowrank_linear_cuda(x, a, b, bias, activation)
    if impl == "torch":
        return lowrank_linear_reference(x, a, b, bias, activation).contiguous()
    raise ValueError(f"lowrank_linear: unknown implementation {impl!r}")


def run_mlp(impl: str, x, a1, b1, bias1, a2, b2, bias2, activation) -> torch.Tensor:
    kind, _, path = impl.partition(":")
    if kind == "triton":
        from ..triton.lowrank_mlp import lowrank_mlp_triton  # optional: triton

        return lowrank_mlp_triton(x, a1, b1, bias1, a2, b2, bias2, activation, path=path or "auto")
    if impl == "cuda":
        return lowrank_mlp_cuda(x, a1, b1, bias1, a2, b2, bias2, activation)
    if impl == "linears":  # two factored linears, each with its own choice (measured where it is on)
        h = lowrank_linear(x, a1, b1, bias1, activation)
        return lowrank_linear(h, a2, b2, bias2)
    if impl == "torch":
        h = lowrank_linear_reference(x, a1, b1, bias1, activation)
        return lowrank_linear_reference(h, a2, b2, bias2).contiguous()
    raise ValueError(f"lowrank_mlp: unknown implementation {impl!r}")


def run_conv2d(impl: str, x, a, b, bias, stride, padding, dilation) -> torch.Tensor:
    """Every implementation returns channels_last, the layout the Triton path produces."""
    if impl == "triton":
        from ..triton.lowrank_conv2d import lowrank_conv2d_triton  # optional: triton

        return lowrank_conv2d_triton(x, a, b, bias, stride, padding, dilation)
    if impl == "torch":
        y = lowrank_conv2d_reference(x, a, b, bias, stride, padding, dilation)
        return y.clone(memory_format=torch.channels_last)
    raise ValueError(f"lowrank_conv2d: unknown implementation {impl!r}")


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
    m = math.prod(x_shape[:-1])
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
    m = math.prod(x_shape[:-1])
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
    return 2 * n * ho * wo * r * (math.prod(a_shape[1:]) + out)


for _packet, _formula in ((torch.ops.utilrank.lowrank_linear, _lowrank_linear_flops),
                          (torch.ops.utilrank.lowrank_mlp, _lowrank_mlp_flops),
                          (torch.ops.utilrank.lowrank_conv2d, _lowrank_conv2d_flops)):
    if _packet not in flop_registry:  # a module reload must not register twice (that raises)
        register_flop_formula(_packet)(_formula)


# ---------------------------------------------------------------------------------------------
# front ends
# ---------------------------------------------------------------------------------------------
def _measured(choice: Choice, op: str, x: torch.Tensor, dims: tuple, activation: str | None, bias: int,
              run: Callable[[str], torch.Tensor], rows: int | None = None) -> Choice:
    """The measured choice (``ops/_tune.py``) among ``op``'s candidates where the rule leaves one to it
    (``choice.tunable``); ``run(name)`` computes the op with candidate ``name`` on the (cast) operands; ``rows``
    (default: ``x``'s rows) is bucketed in the key, ``dims`` exact."""
    if not choice.tunable:
        return choice
    rows = rows_of(x) if rows is None else rows
    impl = _tune.pick(op, x, rows, dims, activation, bias, choice.impl, lambda name: lambda: run(name))
    return choice if impl == choice.impl else Choice(impl, choice.cast_to, tunable=True)


def lowrank_linear(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
    activation: str | None = None, *, backend: str = "auto",
) -> torch.Tensor:
    """``act(x a^T b^T + bias)`` for ``a`` of shape ``(r, in)``, ``b`` of shape ``(out, r)``."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or x.shape[-1] != a.shape[1]:
        raise ValueError(
            f"lowrank_linear: shapes do not chain: x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}"
        )
    choice = choose("lowrank_linear", backend, x, (a, b, bias), needs_grad=needs_grad(x, a, b, bias),
                    rows=rows_of(x), shape=(a.shape[1], b.shape[0], a.shape[0]))
    x, a, b, bias = (cast(t, choice.cast_to) for t in (x, a, b, bias))
    choice = _measured(choice, "lowrank_linear", x, (a.shape[1], b.shape[0], a.shape[0]), activation,
                       bias is not None, lambda impl: run_linear(impl, x, a, b, bias, activation))
    _tune.note("lowrank_linear", choice.impl)
    if choice.impl == "torch":
        return lowrank_linear_reference(x, a, b, bias, activation)
    if through_op():
        return torch.ops.utilrank.lowrank_linear(x, a, b, bias, activation, choice.impl)
    return run_linear(choice.impl, x, a, b, bias, activation)


def mlp_choice(x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
               a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, *, backend: str,
               activation: str | None = "gelu") -> Choice:
    """The dispatch rule's choice for ``lowrank_mlp``, measured where the rule leaves it to the measured choice
    (``LowRankMlp`` asks it, then passes it on): "torch" is timm's forward, "linears" two factored linears."""
    params = (a1, b1, bias1, a2, b2, bias2)
    choice = choose("lowrank_mlp", backend, x, params, needs_grad=needs_grad(x, *params), rows=rows_of(x),
                    shape=(a1.shape[1], b2.shape[0], a1.shape[0]))
    if not choice.tunable:
        return choice
    x, *params = (cast(t, choice.cast_to) for t in (x, *params))
    dims = (a1.shape[1], b1.shape[0], b2.shape[0], a1.shape[0], a2.shape[0])
    bias = (bias1 is not None) + 2 * (bias2 is not None)
    return _measured(choice, "lowrank_mlp", x, dims, activation, bias,
                     lambda impl: run_mlp(impl, x, *params, activation))


def lowrank_mlp(
    x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
    a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, activation: str | None = "gelu",
    *, backend: str = "auto", choice: Choice | None = None,
) -> torch.Tensor:
    """timm's ``Mlp`` with both layers factored: ``act(x a1^T b1^T + bias1) a2^T b2^T + bias2``.

    ``a1``: ``(r1, in)``, ``b1``: ``(hidden, r1)``, ``a2``: ``(r2, hidden)``, ``b2``: ``(out, r2)``. The
    Triton kernel keeps the hidden activations on chip. ``choice``: what :func:`mlp_choice` returned for these
    operands, where the caller already asked (``backend`` is then not looked at)."""
    chained = (a1.dim() == b1.dim() == a2.dim() == b2.dim() == 2 and x.shape[-1] == a1.shape[1]
               and b1.shape[1] == a1.shape[0] and a2.shape[1] == b1.shape[0] and b2.shape[1] == a2.shape[0])
    if not chained:
        raise ValueError(
            f"lowrank_mlp: shapes do not chain: x {tuple(x.shape)}, a1 {tuple(a1.shape)}, "
            f"b1 {tuple(b1.shape)}, a2 {tuple(a2.shape)}, b2 {tuple(b2.shape)}"
        )
    params = (a1, b1, bias1, a2, b2, bias2)
    if choice is None:
        choice = mlp_choice(x, *params, backend=backend, activation=activation)
    _tune.note("lowrank_mlp", choice.impl)
    if choice.impl == "torch":
        return lowrank_mlp_reference(x, *params, activation)
    x, *params = (cast(t, choice.cast_to) for t in (x, *params))
    if choice.impl == "linears" or not through_op():  # two linears: each its own op under torch.compile
        return run_mlp(choice.impl, x, *params, activation)
    return torch.ops.utilrank.lowrank_mlp(x, *params, activation, choice.impl)


def lowrank_conv2d(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
    stride: Sequence[int] = (1, 1), padding: Sequence[int] | str = (0, 0), dilation: Sequence[int] = (1, 1),
    *, backend: str = "auto",
) -> torch.Tensor:
    """An ``r``-filter conv ``a`` (``(r, C, kh, kw)``) followed by the 1x1 conv ``b`` (``(out, r, 1, 1)``)."""
    choice = choose("lowrank_conv2d", backend, x, (a, b, bias), needs_grad=needs_grad(x, a, b, bias))
    x, a, b, bias = (cast(t, choice.cast_to) for t in (x, a, b, bias))
    if choice.tunable:  # the key: the image, both convs and their arguments exactly; the batch bucketed
        c, h, w = x.shape[1:]
        pads = (padding,) if isinstance(padding, str) else tuple(pair(padding))
        dims = (c, h, w, b.shape[0], a.shape[0], *a.shape[2:], *pair(stride), *pads, *pair(dilation))
        choice = _measured(choice, "lowrank_conv2d", x, dims, None, bias is not None,
                           lambda impl: run_conv2d(impl, x, a, b, bias, stride, padding, dilation), rows=x.shape[0])
    _tune.note("lowrank_conv2d", choice.impl)
    if choice.impl == "torch":
        return lowrank_conv2d_reference(x, a, b, bias, stride, padding, dilation)
    if not through_op():
        return run_conv2d(choice.impl, x, a, b, bias, stride, padding, dilation)
    padding_str, pads = (padding, [0, 0]) if isinstance(padding, str) else ("", list(pair(padding)))
    return torch.ops.utilrank.lowrank_conv2d(x, a, b, bias, list(pair(stride)), pads, padding_str,
                                             list(pair(dilation)), choice.impl)


__all__ = [
    "apply_activation",
    "lowrank_conv2d",
    "lowrank_conv2d_reference",
    "lowrank_linear",
    "lowrank_linear_reference",
    "lowrank_mlp",
    "lowrank_mlp_reference",
    "mlp_choice",
]
