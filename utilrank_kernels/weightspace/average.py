"""Weight averaging: uniform and greedy model soups (Wortsman et al., 2022) and stochastic weight
averaging (Izmailov et al., 2018) on ``torch.optim.swa_utils``.

An *ingredient* is a module, a state dict, or a weights file (``.safetensors``, or a torch file read with
``weights_only=True``). Wrapper prefixes (``module.`` of DDP and of EMA / ``AveragedModel`` copies,
``_orig_mod.`` of ``torch.compile``, ``ema.``, ``ema_model.``, ``model_ema.``) are stripped when every
key carries them, and ``AveragedModel``'s ``n_averaged`` counter is dropped. Ingredients must hold the
same tensors with the same shapes; errors name the ingredient and the offending tensors.

Floating-point tensors are averaged in fp64 and cast back to their dtype; integer tensors (BatchNorm's
``num_batches_tracked``) are counters, not weights: the first ingredient's is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..models import load_state_dict_file
from ..train import train

Ingredient = nn.Module | Mapping[str, torch.Tensor] | str | Path
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "ema.", "ema_model.", "model_ema.")
AVERAGING_KEYS = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel's counter


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` without the wrapper prefixes every key shares (repeatedly: ``module._orig_mod.``), and
    the prefix removed."""
    state = {k: v for k, v in state.items() if k not in AVERAGING_KEYS}
    removed = ""
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        removed += prefix
    return state, removed


def describe(ingredient: Ingredient, index: int) -> str:
    return str(ingredient) if isinstance(ingredient, (str, Path)) else f"ingredient {index}"


def state_dict_of(ingredient: Ingredient, index: int = 0) -> dict[str, torch.Tensor]:
    """The ingredient's tensors by name (detached; a module's stay on its device), prefixes stripped."""
    if isinstance(ingredient, nn.Module):
        state = {k: v.detach() for k, v in ingredient.state_dict().items()}
    elif isinstance(ingredient, (str, Path)):
        state = load_state_dict_file(ingredient)
    elif isinstance(ingredient, Mapping):
        bad = [k for k, v in ingredient.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{describe(ingredient, index)}: entries that are not tensors: "
                             f"{', '.join(map(str, bad[:8]))}")
        state = dict(ingredient)
    else:
        raise TypeError(f"{describe(ingredient, index)}: expected a module, a state dict or a weights file, "
                        f"got {type(ingredient).__name__}")
    if not state:
        raise ValueError(f"{describe(ingredient, index)}: holds no tensors")
    return strip_prefixes(state)[0]


def _list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_compatible(states: Sequence[Mapping[str, torch.Tensor]], labels: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every ingredient whose tensor names or shapes differ from the first's."""
    if not states:
        raise ValueError("no ingredients to average")
    ref, problems = states[0], []
    for state, label in zip(states[1:], labels[1:], strict=True):
        missing, extra = ref.keys() - state.keys(), state.keys() - ref.keys()
        if missing:
            problems.append(f"{label} lacks {_list(missing)}")
        if extra:
            problems.append(f"{label} has tensors {labels[0]} lacks: {_list(extra)}")
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}"
                  for k in sorted(ref.keys() & state.keys())
                  if state[k].shape != ref[k].shape]
        if shapes:
            problems.append(f"{label} differs in shape: {', '.join(shapes[:8])}")
    if problems:
        raise ValueError("ingredients do not match: " + "; ".join(problems))


def nonfinite(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"tensor NAME holds 3 NaN of 4,096 values"`` for the first floating-point tensor (by name) holding NaN or
    Inf; None where all are finite."""
    for name in sorted(state):
        t = state[name]
        if not (t.is_floating_point() or t.is_complex()):
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(t).sum())
        inf = t.numel() - int(finite.sum()) - nan
        counts = " and ".join(f"{n:,} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
        return f"tensor {name} holds {counts} of {t.numel():,} values"
    return None


def _states(ingredients: Sequence[Ingredient]) -> list[dict[str, torch.Tensor]]:
    """The ingredients' state dicts, compatible and finite (``ValueError`` naming the ingredient and tensor)."""
    ingredients = list(ingredients)
    states = [state_dict_of(x, i) for i, x in enumerate(ingredients)]
    labels = [describe(x, i) for i, x in enumerate(ingredients)]
    check_compatible(states, labels)
    for state, label in zip(states, labels, strict=True):
        problem = nonfinite(state)
        if problem is not None:
            raise ValueError(f"{label}: {problem}; a soup with NaN or Inf weights is NaN")
    return states


class _RunningSum:
    """fp64 sums of the floating tensors of the states added so far."""

    def __init__(self, ref: Mapping[str, torch.Tensor]):
        self.ref = ref
        self.sums = {k: torch.zeros_like(v, dtype=torch.float64)
                     for k, v in ref.items() if v.is_floating_point()}
        self.weight = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        for k, s in self.sums.items():
            s.add_(state[k].to(device=s.device, dtype=torch.float64), alpha=weight)
        self.weight += weight

    def mean(self, extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The average, with ``extra`` (weight 1) included without changing the sums."""
        total = self.weight + (extra is not None)
        out = {}
        for k, v in self.ref.items():
            if k in self.sums:
                s = self.sums[k]
                if extra is not None:
                    s = s + extra[k].to(s.device, torch.float64)
                out[k] = (s / total).to(v.dtype)
            else:
                out[k] = v.clone()
        return out


def average_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The (weighted) mean of compatible state dicts; ``weights`` are normalized to sum to 1."""
    check_compatible(states, [f"ingredient {i}" for i in range(len(states))])
    if weights is None:
        weights = [1.0] * len(states)
    if len(weights) != len(states) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {len(states)} non-negative numbers with a positive sum, "
                         f"got {list(weights)}")
    acc = _RunningSum(states[0])
    for state, w in zip(states, weights, strict=True):
        acc.add(state, float(w))
    return acc.mean()


def uniform_soup(
    ingredients: Sequence[Ingredient], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """The uniform soup: every ingredient's weights averaged (``weights`` for a weighted mean)."""
    return average_state_dicts(_states(ingredients), weights)


def load_soup(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load an averaged state dict into ``model`` in place (whatever wrapper prefix the model's own keys
    carry), strictly: a missing, unexpected or misshapen tensor raises ``ValueError`` naming it."""
    own, prefix = strip_prefixes(model.state_dict())
    state = strip_prefixes(state)[0]
    problems = fit_problems(own, state)
    if problems:
        raise ValueError(f"soup does not fit {type(model).__name__}: {problems}")
    model.load_state_dict({prefix + k: v for k, v in state.items()}, strict=False)
    return model


def fit_problems(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str = "the soup"
                 ) -> str | None:
    """Why ``state`` (``what``) does not load into a model whose state dict is ``own`` (both without wrapper
    prefixes): the tensors it lacks, those the model has not, the shapes that differ; None where it fits."""
    problems = []
    if own.keys() - state.keys():
        problems.append(f"{what} lacks {_list(own.keys() - state.keys())}")
    if state.keys() - own.keys():
        problems.append(f"the model has no {_list(state.keys() - own.keys())}")
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(own.keys() & state.keys())
              if own[k].shape != state[k].shape]
    if shapes:
        problems.append("shapes differ: " + ", ".join(shapes[:8]))
    return "; ".join(problems) or None


@dataclass
class GreedySoup:
    """The greedy soup's weights, the ingredients it holds (indices, in the order added), each
    ingredient's held-out score, the soup's score, and every step's decision."""

    state_dict: dict[str, torch.Tensor]
    selected: list[int]
    scores: list[float]
    score: float
    history: list[dict] = field(default_factory=list)


def greedy_soup(
    ingredients: Sequence[Ingredient],
    evaluate: Callable,
    *,
    model: nn.Module | None = None,
    scores: Sequence[float] | None = None,
    progress: bool = True,
) -> GreedySoup:
    """Wortsman et al.'s greedy soup: ingredients sorted by held-out score (best first); each is added to
    the soup only if the soup's held-out score does not drop. The soup is never worse on the held-out
    data than its best ingredient (that is where it starts).

    ``evaluate`` is the user's held-out metric (higher is better, e.g. validation accuracy): it receives
    a state dict, or, when ``model`` is given, ``model`` with the candidate soup loaded (``model`` ends
    holding the returned soup). ``scores`` are the ingredients' own scores when already known."""
    states = _states(ingredients)

    def score_of(state) -> float:
        if model is None:
            return float(evaluate(state))
        load_soup(model, state)
        return float(evaluate(model))

    if scores is None:
        bar = tqdm(states, desc="score ingredients", unit="model", disable=not progress)
        scores = [score_of(s) for s in bar]
    elif len(scores) != len(states):
        raise ValueError(f"{len(scores)} scores for {len(states)} ingredients")
    scores = [float(s) for s in scores]
    order = sorted(range(len(states)), key=lambda i: -scores[i])  # stable: ties keep the given order
    first = order[0]
    acc = _RunningSum(states[first])
    acc.add(states[first])
    soup, best, selected = acc.mean(), scores[first], [first]  # a copy: never the ingredient's own tensors
    history = [{"index": first, "score": best, "added": True}]
    for i in tqdm(order[1:], desc="greedy soup", unit="model", disable=not progress):
        candidate = acc.mean(extra=states[i])
        score = score_of(candidate)
        added = score >= best
        history.append({"index": i, "score": score, "added": added})
        if added:
            acc.add(states[i])
            soup, best = candidate, score
            selected.append(i)
    if model is not None:
        load_soup(model, soup)
    return GreedySoup(soup, selected, scores, best, history)


# -- stochastic weight averaging ----------------------------------------------------------------------


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def swa_average(
    model: nn.Module,
    snapshots: Sequence[Ingredient],
    *,
    bn_loader: Iterable | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The equal average of ``snapshots`` (weights along one training run, loaded in turn into a copy of
    ``model``) by ``AveragedModel``, with BatchNorm statistics recomputed by ``update_bn`` over
    ``bn_loader`` (required when the model has BatchNorm: the snapshots' running statistics do not
    describe the averaged weights' activations)."""
    if has_batchnorm(model) and bn_loader is None:
        raise ValueError("the model has BatchNorm layers: pass bn_loader so update_bn recomputes their "
                         "statistics")
    states = _states(snapshots)
    work = copy.deepcopy(model)
    averaged = AveragedModel(work)
    for state in states:
        load_soup(work, state)
        averaged.update_parameters(work)
    if bn_loader is not None and has_batchnorm(model):
        update_bn(bn_loader, averaged.module, device=device)
    return averaged.module.eval()


def swa(
    model: nn.Module,
    dataset,
    *,
    cycles: int,
    epochs_per_cycle: int = 1,
    lr: float,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    augment: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """SWA with a cyclical learning rate (Izmailov et al., §3.2), on the package's one training loop:
    ``cycles`` calls of ``train`` (each a warm-up then a cosine decay to 0 over ``epochs_per_cycle``),
    the weights at the end of each cycle (its low-LR point) averaged by ``AveragedModel``; BatchNorm
    statistics recomputed over ``dataset`` by ``update_bn``. ``model`` itself is not modified."""
    if cycles < 1 or epochs_per_cycle < 1:
        raise ValueError(f"swa needs cycles >= 1 and epochs_per_cycle >= 1, got {cycles}, {epochs_per_cycle}")
    work = copy.deepcopy(model).to(device)
    averaged = AveragedModel(work)
    for c in tqdm(range(cycles), desc="swa", unit="cycle", disable=not progress):
        train(work, dataset, epochs=epochs_per_cycle, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
              seed=seed + c, augment=augment, device=device, desc=f"swa cycle {c + 1}")
        averaged.update_parameters(work)
    if has_batchnorm(work):
        update_bn(DataLoader(dataset, batch_size=256), averaged.module, device=device)
    return averaged.module.eval()
