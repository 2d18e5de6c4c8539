"""Error-aware statistics: each layer's ``C_in`` on the inputs that the already-factored layers before it produce
(as GPTQ and SVD-LLM v2 take theirs), block by block.

A *step* is a top-level repeated unit, the layers whose names share the prefix up to their first numeric component
(timm's ``blocks.3``, a Hugging Face encoder's ``encoder.layer.3``, a ResNet's ``layer1.0``); a layer outside every
block (a patch embedding, a head) is a step of its own. For each step in module order: one pass of ``collect_stats``
over the calibration batches with a filter on that step's layers, on a copy of the model where every earlier step is
already factored; then the step's layers are factored at the ranks ``rank_for`` gives from the statistics just
gathered, and the next step runs. The pass holds one step's accumulators at a time on the device (finished steps move
to the CPU); it costs one forward pass over the calibration data per step instead of one in all. The model passed in
is not modified.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
from torch import nn

from ..analysis import LayerSubspaces, Statistics, collect_stats, compute_subspaces
from ..layers import FilterFn, factored_pays, find_layers, swap_modules
from .factor import factor_layer, layer_factors
from .plan import LayerPlan, Plan

logger = logging.getLogger(__name__)
RankRule = Callable[[str, LayerSubspaces], "LayerPlan | int | None"]


def block_of(name: str) -> str:
    """The step a layer belongs to: its name up to its first numeric component (``blocks.3.attn.qkv`` ->
    ``blocks.3``), or the layer's own name where it has none (``head``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def steps(names: Iterable[str]) -> list[list[str]]:
    """``names`` (module order) grouped into steps by ``block_of``, each step in order of its first layer."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(block_of(name), []).append(name)
    return list(grouped.values())


def energy_rule(energy: float, method: str = "optimal") -> RankRule:
    """The pipeline's cut without a search (``plan_ranks`` with ``tolerance=None``): ``k_in`` / ``k_out`` at
    ``energy``, rank their minimum; dense where the factors would not save weights."""
    def rule(name: str, sub: LayerSubspaces) -> LayerPlan | None:
        k_in, k_out = sub.ranks(energy)
        out_features, in_features = sub.weight.shape
        rank = min(k_in, k_out)
        if not factored_pays(rank, in_features, out_features):
            return None
        return LayerPlan("linear", rank, k_in, k_out, energy, f"energy {energy}")
    return rule


def plan_rule(plan: Plan) -> RankRule:
    """The ranks of a given plan (its layers only; every other layer stays dense)."""
    return lambda name, sub: plan.layers.get(name)


def _entry(rule_value: LayerPlan | int | None, kind: str) -> LayerPlan | None:
    if rule_value is None:
        return None
    if isinstance(rule_value, LayerPlan):
        return replace(rule_value, kind=kind)
    return LayerPlan(kind, int(rule_value))


def collect_stats_sequential(
    model: nn.Module,
    batches: Iterable,
    rank_for: RankRule,
    *,
    method: str = "optimal",
    filter_fn: FilterFn | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    meta: dict | None = None,
    **collect_kwargs,
) -> Statistics:
    """Error-aware statistics of ``model``'s layers (those ``filter_fn`` passes), one step (block) at a time.

    ``batches`` is iterated once per step (a ``DataLoader`` or a list, not a generator). ``rank_for(name,
    subspaces)`` gives a layer's factors from the statistics just gathered: a ``LayerPlan`` (its ``k_in`` /
    ``k_out`` for ``method="data"``), a rank, or None to keep it dense (``energy_rule``, ``plan_rule``).
    ``method``: ``optimal`` or ``data`` (``svd`` needs no statistics). Other keywords go to ``collect_stats``
    (``mask_fn``, ``backend``, ``max_batches``, ``overlap``, ``stats_on_cpu``). The result has every layer's
    statistics, in module order, on the CPU where the pass ran elsewhere (except the last step's)."""
    if method not in ("optimal", "data"):
        raise ValueError(f"error-aware statistics: method {method!r} has no use for statistics; use optimal or data")
    if isinstance(batches, Iterator):
        raise ValueError("error-aware statistics: batches are read once per block; pass a DataLoader or a list, "
                         "not an iterator")
    layers, left_out = find_layers(model, filter_fn)
    if not layers:
        raise ValueError("collect_stats_sequential: the model has no nn.Linear or nn.Conv2d (groups=1) layer to "
                         "analyze")
    plan_steps = steps(layers)
    working = copy.deepcopy(model)
    gathered: dict[str, Statistics] = {}
    for i, names in enumerate(plan_steps):
        wanted = set(names)
        if progress:
            logger.info(f"error-aware statistics: step {i + 1} of {len(plan_steps)} ({block_of(names[0])}, "
                        f"{len(names)} layers)")
        part = collect_stats(working, batches, filter_fn=lambda m, n, w=wanted: n in w, device=device,
                             progress=progress, **collect_kwargs)
        if i + 1 < len(plan_steps):  # the last step's layers feed no later statistics
            _factor_step(working, part, rank_for, method)
            for s in part.layers.values():  # one step's accumulators on the device at a time
                s.cov = s.cov.cpu()
        gathered[names[0]] = part
    merged = {n: s for part in gathered.values() for n, s in part.layers.items()}
    batches_seen = next(iter(gathered.values())).batches
    skipped = [{"name": n, "reason": r} for n, r in left_out.items()]
    return Statistics({n: merged[n] for n in layers}, skipped, batches_seen,
                      {**dict(meta or {}), "error_aware": {"steps": len(plan_steps), "method": method}})


def _factor_step(working: nn.Module, part: Statistics, rank_for: RankRule, method: str) -> None:
    """Factor, in place, the step's layers of ``working`` at the ranks ``rank_for`` gives on ``part``."""
    subspaces = compute_subspaces(working, part, progress=False)
    modules = dict(working.named_modules())
    factors = {}
    for name, sub in subspaces.items():
        entry = _entry(rank_for(name, sub), part.layers[name].kind)
        if entry is None:
            logger.info(f"error-aware statistics: {name} stays dense in the pass (no rank for it)")
            continue
        factors[name] = layer_factors(modules[name], sub, entry, method)
    for name in part.layers.keys() - subspaces.keys():
        logger.info(f"error-aware statistics: {name} stays dense in the pass ({subspaces.skipped.get(name, '')})")
    swap_modules(working, lambda m, name: factor_layer(m, *factors[name]), names=list(factors))
