"""Statistics collection, subspaces and the utilization report."""

from .report import analyze, format_table, write_report
from .stats import LayerStats, ModifiedInputError, NonFiniteInputError, Statistics, analyzable_layers, collect_stats
from .subspace import LayerSubspaces, energy_rank, layer_subspaces, symmetric_eigh

__all__ = [
    "LayerStats", "LayerSubspaces", "ModifiedInputError", "NonFiniteInputError", "Statistics", "analyzable_layers",
    "analyze", "collect_stats", "energy_rank", "format_table", "layer_subspaces",
    "symmetric_eigh", "write_report",
]
