"""Ops of utilrank_kernels. Each takes ``backend="auto"|"torch"|"triton"|"cuda"``."""

from . import _lowrank_dispatch  # noqa: F401  (registers the utilrank::lowrank_* custom ops)
from .covariance import conv_covariance_update, covariance_update
from .lowrank import lowrank_conv2d, lowrank_linear, lowrank_mlp

__all__ = ["conv_covariance_update", "covariance_update", "lowrank_conv2d", "lowrank_linear", "lowrank_mlp"]
