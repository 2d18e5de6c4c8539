"""Ops of utilrank_kernels, one file per op family. Each takes ``backend="auto"|"torch"|"triton"|"cuda"``."""

from .covariance import conv_covariance_update, covariance_update, mirror_upper_
from .lowrank import lowrank_conv2d, lowrank_linear, lowrank_mlp  # also registers the utilrank::lowrank_* ops

__all__ = ["conv_covariance_update", "covariance_update", "lowrank_conv2d", "lowrank_linear", "lowrank_mlp",
           "mirror_upper_"]
