"""Plans, rank search, budgets, factors, the one-call pipeline, save/load."""

from .budget import budget_plan, plan_fraction, uniform_plan, uniform_rank
from .factor import decompose, factor_layer, factor_model, layer_factors, svd_factors
from .io import load_compressed, save_compressed, write_compressed
from .pipeline import CompressConfig, CompressedModel, compress_model
from .plan import METHODS, PLAN_FORMAT, LayerPlan, Plan, apply_plan, check_fits, load_plan
from .search import ENERGY_GRID, plan_ranks

__all__ = [
    "ENERGY_GRID", "METHODS", "PLAN_FORMAT", "CompressConfig", "CompressedModel", "LayerPlan", "Plan", "apply_plan",
    "budget_plan", "check_fits", "compress_model", "decompose", "factor_layer", "factor_model", "layer_factors",
    "load_compressed", "load_plan", "plan_fraction", "plan_ranks", "save_compressed", "svd_factors", "uniform_plan",
    "uniform_rank", "write_compressed",
]
