"""Plans, rank search, budgets, factors and their inverse, the one-call pipeline, save/load."""

from .budget import budget_plan, uniform_plan
from .factor import expand, factor_model
from .io import build_architecture, load_compressed, save_compressed, write_compressed
from .pipeline import CompressConfig, CompressedModel, compress_model
from .plan import LayerPlan, Plan, apply_plan, check_fits
from .search import plan_ranks
from .sequential import collect_stats_sequential

__all__ = [
    "CompressConfig", "CompressedModel", "LayerPlan", "Plan", "apply_plan", "budget_plan", "build_architecture",
    "check_fits", "collect_stats_sequential", "compress_model", "expand", "factor_model", "load_compressed",
    "plan_ranks", "save_compressed", "uniform_plan", "write_compressed",
]
