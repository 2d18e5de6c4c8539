"""Statistics collection, subspaces and the utilization report."""

from .collect import ModifiedInputError, NonFiniteInputError, collect_stats
from .report import LayerReport, Report, build_report, format_table
from .statistics_pass import ResumeError, statistics_bytes, statistics_pass
from .stats import LayerStats, Statistics
from .subspace import (
    LayerSubspaces,
    Subspaces,
    compute_subspaces,
    energy_rank,
    layer_subspaces,
    restricted_weight,
    symmetric_eigh,
)

__all__ = [
    "LayerReport", "LayerStats", "LayerSubspaces", "ModifiedInputError", "NonFiniteInputError", "Report",
    "ResumeError", "Statistics", "Subspaces", "build_report", "collect_stats", "compute_subspaces", "energy_rank",
    "format_table", "layer_subspaces", "restricted_weight", "statistics_bytes", "statistics_pass", "symmetric_eigh",
]
