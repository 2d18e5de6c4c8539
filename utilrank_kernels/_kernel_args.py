"""The arguments the kernels, their ops and the modules agree on: conv geometry and the fused activations.

A leaf (it imports nothing from the package), so the Triton kernels (``triton/``) import it as freely as the
ops (``ops/``), the modules (``nn/``) and the statistics hooks do."""

from __future__ import annotations

from collections.abc import Sequence

# The epilogues every backend fuses. The index is the Triton kernels' ``ACT`` code (``_activation`` in
# triton/lowrank_linear.py); the CUDA extension takes the names (csrc/ops.cpp).
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


def check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(3, 5)`` -> ``(3, 5)``: a conv's kernel size, stride, padding or dilation."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_output_size(size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Spatial output size of a convolution (PyTorch's formula, numeric padding)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel_size, stride, padding, dilation, strict=True))
