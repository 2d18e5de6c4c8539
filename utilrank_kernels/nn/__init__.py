"""Thin modules over the ops."""

from .lowrank import LowRankConv2d, LowRankLinear

__all__ = ["LowRankConv2d", "LowRankLinear"]
