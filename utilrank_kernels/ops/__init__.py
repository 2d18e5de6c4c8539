"""Ops of utilrank_kernels. Each takes ``backend="auto"|"torch"|"triton"|"cuda"``."""

from .covariance import conv_covariance_update, covariance_update

__all__ = ["conv_covariance_update", "covariance_update"]
