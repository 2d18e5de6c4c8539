"""Plans sized to a parameter budget."""

import math

import pytest

from utilrank_kernels.compress import uniform_plan
from utilrank_kernels.models import build_builtin
from utilrank_kernels.nn.lowrank import layer_shape


def test_uniform_plan_keeps_at_most_the_fraction_of_every_layer():
    dense = build_builtin("vit-digits")
    plan = uniform_plan(dense, 0.5, multiple=16)
    kept = total = 0
    for name, entry in plan.layers.items():
        shape = layer_shape(dense.get_submodule(name))
        n_in, n_out = shape.in_features, shape.out_features
        exact = int(0.5 * n_in * n_out / (n_in + n_out))
        assert entry.rank == (exact // 16 * 16 if exact // 16 * 16 >= 0.9 * exact else exact)
        assert entry.rank * (n_in + n_out) <= 0.5 * n_in * n_out
        kept, total = kept + entry.rank * (n_in + n_out), total + n_in * n_out
    assert 0.45 < kept / total <= 0.5
    with pytest.raises(ValueError, match="fraction 1.5"):
        uniform_plan(dense, 1.5)


def _synthetic(spectra: dict[str, list[float]], sizes: dict[str, tuple[int, int]]):
    """A model of Linear layers and subspaces whose C_out spectra are given (the budget needs only those)."""
    import torch
    from torch import nn

    from utilrank_kernels.analysis.subspace import LayerSubspaces, Subspaces

    model = nn.Sequential(*[nn.Linear(n_in, n_out, bias=False) for n_in, n_out in sizes.values()])
    names = [str(i) for i in range(len(sizes))]
    subs = {}
    for name, (key, spectrum) in zip(names, spectra.items(), strict=True):
        n_in, n_out = sizes[key]
        eye = torch.eye(max(n_in, n_out), dtype=torch.float64)
        eig = torch.tensor(spectrum + [0.0] * (n_out - len(spectrum)), dtype=torch.float64)
        subs[name] = LayerSubspaces(name, torch.zeros(n_out, n_in, dtype=torch.float64), torch.ones(n_in),
                                    eye[:n_in, :n_in], eig, eye[:n_out, :n_out])
    return model, Subspaces(subs)


def test_budget_cuts_where_output_energy_is_cheapest():
    """A layer whose outputs live in one direction loses nothing at rank 1 and is cut first; a flat spectrum
    is cut last."""
    model, subspaces = _synthetic({"peaked": [1.0], "flat": [1.0] * 16}, {"peaked": (16, 16), "flat": (16, 16)})
    from utilrank_kernels.compress import budget_plan

    plan = budget_plan(model, subspaces, 0.6, method="optimal")
    assert plan.layers["0"].rank == 1 and "output energy lost 0.00%" in plan.layers["0"].reason
    assert "1" not in plan.layers or plan.layers["1"].rank > 1


def test_allocation_is_optimal_for_its_cost_by_brute_force():
    """The Lagrangian allocation loses no more output energy than the best of every combination of ranks (and
    dense) that costs no more than it does (exact, with the non-convex jump from dense to factored); the
    final fill only spends leftover budget to lose less. Random small layers, every combination enumerated."""
    import itertools
    import random

    import torch

    from utilrank_kernels.compress.budget import _allocate, _Layer
    from utilrank_kernels.layers import LayerShape

    rng = random.Random(0)
    for _ in range(12):
        sizes = [(rng.randint(4, 10), rng.randint(4, 10)) for _ in range(3)]
        spectra = [sorted((rng.random() ** 3 for _ in range(o)), reverse=True) for _, o in sizes]
        layers = []
        for k, ((n_in, n_out), spectrum) in enumerate(zip(sizes, spectra, strict=True)):
            cum = torch.tensor([0.0, *itertools.accumulate(spectrum)], dtype=torch.float64)
            layers.append(_Layer(str(k), LayerShape("linear", n_in, n_out, bias=False), n_in + n_out, n_in * n_out,
                                 1 - cum / cum[-1]))
        options = [[None, *range(1, layer.break_even + 1)] for layer in layers]
        cost = lambda combo, layers=layers: sum(layer.cost(r) for layer, r in zip(layers, combo, strict=True))  # noqa: E731
        loss = lambda combo, layers=layers: sum(layer.loss(r) for layer, r in zip(layers, combo, strict=True))  # noqa: E731
        dense = sum(layer.dense_cost for layer in layers)
        for target in (0.3, 0.5, 0.7):
            budget = int(target * dense)
            if cost([1, 1, 1]) > budget:
                continue
            point = [_allocate(layers, budget, 1, fill=False)[layer.name] for layer in layers]
            best = min(loss(c) for c in itertools.product(*options) if cost(c) <= cost(point))
            assert loss(point) <= best + 1e-12 and cost(point) <= budget
            filled = [_allocate(layers, budget, 1)[layer.name] for layer in layers]
            assert loss(filled) <= loss(point) + 1e-12 and cost(filled) <= budget


@pytest.mark.parametrize("name", ["vit-digits", "vgg-digits"])
@pytest.mark.parametrize("measure", ["params", "flops"])
def test_budget_hits_the_whole_model_target_within_one_percent(name, measure):
    import torch

    from utilrank_kernels import collect_stats, compute_subspaces, factor_model
    from utilrank_kernels.compress import budget_plan
    from utilrank_kernels.measure import count_flops, count_params

    model = build_builtin(name).eval()  # random init: the allocation needs spectra, not trained weights
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 1, 16, 16, generator=g) for _ in range(2)]
    subspaces = compute_subspaces(model, collect_stats(model, batches, progress=False), progress=False)
    plan = budget_plan(model, subspaces, 0.5, measure=measure, example=batches[0][:1], method="optimal")
    compressed, _ = factor_model(model, plan, subspaces)
    count = count_params if measure == "params" else (lambda m: count_flops(m, batches[0][:1]))
    achieved = count(compressed) / count(model)
    assert abs(achieved - 0.5) <= 0.005 and achieved <= 0.5, achieved
    with pytest.raises(ValueError, match="out of reach|already"):
        budget_plan(model, subspaces, 0.01, measure=measure, example=batches[0][:1])


@pytest.mark.parametrize("measure", ["params", "flops"])
def test_the_floor_is_every_layer_at_rank_one(measure):
    """``budget_floor``: what the architecture keeps whatever the ranks, from the model alone; exactly the fraction of
    the plan with every factorable layer at rank 1, and the target just above it is reachable."""
    import torch

    from utilrank_kernels.compress import LayerPlan, Plan
    from utilrank_kernels.compress.budget import budget_floor, check_reachable, plan_fraction
    from utilrank_kernels.layers import find_layers

    model = build_builtin("vit-digits").eval()
    example = torch.randn(1, 1, 16, 16)
    floor = budget_floor(model, measure, example)
    layers = {n: LayerPlan(layer_shape(m).kind, 1) for n, m in find_layers(model)[0].items()
              if layer_shape(m).in_features * layer_shape(m).out_features > layer_shape(m).in_features
              + layer_shape(m).out_features}
    assert floor.fraction == pytest.approx(plan_fraction(model, Plan("vit", layers), measure, example), rel=1e-9)
    check_reachable(model, floor.fraction + 1e-3, measure, example)
    smallest = math.ceil(floor.fraction * 1e4) / 1e4  # rounded up: the target it names is reachable
    with pytest.raises(ValueError, match=f"--target-{measure} 0.001: out of reach.*smallest reachable target is "
                                         f"{smallest:g}$"):
        check_reachable(model, 0.001, measure, example)


def test_the_floor_names_what_cannot_be_cut():
    """A text encoder's embeddings, a layer left out, and the rest by kind."""
    from _hf import bert_config
    from transformers import BertModel

    from utilrank_kernels.compress.budget import budget_floor
    from utilrank_kernels.layers import name_filter

    model = BertModel(bert_config())
    floor = budget_floor(model, filter_fn=name_filter(exclude=("pooler.*",)))
    parts = {name: what for name, what, _ in floor.fixed}
    assert parts["embeddings.word_embeddings"] == "Embedding" and parts["pooler.dense"] == "excluded by filter"
    assert floor.describe().startswith("embeddings.word_embeddings (Embedding, ")
    assert "LayerNorm x5" in floor.describe()
    total = sum(p.numel() for p in model.parameters())
    assert floor.total == total and sum(cost for _, _, cost in floor.fixed) < floor.floor < total


@pytest.mark.parametrize("measure", ["params", "flops"])
def test_the_floor_counts_a_grouped_conv_by_the_weights_it_holds(measure):
    """A depthwise conv is left dense (grouped convs are not factored): the floor counts its C k^2 weights (and
    2 C k^2 FLOPs per output pixel), not C x C k^2; checked against a count made module by module."""
    import torch
    from torch import nn

    from utilrank_kernels.compress.budget import budget_floor

    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
                          nn.Conv2d(32, 64, 1, bias=False)).eval()
    example = torch.randn(1, 3, 8, 8)
    floor = budget_floor(model, measure, example)
    weights = 3 * 32 + 32 * 9 + 32 * 64  # the depthwise conv holds 32 x 1 x 3 x 3
    kept = (3 + 32) + 32 * 9 + (32 + 64)  # the pointwise convs at rank 1, the depthwise conv whole
    if measure == "params":
        assert (floor.total, floor.floor) == (weights + 32, kept + 32)  # + the first conv's bias
    else:  # every layer runs on the 8 x 8 grid, 2 FLOPs per weight per pixel
        assert (floor.total, floor.floor) == (2 * 64 * weights, 2 * 64 * kept)
