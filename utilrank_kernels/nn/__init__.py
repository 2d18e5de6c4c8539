"""Thin modules over the ops, and pre-tuning a model's measured backend choices."""

from .backend import FACTORED_MODULES, set_backend
from .lowrank import LowRankConv2d, LowRankLinear
from .mlp import LowRankMlp, fuse_lowrank_mlps
from .tune import layer_backends, tune

__all__ = ["FACTORED_MODULES", "LowRankConv2d", "LowRankLinear", "LowRankMlp", "fuse_lowrank_mlps",
           "layer_backends", "set_backend", "tune"]
