"""Decomposition, rank plans, rank search, module replacement, save/load."""

from .factor import data_factors, decompose, svd_factors
from .io import load_compressed, save_compressed
from .plan import apply_plan, load_plan, make_plan, name_filter, save_plan
from .search import ENERGY_GRID, plan_ranks

__all__ = [
    "ENERGY_GRID", "apply_plan", "data_factors", "decompose", "load_compressed", "load_plan", "make_plan",
    "name_filter", "plan_ranks", "save_compressed", "save_plan", "svd_factors",
]
