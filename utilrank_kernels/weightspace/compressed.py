"""Soups of compressed models: averaged in the dense space, re-factored on the soup's own statistics.

Compressed models that share a plan have factors of equal shapes, but averaging them factor by factor
is meaningless: ``B A = (B G)(G^-1 A)`` for any invertible ``r x r`` ``G``, and models compressed on
their own data subspaces (or fine-tuned apart) differ by exactly such mixings, so the mean of the
``A``'s and the mean of the ``B``'s multiply to a matrix that is not the mean of the ``B A``'s. The
sound soup averages what the factors represent:

1. each ingredient's factored layers are expanded to their dense weights ``W_i = B_i A_i`` (every other
   tensor is taken as is) and the dense state dicts are averaged (uniform, weighted or greedy);
2. the averaged dense model is factored again at the plan's ranks, ``W' = P_out W P_in = B A``
   (DESIGN §1 step 5), on the subspaces of **statistics recollected on the averaged dense model**.

Why recollect rather than merge the ingredients' statistics (``Statistics.merge``): the projections
must span the inputs the *soup's* layers receive, and those come from the soup's earlier layers, which
are averages, not any ingredient's (activations are not linear in the weights). Merged statistics
describe the mixture of the ingredients' inputs; for ingredients in one basin they are close, but only
the soup's own pass is exact, and it costs one forward pass over the data, the price of compressing
any dense model. Merged statistics are accepted (``stats=``) for when the data is no longer at hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis import Statistics, collect_stats, compute_subspaces
from ..compress.factor import expand, factor_model
from ..compress.plan import Plan, apply_plan
from .average import (
    GreedySoup,
    Ingredient,
    average_state_dicts,
    describe,
    greedy_soup,
    load_soup,
    state_dict_of,
)


def _expanded(ingredient: Ingredient, plan: Plan, index: int = 0) -> dict[str, torch.Tensor]:
    """The compressed ingredient's dense state dict (``compress.expand``: ``W = B A`` per planned layer)."""
    return expand(state_dict_of(ingredient, index), plan, source=describe(ingredient, index))


def dense_equivalent(ingredient: Ingredient, plan: Plan, dense_model: nn.Module) -> nn.Module:
    """A copy of ``dense_model`` holding the compressed ingredient's weights, ``W = B A`` per planned
    layer: the same function, with plain layers that statistics hooks see."""
    return _dense_model(dense_model, _expanded(ingredient, plan))


def planned_stats(model: nn.Module, plan: Plan, batches: Iterable, **collect_kwargs) -> Statistics:
    """One statistics pass over ``batches`` on the planned layers of a dense ``model`` (for a compressed
    one, pass its ``dense_equivalent``: each layer receives exactly the inputs it does there)."""
    layers = set(plan.layers)
    collect_kwargs.setdefault("progress", False)
    return collect_stats(model, batches, filter_fn=lambda m, name: name in layers, **collect_kwargs)


def refactor(model: nn.Module, plan: Plan, stats: Statistics) -> nn.Module:
    """A factored copy of the dense ``model`` on the subspaces of ``stats``, in exactly the plan's shape:
    where a layer comes out rank deficient its factors are zero-padded to the planned rank (the same
    function), so that every ingredient of a soup shares one architecture."""
    missing = [n for n in plan.layers if n not in stats.layers]
    if missing:
        raise ValueError(f"no statistics for planned layers {', '.join(missing[:8])}")
    return factor_model(model, plan, compute_subspaces(model, stats, progress=False), keep_ranks=True)[0]


@dataclass
class CompressedSoup:
    model: nn.Module  # factored per the plan
    dense: nn.Module  # the averaged dense model it was factored from
    stats: Statistics | None  # the statistics the factors were computed on (None: an ingredient as is)
    selected: list[int] | None = None  # greedy soups: the ingredients it holds
    greedy: GreedySoup | None = None


def _dense_model(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    return load_soup(copy.deepcopy(template), state)


def compressed_soup(
    ingredients: Sequence[Ingredient],
    plan: Plan,
    dense_model: nn.Module,
    *,
    batches: Iterable | None = None,
    stats: Statistics | None = None,
    weights: Sequence[float] | None = None,
    **collect_kwargs,
) -> CompressedSoup:
    """The uniform (or ``weights``-weighted) soup of compressed models sharing ``plan``: their dense
    weights ``B_i A_i`` averaged into a copy of ``dense_model`` (the uncompressed architecture), then
    factored at the plan's ranks on statistics recollected over ``batches`` on that averaged model (or
    on ``stats``, e.g. the ingredients' merged statistics; see the module docstring)."""
    if stats is None and batches is None:
        raise ValueError("compressed_soup needs batches (to collect the soup's statistics) or stats")
    states = [_expanded(x, plan, i) for i, x in enumerate(ingredients)]
    dense = _dense_model(dense_model, average_state_dicts(states, weights))
    if stats is None:
        stats = planned_stats(dense, plan, batches, **collect_kwargs)
    return CompressedSoup(refactor(dense, plan, stats), dense, stats)


def compressed_module(ingredient: Ingredient, plan: Plan, dense_model: nn.Module) -> nn.Module:
    """The ingredient as a factored module (a module is returned as is; weights are loaded into
    ``dense_model``'s architecture with the plan applied)."""
    if isinstance(ingredient, nn.Module):
        return ingredient
    model = apply_plan(copy.deepcopy(dense_model), plan)
    return load_soup(model, state_dict_of(ingredient))


def greedy_compressed_soup(
    ingredients: Sequence[Ingredient],
    plan: Plan,
    dense_model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    batches: Iterable,
    scores: Sequence[float] | None = None,
    progress: bool = True,
    **collect_kwargs,
) -> CompressedSoup:
    """The greedy soup of compressed models: ingredients sorted by ``evaluate`` (held-out accuracy of the
    compressed ingredient itself, or ``scores``), each candidate soup built as ``compressed_soup`` does
    (dense average, statistics of the averaged model, re-factored) and scored as the compressed model it
    is; an ingredient stays only if the score does not drop. A soup of one ingredient is that ingredient."""
    ingredients = list(ingredients)
    if scores is None:
        scores = [float(evaluate(compressed_module(x, plan, dense_model))) for x in ingredients]
    scores = [float(s) for s in scores]
    states = [_expanded(x, plan, i) for i, x in enumerate(ingredients)]
    # the soup greedy_soup ends with is the last candidate whose score reached the best so far (its
    # acceptance rule): keep that one built, not every candidate
    kept = {"score": max(scores), "state": None, "soup": None}

    def score_candidate(state) -> float:
        dense = _dense_model(dense_model, state)
        stats = planned_stats(dense, plan, batches, **collect_kwargs)
        soup = CompressedSoup(refactor(dense, plan, stats), dense, stats)
        score = float(evaluate(soup.model))
        if score >= kept["score"]:
            kept.update(score=score, state=state, soup=soup)
        return score

    result = greedy_soup(states, score_candidate, scores=scores, progress=progress)
    if len(result.selected) == 1:
        only = result.selected[0]
        model = copy.deepcopy(compressed_module(ingredients[only], plan, dense_model))
        soup = CompressedSoup(model, _dense_model(dense_model, result.state_dict), None)
    else:
        assert kept["state"] is result.state_dict
        soup = kept["soup"]
    soup.selected, soup.greedy = result.selected, result
    return soup
