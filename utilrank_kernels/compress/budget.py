"""Plans sized to a budget.

- ``uniform_plan``: every layer keeps the same fraction of its own weights (no data needed: the synthetic
  cut ``utilrank bench --param-ratio`` times).
- ``budget_plan``: the whole model keeps a fraction of its dense parameters or FLOPs, rank allocated where
  it costs the least output energy (``utilrank compress --target-params / --target-flops``).
- ``budget_floor`` / ``check_reachable``: the smallest fraction any ranks can reach, from the architecture
  alone (every factorable layer at rank 1; embeddings, norms, biases and layers left out stay as they are),
  so that an unreachable target is refused before any data is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._kernel_args import conv_output_size
from ..analysis.subspace import Subspaces
from ..layers import FilterFn, LayerShape, factored_pays, find_layers
from ..measure import count_flops, count_params
from ..nn.lowrank import layer_shape
from .factor import factor_model
from .latency import layer_input_shapes
from .plan import LayerPlan, Plan


def uniform_rank(fraction: float, in_features: int, out_features: int, multiple: int = 1) -> int:
    """The rank keeping at most ``fraction`` of an ``in x out`` layer's weights, ``fraction * in * out /
    (in + out)``, rounded down to a multiple of ``multiple`` where that takes less than 10% off (ViT-B/16 at
    0.5: fc1/fc2 307 -> 304, which ran 1.3x faster than 307 on a 2-core EPYC)."""
    exact = int(fraction * in_features * out_features / (in_features + out_features))
    rounded = exact // multiple * multiple if multiple > 1 else exact
    return rounded if rounded >= 0.9 * exact else exact  # small layers keep their exact rank


def uniform_plan(model: nn.Module, fraction: float, *, multiple: int = 16, arch: str = "", method: str = "svd",
                 filter_fn: FilterFn | None = None) -> Plan:
    """Every ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) passing ``filter_fn`` factored so that it keeps at
    most ``fraction`` of its weights (``uniform_rank``); layers too small to save anything stay dense."""
    if not 0 < fraction < 1:
        raise ValueError(f"parameter fraction {fraction}: must be in (0, 1)")
    found, dense = find_layers(model, filter_fn)
    layers = {}
    for name, module in found.items():
        shape = layer_shape(module)
        rank = uniform_rank(fraction, shape.in_features, shape.out_features, multiple)
        if rank < 1:
            dense[name] = f"rank at fraction {fraction} is below 1: too small to factor"
            continue
        layers[name] = LayerPlan(shape.kind, rank, reason=f"uniform fraction {fraction} (rank multiple {multiple})")
    meta = {"param_ratio": fraction, "rank_multiple": multiple}
    return Plan(arch or type(model).__name__, layers, dense, method, meta)


# ---------------------------------------------------------------------------------------------
# a whole-model target: parameters or FLOPs, allocated where it costs the least
# ---------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """One budgeted layer: the cost of a rank, and the output energy the optimal rank-r map loses."""

    name: str
    shape: LayerShape
    unit: int  # cost per unit of rank (r (in + out) weights, or FLOPs of one example)
    dense_cost: int
    tail: torch.Tensor  # tail[r] = fraction of C_out's trace beyond the top r eigenvalues
    weight: float = 1.0

    def loss(self, rank: int | None) -> float:
        return 0.0 if rank is None else float(self.tail[min(rank, len(self.tail) - 1)])

    def cost(self, rank: int | None) -> int:
        return self.dense_cost if rank is None else rank * self.unit

    @property
    def break_even(self) -> int:
        """The largest rank that still saves anything."""
        return max(0, (self.shape.in_features * self.shape.out_features - 1) // (self.shape.in_features
                                                                                 + self.shape.out_features))


@dataclass(frozen=True)
class BudgetFloor:
    """What no choice of ranks can cut: ``floor`` of the model's ``total`` parameters (or FLOPs per example) remain
    with every factorable layer at rank 1; ``fixed`` names each part that stays whole (a module's own parameters,
    a layer left out and why, the factorable layers' biases) with its cost, largest first."""

    measure: str
    total: int
    floor: int
    fixed: tuple[tuple[str, str, int], ...]  # (name, what it is, cost)

    @property
    def fraction(self) -> float:
        return self.floor / self.total if self.total else 1.0

    @property
    def what(self) -> str:
        return "parameters" if self.measure == "params" else "FLOPs"

    @property
    def fixed_fraction(self) -> float:
        """The share of the total in parts that stay whole."""
        return sum(cost for _, _, cost in self.fixed) / self.total if self.total else 1.0

    def describe(self, limit: int = 5) -> str:
        """The parts that stay whole: each holding at least 1% by name (``embeddings.word_embeddings (Embedding,
        39.1%)``), the others counted by kind (``12 more: LayerNorm x11, parameter (0.5%)``)."""
        named = [part for part in self.fixed if part[2] >= 0.01 * self.total][:limit]
        shown = [f"{name} ({'' if what in name else what + ', '}{cost / self.total:.1%})" for name, what, cost in named]
        rest = [part for part in self.fixed if part not in named]
        if rest:
            kinds: dict[str, int] = {}
            for _, what, _ in rest:
                kinds[what] = kinds.get(what, 0) + 1
            counted = ", ".join(what if n == 1 else f"{what} x{n}" for what, n in kinds.items())
            share = sum(c for _, _, c in rest) / self.total
            shown.append(f"{len(rest)} {'more' if named else 'parts'}: {counted} ({share:.1%})")
        return ", ".join(shown)


def _own_parameters(model: nn.Module, layers: set[str]) -> list[tuple[str, str, int]]:
    """``(module name, type, parameters)`` of every module's own parameters outside ``layers`` (embeddings,
    norms, position embeddings, class tokens), each shared tensor counted once."""
    seen: set[int] = set()
    for name in layers:
        seen.update(id(p) for p in model.get_submodule(name).parameters())
    parts = []
    for name, module in model.named_modules():
        if name in layers:
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if not name:  # the model's own tensors (a position embedding, a class token): each by its name
            parts += [(n, "parameter", p.numel()) for n, p in own]
        elif own:
            parts.append((name, type(module).__name__, sum(p.numel() for _, p in own)))
    return parts


def budget_floor(model: nn.Module, measure: str = "params", example: torch.Tensor | None = None,
                 filter_fn: FilterFn | None = None) -> BudgetFloor:
    """The least of ``model``'s parameters (``measure="params"``) or FLOPs per ``example`` (``"flops"``) that any
    plan keeps: every factorable layer passing ``filter_fn`` at rank 1 (dense where even rank 1 saves nothing),
    everything else as it is. From the architecture alone: no statistics, no data."""
    if measure not in ("params", "flops"):
        raise ValueError(f"budget measure {measure!r}: choose params or flops")
    if measure == "flops" and example is None:
        raise ValueError("a FLOPs budget needs an example input")
    found, skipped = find_layers(model, filter_fn)
    every = [*found, *skipped]
    tokens = _layer_tokens(model, every, example) if measure == "flops" else dict.fromkeys(every, 1)
    scale = {n: 2 * tokens[n] if measure == "flops" else 1 for n in every}
    fixed: list[tuple[str, str, int]] = []
    floor = biases = 0
    for name, module in found.items():
        shape = layer_shape(module)
        weights = shape.in_features * shape.out_features
        if factored_pays(1, shape.in_features, shape.out_features):
            floor += scale[name] * (shape.in_features + shape.out_features)
        else:
            fixed.append((name, "too small to factor", scale[name] * weights))
        biases += shape.out_features if shape.bias and measure == "params" else 0
    for name, reason in skipped.items():  # a grouped conv's weight is its groups' blocks: count what it holds
        module = model.get_submodule(name)
        shape = layer_shape(module)
        cost = scale[name] * module.weight.numel()
        fixed.append((name, reason, cost + (shape.out_features if shape.bias and measure == "params" else 0)))
    if measure == "params":
        total = count_params(model)
        fixed += _own_parameters(model, set(every))
        if biases:
            fixed.append(("the factorable layers' biases", "biases", biases))
    else:
        total = count_flops(model, example)
        layers = sum(scale[n] * model.get_submodule(n).weight.numel() for n in every)
        if total > layers:
            fixed.append(("the rest", "attention, norms, activations", total - layers))
    fixed.sort(key=lambda part: -part[2])
    return BudgetFloor(measure, total, floor + sum(cost for _, _, cost in fixed), tuple(fixed))


def check_reachable(model: nn.Module, target: float, measure: str = "params", example: torch.Tensor | None = None,
                    filter_fn: FilterFn | None = None) -> BudgetFloor:
    """Raise ``ValueError`` when no ranks can bring ``model`` to ``target`` of its parameters or FLOPs
    (``budget_floor``), naming what cannot be cut and the smallest reachable target; returns the floor."""
    floor = budget_floor(model, measure, example, filter_fn)
    if target < floor.fraction:
        smallest = math.ceil(floor.fraction * 1e4) / 1e4
        raise ValueError(
            f"--target-{measure} {target:g}: out of reach for this architecture: with every factorable layer at rank "
            f"1 the model still keeps {floor.fraction:.4f} of its {floor.what}; {floor.fixed_fraction:.1%} of them "
            f"are in what no rank cuts: {floor.describe()}; the smallest reachable target is {smallest:g}")
    return floor


def _budget_layer(name: str, module: nn.Module, eig_out: torch.Tensor, scale: int) -> _Layer:
    """A layer's costs (weights, or ``scale`` FLOPs per weight) and its output-energy tail from ``C_out``'s
    eigenvalues."""
    shape = layer_shape(module)
    cumulative = torch.cat([eig_out.new_zeros(1), torch.cumsum(eig_out, 0)])
    tail = (1 - cumulative / cumulative[-1]).clamp_min(0) if cumulative[-1] > 0 else torch.zeros_like(cumulative)
    return _Layer(name, shape, (shape.in_features + shape.out_features) * scale,
                  shape.in_features * shape.out_features * scale, tail.cpu())


def _layer_tokens(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, int]:
    """Positions per example each layer's matrix is applied at (tokens of a linear, output pixels of a conv)."""
    shapes = layer_input_shapes(model, names, example, 1)
    tokens = {}
    for name in names:
        module, shape = model.get_submodule(name), shapes[name]
        if isinstance(module, nn.Conv2d):
            padding = module.padding if not isinstance(module.padding, str) else (0, 0)
            if module.padding == "same":
                out_hw = shape[2:]
            else:
                out_hw = conv_output_size(shape[2:], module.kernel_size, module.stride, padding, module.dilation)
            tokens[name] = int(math.prod(out_hw))
        else:
            tokens[name] = int(math.prod(shape[1:-1])) if len(shape) > 2 else 1
    return tokens


def _allocate(layers: list[_Layer], reducible: int, multiple: int, fill: bool = True) -> dict[str, int | None]:
    """Ranks (None: dense) whose total cost is at most ``reducible`` with the least total weighted output
    energy lost, by Lagrangian relaxation: for a price ``lam`` each layer independently takes the option
    (dense, or a rank in steps of ``multiple``) minimizing ``loss + lam * cost``, and ``lam`` is bisected to
    the budget. Each such allocation is optimal among all that cost no more than it (no convexity needed, so
    the jump from dense to factored is exact); ``fill`` then gives back rank within the leftover budget where
    it buys the most energy per unit of cost."""
    options = []
    for layer in layers:
        top = layer.break_even // multiple * multiple or layer.break_even
        ranks = [None, *range(top, 0, -multiple)]
        costs = np.array([layer.cost(r) for r in ranks], dtype=np.float64)
        losses = np.array([layer.weight * layer.loss(r) for r in ranks], dtype=np.float64)
        options.append((ranks, costs, losses))

    def choose(lam: float) -> list[int]:
        return [int(np.argmin(losses + lam * costs + 1e-15 * costs)) for _, costs, losses in options]

    def total(choice: list[int]) -> float:
        return sum(costs[c] for (_, costs, _), c in zip(options, choice, strict=True))

    if total([len(r) - 1 for r, _, _ in options]) > reducible:
        raise ValueError("budget out of reach: every budgeted layer is at rank 1")
    lo, hi = 0.0, 1e-12
    while total(choose(hi)) > reducible:
        lo, hi = hi, hi * 4
    for _ in range(100):  # costs only fall as the price rises: bisect to the cheapest price that fits
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(choose(mid)) > reducible else (lo, mid)
    choice = choose(hi)
    while fill:
        slack = reducible - total(choice)
        best = None
        for i, (ranks, costs, losses) in enumerate(options):
            now = choice[i]
            for j in range(len(ranks)):
                extra, gain = costs[j] - costs[now], losses[now] - losses[j]
                if 0 < extra <= slack and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, i, j)
        if best is None:
            break
        choice[best[1]] = best[2]
    return {layer.name: ranks[c] for layer, (ranks, _, _), c in zip(layers, options, choice, strict=True)}


def budget_plan(
    model: nn.Module,
    subspaces: Subspaces,
    target: float,
    *,
    measure: str = "params",
    example: torch.Tensor | None = None,
    arch: str = "",
    method: str = "optimal",
    filter_fn: FilterFn | None = None,
    multiple: int = 1,
    keep_dense: Mapping[str, str] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = False,
) -> Plan:
    """A plan whose whole model keeps at most ``target`` of the dense model's parameters (``measure=
    "params"``) or FLOPs per example (``"flops"``, needs ``example``): ranks allocated to lose the least total
    output energy (each layer's relative loss at rank r, the optimal rank-r map's, from the subspaces: no
    evaluation; ``_allocate``), in steps of ``multiple``. Layers in ``keep_dense`` (name -> reason) stay dense.

    With ``evaluate`` (validation accuracy of a model), the allocation is refined on validation: each layer's
    sensitivity (the accuracy its cut alone costs) reweights its energy loss by ``sensitivity ** alpha`` and
    the best of ``alpha`` in {0, 0.5, 1} on validation is kept."""
    if measure not in ("params", "flops"):
        raise ValueError(f"budget measure {measure!r}: choose params or flops")
    if not 0 < target < 1:
        raise ValueError(f"--target-{measure} {target}: must be in (0, 1)")
    if measure == "flops" and example is None:
        raise ValueError("a FLOPs budget needs an example input")
    budget = _Budget.of(model, subspaces, target, measure, example, filter_fn, dict(keep_dense or {}), multiple,
                        arch or type(model).__name__, method)
    try:
        ranks = budget.allocate()
    except ValueError:
        raise ValueError(f"--target-{measure} {target}: out of reach even with every factored layer at rank 1") \
            from None
    plan = budget.plan(ranks)
    if evaluate is None:
        return plan
    return _refine_on_validation(model, subspaces, budget, ranks, plan, evaluate, progress)


@dataclass
class _Budget:
    """One whole-model budget: the budgeted layers, the cost they may take together, and the plan of an
    allocation of ranks to them."""

    layers: list[_Layer]
    reducible: int
    multiple: int
    target: float
    measure: str
    order: list[str]  # every candidate layer, in model order
    dense: dict[str, str]  # the layers outside the budget, and why
    arch: str
    method: str

    @classmethod
    def of(cls, model: nn.Module, subspaces: Subspaces, target: float, measure: str, example: torch.Tensor | None,
           filter_fn: FilterFn | None, keep_dense: dict[str, str], multiple: int, arch: str, method: str) -> _Budget:
        found, dense = find_layers(model, filter_fn)
        dense.update(keep_dense)
        names = [n for n in found if n in subspaces and n not in keep_dense]
        dense.update({n: "no statistics (no subspaces)" for n in found if n not in subspaces and n not in keep_dense})
        total = count_params(model) if measure == "params" else count_flops(model, example)
        tokens = _layer_tokens(model, names, example) if measure == "flops" else dict.fromkeys(names, 1)
        layers = [_budget_layer(name, found[name], subspaces[name].eig_out,
                                2 * tokens[name] if measure == "flops" else 1) for name in names]
        fixed = total - sum(layer.dense_cost for layer in layers)
        budget = cls(layers, int(target * total) - fixed, multiple, target, measure, list(found), dense, arch, method)
        if budget.reducible < sum(layer.unit for layer in layers):
            raise ValueError(f"--target-{measure} {target}: the layers this plan may not factor hold "
                             f"{fixed / total:.1%} of the {budget.what} already")
        return budget

    @property
    def what(self) -> str:
        return "parameters" if self.measure == "params" else "FLOPs"

    def allocate(self) -> dict[str, int | None]:
        return _allocate(self.layers, self.reducible, self.multiple)

    def plan(self, ranks: dict[str, int | None], note: str = "") -> Plan:
        out, kept = {}, dict(self.dense)
        for layer in self.layers:
            r = ranks[layer.name]
            if r is None:
                kept[layer.name] = f"budget: factoring would cost more output energy per {self.what[:-1]} saved"
                continue
            out[layer.name] = LayerPlan(layer.shape.kind, r, r, r, None, (
                f"budget {self.target:g} of dense {self.what}: rank {r} of {layer.shape.full_rank}, output energy "
                f"lost {layer.loss(r):.2%}{note}"))
        ordered = {n: out[n] for n in self.order if n in out}
        meta = {f"target_{self.measure}": self.target, "rank_multiple": self.multiple}
        return Plan(self.arch, ordered, kept, self.method, meta)


def _refine_on_validation(model: nn.Module, subspaces: Subspaces, budget: _Budget, ranks: dict[str, int | None],
                          plan: Plan, evaluate: Callable[[nn.Module], float], progress: bool) -> Plan:
    """Reweight each layer's energy loss by its measured validation sensitivity (``** alpha``) and keep the
    allocation that validates best (alpha 0 is the energy-only plan)."""
    layers = budget.layers
    baseline = evaluate(model)
    sensitivity = {}
    for layer in tqdm([layer for layer in layers if ranks[layer.name] is not None], desc="budget: sensitivity",
                      unit="layer", disable=not progress, leave=False):
        alone = plan.replace_layers({layer.name: plan.layers[layer.name]})
        sensitivity[layer.name] = max(baseline - evaluate(factor_model(model, alone, subspaces)[0]), 0.0)
    floor = max(1e-4, 0.1 * sum(sensitivity.values()) / max(1, len(sensitivity)))
    best, best_score, best_alpha = plan, evaluate(factor_model(model, plan, subspaces)[0]), 0.0
    for alpha in (0.5, 1.0):
        for layer in layers:
            layer.weight = (max(sensitivity.get(layer.name, 0.0), floor) / floor) ** alpha
        candidate = budget.plan(budget.allocate(), f"; weighted by validation sensitivity^{alpha:g}")
        score = evaluate(factor_model(model, candidate, subspaces)[0])
        if score > best_score:
            best, best_score, best_alpha = candidate, score, alpha
    for layer in layers:
        layer.weight = 1.0
    return best.replace_layers(best.layers, sensitivity_alpha=best_alpha, validation=round(best_score, 6))


def plan_fraction(model: nn.Module, plan: Plan, measure: str = "params", example: torch.Tensor | None = None) -> float:
    """The fraction of ``model``'s parameters (or FLOPs per ``example``) the model factored to ``plan`` keeps."""
    total = count_params(model) if measure == "params" else count_flops(model, example)
    names = list(plan.layers)
    tokens = _layer_tokens(model, names, example) if measure == "flops" else dict.fromkeys(names, 1)
    saved = 0
    for name, entry in plan.layers.items():
        shape = layer_shape(model.get_submodule(name))
        scale = 2 * tokens[name] if measure == "flops" else 1
        n_in, n_out = shape.in_features, shape.out_features
        saved += scale * (n_in * n_out - entry.rank * (n_in + n_out))
    return (total - saved) / total
