"""Drop-in factored layers: ``LowRankLinear`` replaces ``nn.Linear``, ``LowRankConv2d`` ``nn.Conv2d``.

Each stores its hyperparameters and two factors, calls its op, and exposes a read-only ``weight``
(``B @ A``) so that code that inspects weights keeps working. ``layer_shape`` sees a dense layer and its
factored form as the same matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._kernel_args import pair
from ..layers import LayerShape
from ..ops.lowrank import lowrank_conv2d, lowrank_linear


def _init_factors(layer: nn.Module, device) -> None:
    """nn.Linear's default init for both factors, a zero bias; nothing on the meta device (a checkpoint is
    about to be loaded in their place)."""
    if device == torch.device("meta") or device == "meta":
        return
    nn.init.kaiming_uniform_(layer.weight_a, a=5**0.5)
    nn.init.kaiming_uniform_(layer.weight_b, a=5**0.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class LowRankLinear(nn.Module):
    """``y = B (A x) + bias`` with ``A``: ``(rank, in_features)``, ``B``: ``(out_features, rank)``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.backend = in_features, out_features, rank, backend
        kw = {"device": device, "dtype": dtype}
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        _init_factors(self, device)

    @classmethod
    def from_dense(cls, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> LowRankLinear:
        """The factored form of ``linear`` with ``b @ a`` in place of its weight; bias copied."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, a.shape[0], linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight_a.copy_(a)
            layer.weight_b.copy_(b)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return (self.weight_b @ self.weight_a).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.weight_a, self.weight_b, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class LowRankConv2d(nn.Module):
    """An ``rank``-filter ``kh x kw`` conv (stride, padding, dilation of the original) then a 1x1 conv
    with the bias."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros", backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode, self.groups, self.backend = padding_mode, 1, backend
        kw = {"device": device, "dtype": dtype}
        self.weight_a = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size, **kw))
        self.weight_b = nn.Parameter(torch.empty(out_channels, rank, 1, 1, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        _init_factors(self, device)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> LowRankConv2d:
        """``a``: ``(rank, C*kh*kw)`` (or 4-D), ``b``: ``(out, rank)`` (or 4-D), from the flattened weight."""
        if conv.groups != 1:
            raise ValueError("LowRankConv2d: grouped convs are not factored")
        w = conv.weight
        rank = a.shape[0]
        layer = cls(conv.in_channels, conv.out_channels, rank, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, conv.padding_mode, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight_a.copy_(a.reshape(layer.weight_a.shape))
            layer.weight_b.copy_(b.reshape(layer.weight_b.shape))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @property
    def in_features(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def out_features(self) -> int:
        return self.out_channels

    @property
    def weight(self) -> torch.Tensor:
        a = self.weight_a.reshape(self.rank, -1)
        return (self.weight_b.reshape(self.out_channels, self.rank) @ a).reshape(
            self.out_channels, self.in_channels, *self.kernel_size).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, nn.modules.utils._reverse_repeat_tuple(self.padding, 2), mode=self.padding_mode)
            padding = (0, 0)
        return lowrank_conv2d(x, self.weight_a, self.weight_b, self.bias, self.stride, padding, self.dilation,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")


def layer_shape(module: nn.Module) -> LayerShape:
    """The matrix shape of a dense ``nn.Linear`` / ``nn.Conv2d`` or of its factored form."""
    if isinstance(module, (nn.Linear, LowRankLinear)):
        return LayerShape("linear", module.in_features, module.out_features, None, module.bias is not None)
    if isinstance(module, (nn.Conv2d, LowRankConv2d)):
        kh, kw = module.kernel_size
        return LayerShape("conv2d", module.in_channels * kh * kw, module.out_channels, (kh, kw),
                          module.bias is not None)
    raise TypeError(f"{type(module).__name__} is not a linear or conv2d layer")
