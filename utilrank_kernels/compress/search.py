"""Choosing each layer's rank: a fixed energy, or the paper's per-layer search under an accuracy
tolerance (DESIGN §1 step 7), reusing the eigendecompositions computed once by ``compute_subspaces``.

Cuts that each cost little alone can cost much together (the built-in ViT: 18 cuts of at most 0.2 pp
each lost 35 pp of test accuracy together, and fine-tuning left it 2.6 pp short of the dense model), so
after the per-layer search all cuts are applied at once, and while they cost more than
``total_tolerance`` every layer backs off one candidate toward more energy.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..analysis.report import LayerReport, Report
from ..analysis.subspace import LayerSubspaces, Subspaces
from ..layers import FilterFn, factored_pays
from .factor import layer_factors
from .plan import LayerPlan, Plan

logger = logging.getLogger(__name__)

# candidate cuts, shallowest last; the search takes the deepest one within the tolerance
ENERGY_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)


def _entry(row: LayerReport, k_in: int, k_out: int, energy: float, reason: str) -> LayerPlan:
    return LayerPlan(row.kind, min(k_in, k_out), k_in, k_out, energy, reason)


class _FactoredWeight:
    """Context manager: one layer's weight replaced by its factored form ``B A``, restored on exit."""

    def __init__(self, module: nn.Module, sub: LayerSubspaces, entry: LayerPlan, method: str):
        self.module, self.sub, self.entry, self.method = module, sub, entry, method

    def __enter__(self):
        self.saved = self.module.weight.detach().clone()
        a, b = layer_factors(self.module, self.sub, self.entry, self.method)
        with torch.no_grad():
            self.module.weight.copy_((b @ a).reshape(self.saved.shape).to(self.saved.dtype))

    def __exit__(self, *exc):
        with torch.no_grad():
            self.module.weight.copy_(self.saved)


def plan_ranks(
    model: nn.Module,
    report: Report,
    subspaces: Subspaces,
    *,
    arch: str = "",
    method: str = "optimal",
    energy: float = 0.99,
    tolerance: float | None = None,
    total_tolerance: float | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    baseline: float | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> Plan:
    """The plan: every analyzed layer at its energy cut, or searched.

    ``tolerance`` (percentage points) turns on the search: per layer, the deepest cut of
    ``ENERGY_GRID`` whose factors (by ``method``) for that layer alone keep ``evaluate(model)`` (a score in
    [0, 1] on a validation split: accuracy, or the label-free top-1 agreement or output cosine with the dense
    model, ``metrics``) within ``tolerance`` of the dense model's (``baseline``,
    evaluated here when not given). Then all cuts together must stay within ``total_tolerance``
    (default: the per-layer tolerances summed), else every layer backs off one candidate at a time."""
    modules = dict(model.named_modules())
    layers: dict[str, LayerPlan] = {}
    dense = dict(report.skipped)
    searched: dict[str, _Search] = {}
    if tolerance is not None:
        if evaluate is None:
            raise ValueError("a rank search needs an evaluate(model) callback")
        if baseline is None:
            baseline = evaluate(model)
    for row in tqdm(report.layers, desc="rank search" if tolerance is not None else "plan", disable=not progress,
                    unit="layer"):
        name = row.name
        if filter_fn is not None and not filter_fn(modules[name], name):
            dense[name] = "excluded by filter"
            continue
        if tolerance is None:
            layers[name] = _entry(row, row.k_in, row.k_out, energy, f"energy {energy}")
            continue
        search = _Search(model, modules[name], row, subspaces[name], baseline, evaluate, method)
        if search.deepest_within(tolerance) is None:
            dense[name] = f"no cut that saves parameters stays within {tolerance} pp"
            continue
        searched[name] = search
    if searched:
        budget = tolerance * len(searched) if total_tolerance is None else total_tolerance
        total_drop = _back_off(model, searched, baseline, budget, evaluate, progress)
        layers.update({name: search.entry(total_drop) for name, search in searched.items()})
    rows = {r.name: r for r in report.layers}
    for name in [n for n, e in layers.items() if not factored_pays(e.rank, rows[n].in_features, rows[n].out_features)]:
        dense[name] = (f"rank {layers.pop(name).rank} saves nothing: r (in + out) >= in * out "
                       f"({rows[name].in_features} x {rows[name].out_features})")
    meta = {"energy": energy, "tolerance": tolerance}
    if tolerance is not None:
        meta["total_tolerance"] = total_tolerance
    return Plan(arch, {n: layers[n] for n in rows if n in layers}, dense, method, meta)


class _Search:
    """One layer's candidate cuts (the distinct ranks of ``ENERGY_GRID``, deepest first) and the one
    chosen."""

    def __init__(self, model, module, row: LayerReport, sub: LayerSubspaces, baseline: float, evaluate, method: str):
        self.model, self.module, self.row, self.sub, self.method = model, module, row, sub, method
        self.baseline, self.evaluate = baseline, evaluate
        candidates = sorted({sub.ranks(e): e for e in reversed(ENERGY_GRID)}.items(), key=lambda c: min(c[0]))
        self.candidates = [(k, e) for k, e in candidates if factored_pays(min(k), row.in_features, row.out_features)]
        self.accuracies: dict[int, float] = {}
        self.index: int | None = None
        self.backed_off = 0

    def projection(self, i: int | None = None) -> _FactoredWeight:
        (k_in, k_out), e = self.candidates[self.index if i is None else i]
        return _FactoredWeight(self.module, self.sub, _entry(self.row, k_in, k_out, e, ""), self.method)

    def alone(self, i: int) -> float:
        if i not in self.accuracies:
            with self.projection(i):
                self.accuracies[i] = self.evaluate(self.model)
        return self.accuracies[i]

    def deepest_within(self, tolerance: float) -> int | None:
        """Binary search, deepest first: accuracy grows (nearly) monotonically with the kept energy, so
        about log2(14) evaluations per layer."""
        threshold = self.baseline - tolerance / 100.0
        lo, hi = 0, len(self.candidates)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.alone(mid) >= threshold:
                hi = mid
            else:
                lo = mid + 1
        self.index = lo if lo < len(self.candidates) else None
        return self.index

    def entry(self, total_drop: float) -> LayerPlan:
        (k_in, k_out), e = self.candidates[self.index]
        reason = f"search: energy {e}"
        if self.index in self.accuracies:
            reason += f", {100.0 * (self.baseline - self.accuracies[self.index]):+.2f} pp on validation alone"
        if self.backed_off:
            reason += f"; backed off {self.backed_off} step(s): all cuts together {total_drop:+.2f} pp"
        return _entry(self.row, k_in, k_out, e, reason)


def _back_off(model, searched: dict[str, _Search], baseline: float, budget: float, evaluate,
              progress: bool = True) -> float:
    """Apply every layer's cut at once; while together they cost more than ``budget`` pp, move every
    layer that can one candidate toward more energy. Returns what the final cuts cost together (pp)."""
    steps = max(len(s.candidates) - s.index for s in searched.values())  # at most this many evaluations
    bar = tqdm(total=steps, desc="all cuts together", unit="eval", disable=not progress, leave=False)
    while True:
        with contextlib.ExitStack() as stack:
            for search in searched.values():
                stack.enter_context(search.projection())
            drop = 100.0 * (baseline - evaluate(model))
        bar.update()
        bar.set_postfix_str(f"{drop:+.2f} pp (budget {budget:.2f})", refresh=False)
        movable = [s for s in searched.values() if s.index + 1 < len(s.candidates)]
        if drop <= budget or not movable:
            bar.close()
            if drop > budget:  # a layer's shallowest candidate is the last cut that still saves parameters
                logger.warning(f"rank search: all {len(searched)} cuts together {drop:+.2f} pp on validation, over "
                               f"the {budget:.2f} pp budget (--total-tolerance) even at each layer's shallowest cut "
                               "that saves parameters; exclude layers (--exclude) to stay within it")
            else:
                logger.info(f"rank search: all {len(searched)} cuts together {drop:+.2f} pp on validation "
                            f"(budget {budget:.2f} pp)")
            return drop
        for search in movable:
            search.index += 1
            search.backed_off += 1
