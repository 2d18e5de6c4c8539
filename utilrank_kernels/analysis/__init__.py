"""Statistics collection, subspaces and the utilization report."""

from .report import LayerReport, Report, analyze, build_report, format_table, write_report
from .stats import LayerStats, ModifiedInputError, NonFiniteInputError, Statistics, collect_stats
from .subspace import LayerSubspaces, Subspaces, compute_subspaces, energy_rank, layer_subspaces, symmetric_eigh

__all__ = [
    "LayerReport", "LayerStats", "LayerSubspaces", "ModifiedInputError", "NonFiniteInputError", "Report", "Statistics",
    "Subspaces", "analyze", "build_report", "collect_stats", "compute_subspaces", "energy_rank", "format_table",
    "layer_subspaces", "symmetric_eigh", "write_report",
]
