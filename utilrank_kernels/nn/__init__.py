"""Thin modules over the ops."""

from .backend import FACTORED_MODULES, set_backend
from .lowrank import LowRankConv2d, LowRankLinear
from .mlp import LowRankMlp, fuse_lowrank_mlps

__all__ = ["FACTORED_MODULES", "LowRankConv2d", "LowRankLinear", "LowRankMlp", "fuse_lowrank_mlps", "set_backend"]
