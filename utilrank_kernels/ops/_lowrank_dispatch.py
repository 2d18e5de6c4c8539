"""Kernel backends of the low-rank ops. Only the torch path exists so far: kernel backends raise."""

from __future__ import annotations

import torch


def select(op: str, x: torch.Tensor, backend: str, needs_grad: bool) -> str:
    if backend == "auto":
        return "torch"
    raise RuntimeError(f"{op}: backend={backend!r} is not available for this op yet")


def lowrank_linear(impl, x, a, b, bias, activation):  # pragma: no cover - replaced by kernel backends
    raise RuntimeError(f"lowrank_linear: backend {impl!r} is not available")


def lowrank_conv2d(impl, x, a, b, bias, stride, padding, dilation):  # pragma: no cover
    raise RuntimeError(f"lowrank_conv2d: backend {impl!r} is not available")
