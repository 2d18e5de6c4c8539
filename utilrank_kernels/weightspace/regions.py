"""Where models live in weight space (the second source: knowledge as regions): a population's weights
embedded in 2-D (PCA and t-SNE), their pairwise distances, and the accuracy along straight lines between
pairs of them (the loss barrier that says whether two models can be averaged into one).

**Weights as vectors.** A member is the concatenation of the model's floating-point parameters
(``space="whole"``; BatchNorm's running statistics are buffers and left out), or of one layer's weight
(``layer=NAME``). With ``projection`` (the data subspaces of a reference model at some energy), each
analyzed layer contributes ``U_out^T W U_in`` instead (``k_out x k_in``; the same Frobenius distances as
``P_out W P_in``): only the directions its data uses, and layers without statistics are left out.

**Distances** are Euclidean, between the full vectors (not the 2-D embedding), summarized as the mean
within each group and between each pair of groups. Models far from the rest (trained from other random
initializations) take the first principal axes to themselves, so the models within half the largest
distance from the first one (the base) get a PCA of their own (``pca_near``): a zoom on its basin.

**Barrier.** Along ``theta(t) = (1 - t) theta_a + t theta_b`` at ``points`` evenly spaced ``t`` in
``[0, 1]``, the validation accuracy ``acc(t)``; the barrier height is the largest drop below the straight
line between the endpoint accuracies, ``B = max_t [(1 - t) acc(0) + t acc(1) - acc(t)]`` (Frankle et al.,
2020; Entezari et al., 2022, on accuracy rather than loss). ``B >= 0`` (the endpoints contribute 0); ``B``
near 0 means the two lie in one basin, where their average is about as accurate as they are: the
condition for a soup. A model with BatchNorm has its running statistics recomputed at every point of the
path (``update_bn``; the endpoints' statistics do not describe the interpolated weights' activations).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..analysis.collect import collect_stats
from ..analysis.subspace import compute_subspaces, restricted_weight
from ..train import evaluate
from .average import has_batchnorm
from .population import Population

logger = logging.getLogger(__name__)

REGIONS_FORMAT = "utilrank.regions/1"
BARRIER_DEFINITION = ("B = max over t of [(1 - t) acc(0) + t acc(1) - acc(t)], acc(t) the validation accuracy of "
                      "the weights (1 - t) theta_a + t theta_b, t on evenly spaced points of [0, 1]")
BN_SAMPLES = 512  # training images that recompute BatchNorm statistics at each point of a path


# -- weights as vectors ---------------------------------------------------------------------------------------


def data_projection(model: nn.Module, data, energy: float = 0.99, *, batch_size: int = 256,
                    device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (U_out, U_in)}``: the eigenvectors of ``model``'s statistics on the training split at
    ``energy`` (``k_out`` and ``k_in`` columns), one statistics pass."""
    stats = collect_stats(model, DataLoader(data.train, batch_size=batch_size), device=device, progress=False)
    bases = {}
    for name, sub in compute_subspaces(model, stats, progress=False).items():
        u_in, u_out = sub.bases(*sub.ranks(energy))
        bases[name] = (u_out.cpu(), u_in.cpu())
    return bases


def check_layer(model: nn.Module, layer: str) -> None:
    """``ValueError`` naming ``layer`` and some of the model's layers where it has no such layer with a weight."""
    params = [n for n, _ in model.named_parameters()]
    if f"{layer}.weight" not in params:
        layers = sorted(n[: -len(".weight")] for n in params if n.endswith(".weight"))
        raise ValueError(f"--layer {layer}: the model has no such layer with a weight; layers: "
                         f"{', '.join(layers[:12])}{' ...' if len(layers) > 12 else ''}")


def weight_vectors(
    population: Population,
    *,
    layer: str | None = None,
    projection: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """``(X, parts)``: one row per member (fp64), and the names of the tensors (or projected layers) whose
    entries make up the columns, in order."""
    params = [n for n, _ in population.template.named_parameters()]
    if layer is not None:
        check_layer(population.template, layer)
        if projection is not None and layer not in projection:
            raise ValueError(f"--layer {layer}: no data subspaces for it (it is not an analyzed Linear/Conv2d)")
    if projection is not None:
        parts = [layer] if layer is not None else list(projection)
    else:
        parts = [f"{layer}.weight"] if layer is not None else params
    rows = []
    for member in population.members:
        pieces = []
        for part in parts:
            if projection is not None:
                u_out, u_in = projection[part]
                pieces.append(restricted_weight(u_out, member.state[f"{part}.weight"].double(), u_in).flatten())
            else:
                pieces.append(member.state[part].double().flatten())
        rows.append(torch.cat(pieces).numpy())
    return np.stack(rows), parts


# -- embedding and distances ----------------------------------------------------------------------------------


def embed(x: np.ndarray, *, seed: int = 0, tsne: bool = True) -> dict:
    """2-D PCA (with the variance ratio each axis explains) and t-SNE of the rows of ``x``. One exact PCA
    (full SVD: a few rows of many columns) gives both the 2-D map and the up to 50 components t-SNE
    starts from."""
    from sklearn.decomposition import PCA  # seconds to import: only for the maps
    from sklearn.manifold import TSNE

    n = x.shape[0]
    pca = PCA(n_components=min(n, x.shape[1], 50), svd_solver="full").fit(x)
    reduced = pca.transform(x)
    coords = np.zeros((n, 2))
    coords[:, : min(2, reduced.shape[1])] = reduced[:, :2]
    out = {"pca": coords.tolist(), "pca_explained": [float(v) for v in pca.explained_variance_ratio_[:2]]}
    if tsne and n >= 4:
        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))  # t-SNE needs perplexity < n
        model = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
        out["tsne"] = model.fit_transform(reduced).tolist()
        out["tsne_perplexity"] = perplexity
    return out


def neighbourhood(dist: np.ndarray, center: int = 0) -> list[int] | None:
    """The members within half the largest distance from ``center`` (the base), when that leaves out at least
    2 and keeps at least 3: a zoom on one basin, which a few far-away models would squash in the PCA of
    all."""
    radius = 0.5 * float(dist[center].max())
    near = [i for i in range(dist.shape[0]) if dist[center, i] <= radius]
    return near if 3 <= len(near) <= dist.shape[0] - 2 else None


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances between rows, from the differences themselves (identical rows: exactly 0; the
    Gram-matrix shortcut would leave round-off there)."""
    from scipy.spatial.distance import pdist, squareform  # scipy (through scikit-learn): only here

    return squareform(pdist(x))


def distance_summary(dist: np.ndarray, groups: Sequence[str]) -> dict:
    """Mean distance within each group (pairs of distinct members) and between each pair of groups."""
    order = list(dict.fromkeys(groups))
    idx = {g: [i for i, h in enumerate(groups) if h == g] for g in order}
    within = {}
    for g, ii in idx.items():
        pairs = [dist[i, j] for i, j in itertools.combinations(ii, 2)]
        within[g] = float(np.mean(pairs)) if pairs else None
    between = {f"{g} | {h}": float(np.mean(dist[np.ix_(idx[g], idx[h])])) for g, h in itertools.combinations(order, 2)}
    return {"within": within, "between": between}


# -- paths between models -------------------------------------------------------------------------------------


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """``(1 - t) a + t b`` for floating-point tensors (in fp64, cast back); counters (integer tensors) from
    ``a``."""
    return {k: ((1 - t) * v.double() + t * b[k].double()).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in a.items()}


def barrier_height(accuracies: Sequence[float]) -> float:
    """``max_t [(1 - t) acc(0) + t acc(1) - acc(t)]`` over evenly spaced ``t`` (``BARRIER_DEFINITION``)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    t = np.linspace(0.0, 1.0, acc.size)
    return float(np.max((1 - t) * acc[0] + t * acc[-1] - acc))


def path_accuracy(
    template: nn.Module,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    *,
    points: int = 11,
    bn_loader=None,
    device: torch.device | str = "cpu",
) -> list[float]:
    """``evaluate`` at ``points`` evenly spaced points of the straight line from ``a`` to ``b`` (BatchNorm
    statistics recomputed over ``bn_loader`` at each, when given)."""
    if points < 2:
        raise ValueError(f"a path needs at least 2 points, got {points}")
    model = copy.deepcopy(template).to(device)
    out = []
    for t in np.linspace(0.0, 1.0, points):
        model.load_state_dict(interpolate(a, b, float(t)))
        if bn_loader is not None:
            update_bn(bn_loader, model, device=device)
        out.append(float(evaluate(model.eval())))
    return out


def representative_pairs(population: Population) -> list[tuple[int, int, str]]:
    """The pairs whose paths are measured by default: each group's best member (by validation accuracy) with
    every other group's, and within each group of two or more, its best with its second best."""
    groups = population.groups()
    ranked = {g: sorted((i for i, m in enumerate(population.members) if m.group == g),
                        key=lambda i: -(population.members[i].val or 0.0)) for g in groups}
    pairs = [(ranked[g][0], ranked[h][0], "across groups") for g, h in itertools.combinations(groups, 2)]
    pairs += [(ranked[g][0], ranked[g][1], "same group") for g in groups if len(ranked[g]) >= 2]
    return pairs


# -- the experiment -------------------------------------------------------------------------------------------


def regions_experiment(
    population: Population,
    data,
    *,
    layer: str | None = None,
    project: bool = False,
    energy: float = 0.99,
    pairs: str = "representative",
    points: int = 11,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """The ``regions.json`` document of ``population`` (see the module docstring); ``pairs`` is
    ``"representative"`` (``representative_pairs``) or ``"all"``."""
    if pairs not in ("representative", "all"):
        raise ValueError(f"pairs = {pairs!r}: choose representative or all")
    members = population.members
    if len(members) < 2:
        raise ValueError(f"a map of weight space needs at least 2 models, got {len(members)}")
    started = time.perf_counter()
    projection = None
    if project:
        reference = population.load(members[0])
        logger.info(f"projecting on the data subspaces of {members[0].name} at energy {energy}")
        projection = data_projection(reference, data, energy, device=device)
    x, parts = weight_vectors(population, layer=layer, projection=projection)
    logger.info(f"embedding {len(members)} models of {x.shape[1]:,} weights each (PCA, t-SNE)")
    emb = embed(x, seed=seed)
    dist = pairwise_distances(x)
    groups = [m.group for m in members]
    near = neighbourhood(dist)
    zoom = embed(x[near], seed=seed, tsne=False) if near is not None else None
    rows = _member_rows(members, emb, near, zoom)
    paths = _barrier_paths(population, data, pairs, dist, points=points, device=device, progress=progress)
    space = {"kind": "layer" if layer else "whole", "layer": layer, "projected": project,
             "energy": energy if project else None, "dims": int(x.shape[1]), "parts": len(parts)}
    return {
        "format": REGIONS_FORMAT, "model": population.model, "dataset": population.dataset, "space": space,
        "members": rows, "groups": population.groups(),
        "pca_explained": emb["pca_explained"], "tsne_perplexity": emb.get("tsne_perplexity"),
        "pca_near": None if near is None else {"center": members[0].name, "radius": 0.5 * float(dist[0].max()),
                                               "members": len(near), "explained": zoom["pca_explained"]},
        "distances": {"names": [m.name for m in members], "matrix": dist.tolist(), **distance_summary(dist, groups)},
        "barriers": {"definition": BARRIER_DEFINITION, "split": "val", "points": points, "pairs": paths},
        "population": {"cache": str(population.path) if population.path else None, "recipe": population.recipe},
        "seconds": time.perf_counter() - started,
    }


def _member_rows(members: Sequence, emb: dict, near: list[int] | None, zoom: dict | None) -> list[dict]:
    """Each member's row with its map coordinates (PCA, t-SNE, and the zoomed PCA of the neighbourhood)."""
    rows = []
    for i, m in enumerate(members):
        row = {**m.row(), "pca": emb["pca"][i]}
        if "tsne" in emb:
            row["tsne"] = emb["tsne"][i]
        if near is not None and i in near:
            row["pca_near"] = zoom["pca"][near.index(i)]
        rows.append(row)
    return rows


def _barrier_paths(population: Population, data, pairs: str, dist: np.ndarray, *, points: int, device,
                   progress: bool) -> list[dict]:
    """Validation accuracy along the straight path of each chosen pair, and its barrier."""
    members = population.members
    groups = [m.group for m in members]
    chosen = representative_pairs(population) if pairs == "representative" else \
        [(i, j, "same group" if groups[i] == groups[j] else "across groups")
         for i, j in itertools.combinations(range(len(members)), 2)]
    bn_loader = None
    if has_batchnorm(population.template):
        keep = list(range(min(BN_SAMPLES, len(data.train))))
        bn_loader = DataLoader(Subset(data.train, keep), batch_size=128)

    def val_accuracy(model):
        return evaluate(model, data.val, device=device)

    paths = []
    for i, j, kind in tqdm(chosen, desc="interpolation paths", unit="pair", disable=not progress):
        acc = path_accuracy(population.template, members[i].state, members[j].state, val_accuracy, points=points,
                            bn_loader=bn_loader, device=device)
        paths.append({"a": members[i].name, "b": members[j].name, "groups": [groups[i], groups[j]], "kind": kind,
                      "distance": float(dist[i, j]), "accuracy": acc, "barrier": barrier_height(acc)})
    return paths


def barrier_table(doc: dict) -> list[dict]:
    """The paths as rows (barrier in percentage points), largest barrier first."""
    rows = [{"a": p["a"], "b": p["b"], "kind": p["kind"], "distance": p["distance"],
             "endpoints": (p["accuracy"][0], p["accuracy"][-1]), "midpoint": p["accuracy"][len(p["accuracy"]) // 2],
             "barrier_pp": 100 * p["barrier"]} for p in doc["barriers"]["pairs"]]
    return sorted(rows, key=lambda r: -r["barrier_pp"] if not math.isnan(r["barrier_pp"]) else 0)
