"""Choosing each layer's rank: a fixed energy, or the paper's per-layer search under an accuracy
tolerance (DESIGN §1 step 7), reusing the eigendecompositions computed once by ``analyze``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..analysis.report import factored_pays
from ..analysis.subspace import LayerSubspaces
from .plan import FilterFn

# candidate cuts, shallowest last; the search takes the deepest one within the tolerance
ENERGY_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)


def _entry(row: dict, k_in: int, k_out: int, energy: float, reason: str) -> dict:
    return {"kind": row["kind"], "rank": min(k_in, k_out), "k_in": k_in, "k_out": k_out, "energy": energy,
            "reason": reason}


class _ProjectedWeight:
    """Context manager: one layer's weight replaced by its projection, restored on exit."""

    def __init__(self, module: nn.Module, projected: torch.Tensor):
        self.module, self.projected = module, projected

    def __enter__(self):
        self.saved = self.module.weight.detach().clone()
        with torch.no_grad():
            self.module.weight.copy_(self.projected.reshape(self.saved.shape).to(self.saved.dtype))

    def __exit__(self, *exc):
        with torch.no_grad():
            self.module.weight.copy_(self.saved)


def plan_ranks(
    model: nn.Module,
    report: dict,
    subspaces: dict[str, LayerSubspaces],
    *,
    energy: float = 0.99,
    tolerance: float | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Per-layer plan entries and the reasons of the layers kept dense.

    ``tolerance`` (percentage points) turns on the search: per layer, the deepest cut of
    ``ENERGY_GRID`` whose projection of that layer alone keeps ``evaluate(model)`` (an accuracy in
    [0, 1] on a validation split) within ``tolerance`` of the dense model's."""
    modules = dict(model.named_modules())
    layers: dict[str, dict] = {}
    dense = {s["name"]: s["reason"] for s in report["skipped"]}
    baseline = None
    if tolerance is not None:
        if evaluate is None:
            raise ValueError("a rank search needs an evaluate(model) callback")
        baseline = evaluate(model)
    for row in tqdm(report["layers"], desc="rank search" if tolerance is not None else "plan", disable=not progress,
                    unit="layer"):
        name = row["name"]
        if filter_fn is not None and not filter_fn(modules[name], name):
            dense[name] = "excluded by filter"
            continue
        sub = subspaces[name]
        if tolerance is None:
            entry = _entry(row, row["k_in"], row["k_out"], energy, f"energy {energy}")
        else:
            entry = _search_layer(model, modules[name], row, sub, baseline, tolerance, evaluate)
            if entry is None:
                dense[name] = f"no cut that saves parameters stays within {tolerance} pp"
                continue
        if not factored_pays(entry["rank"], row["in_features"], row["out_features"]):
            dense[name] = (f"rank {entry['rank']} saves nothing: r (in + out) >= in * out "
                           f"({row['in_features']} x {row['out_features']})")
            continue
        layers[name] = entry
    return layers, dense


def _search_layer(model, module, row, sub, baseline, tolerance, evaluate) -> dict | None:
    """Binary search over the candidate cuts, deepest first: accuracy grows (nearly) monotonically
    with the kept energy, so about log2(14) evaluations per layer."""
    candidates = sorted({sub.ranks(e): e for e in reversed(ENERGY_GRID)}.items(), key=lambda c: min(c[0]))
    candidates = [(k, e) for k, e in candidates if factored_pays(min(k), row["in_features"], row["out_features"])]
    accuracies: dict[int, float] = {}

    def accuracy(i: int) -> float:
        if i not in accuracies:
            with _ProjectedWeight(module, sub.projected_weight(*candidates[i][0])):
                accuracies[i] = evaluate(model)
        return accuracies[i]

    threshold = baseline - tolerance / 100.0
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if accuracy(mid) >= threshold:
            hi = mid
        else:
            lo = mid + 1
    if lo == len(candidates):
        return None
    (k_in, k_out), e = candidates[lo]
    drop = 100.0 * (baseline - accuracy(lo))
    return _entry(row, k_in, k_out, e, f"search: energy {e}, {drop:+.2f} pp on validation alone")
