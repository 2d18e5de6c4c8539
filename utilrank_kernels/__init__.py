"""utilrank_kernels: measure the utilized rank of every layer on its data, factor to it, run it fast.

One call (``compress_model(model, data, CompressConfig(...))``), or the stages one by one: ``collect_stats``
-> ``compute_subspaces`` -> ``build_report`` -> ``plan_ranks`` -> ``factor_model`` (see docs/design.md)."""

import logging

from ._version import __version__ as __version__  # from the package metadata
from .analysis import Report, Statistics, Subspaces, build_report, collect_stats, compute_subspaces
from .compress import (
    CompressConfig,
    CompressedModel,
    Plan,
    compress_model,
    factor_model,
    load_compressed,
    plan_ranks,
    save_compressed,
)
from .layers import name_filter
from .nn import LowRankConv2d, LowRankLinear, LowRankMlp, set_backend
from .train import TrainRecipe

__all__ = [
    "CompressConfig", "CompressedModel", "LowRankConv2d", "LowRankLinear", "LowRankMlp", "Plan", "Report",
    "Statistics", "Subspaces", "TrainRecipe", "build_report", "collect_stats", "compress_model", "compute_subspaces",
    "factor_model", "load_compressed", "name_filter", "plan_ranks", "save_compressed", "set_backend",
]
# the library logs; the command line prints (utilrank_kernels.cli sets up a handler)
logging.getLogger(__name__).addHandler(logging.NullHandler())
