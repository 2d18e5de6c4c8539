"""Factored layers' forward: ``y = act(b (a x) + bias)`` for linear and conv layers, and timm's ``Mlp`` with
both layers factored (``lowrank_mlp``).

The torch path (two ``F.linear`` / ``F.conv2d`` calls) is the reference, the CPU path and the
training path: it is plain autograd-, ``torch.compile``- and ``FlopCounterMode``-friendly torch.
Kernel backends (Triton, the CUDA extension) are inference paths behind the same functions; which one runs
is decided by the one rule in ``ops/_dispatch.py``. Eager calls reach the kernel launchers directly; under
``torch.compile`` they go through the ``torch.library`` custom ops of ``ops/_lowrank_dispatch.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import cast, choose, needs_grad, rows_of

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def lowrank_linear_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    return apply_activation(F.linear(F.linear(x, a), b, bias), activation)


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
    if choice.impl == "torch":
        return lowrank_linear_reference(x, a, b, bias, activation)
    from . import _lowrank_dispatch

    x, a, b, bias = (cast(t, choice.cast_to) for t in (x, a, b, bias))
    return _lowrank_dispatch.lowrank_linear(choice.impl, x, a, b, bias, activation)


def lowrank_mlp(
    x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
    a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, activation: str | None = "gelu",
    *, backend: str = "auto",
) -> torch.Tensor:
    """timm's ``Mlp`` with both layers factored: ``act(x a1^T b1^T + bias1) a2^T b2^T + bias2``.

    ``a1``: ``(r1, in)``, ``b1``: ``(hidden, r1)``, ``a2``: ``(r2, hidden)``, ``b2``: ``(out, r2)``. The
    Triton kernel keeps the hidden activations on chip."""
    chained = (a1.dim() == b1.dim() == a2.dim() == b2.dim() == 2 and x.shape[-1] == a1.shape[1]
               and b1.shape[1] == a1.shape[0] and a2.shape[1] == b1.shape[0] and b2.shape[1] == a2.shape[0])
    if not chained:
        raise ValueError(
            f"lowrank_mlp: shapes do not chain: x {tuple(x.shape)}, a1 {tuple(a1.shape)}, "
            f"b1 {tuple(b1.shape)}, a2 {tuple(a2.shape)}, b2 {tuple(b2.shape)}"
        )
    params = (a1, b1, bias1, a2, b2, bias2)
    choice = mlp_choice(x, *params, backend=backend)
    if choice.impl == "torch":
        return lowrank_mlp_reference(x, *params, activation)
    from . import _lowrank_dispatch

    x, *params = (cast(t, choice.cast_to) for t in (x, *params))
    return _lowrank_dispatch.lowrank_mlp(choice.impl, x, *params, activation)


def mlp_choice(x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
               a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, *, backend: str):
    """The dispatch rule's choice for ``lowrank_mlp`` (also what ``LowRankMlp`` asks before it fuses)."""
    params = (a1, b1, bias1, a2, b2, bias2)
    return choose("lowrank_mlp", backend, x, params, needs_grad=needs_grad(x, *params), rows=rows_of(x),
                  shape=(a1.shape[1], b2.shape[0], a1.shape[0]))


def lowrank_conv2d(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
    stride: Sequence[int] = (1, 1), padding: Sequence[int] | str = (0, 0), dilation: Sequence[int] = (1, 1),
    *, backend: str = "auto",
) -> torch.Tensor:
    """An ``r``-filter conv ``a`` (``(r, C, kh, kw)``) followed by the 1x1 conv ``b`` (``(out, r, 1, 1)``)."""
    choice = choose("lowrank_conv2d", backend, x, (a, b, bias), needs_grad=needs_grad(x, a, b, bias))
    if choice.impl == "torch":
        return lowrank_conv2d_reference(x, a, b, bias, stride, padding, dilation)
    from . import _lowrank_dispatch

    x, a, b, bias = (cast(t, choice.cast_to) for t in (x, a, b, bias))
    return _lowrank_dispatch.lowrank_conv2d(choice.impl, x, a, b, bias, stride, padding, dilation)
