"""Thin modules over the ops."""

from .lowrank import LowRankConv2d, LowRankLinear
from .mlp import LowRankMlp, fuse_lowrank_mlps

__all__ = ["LowRankConv2d", "LowRankLinear", "LowRankMlp", "fuse_lowrank_mlps"]
