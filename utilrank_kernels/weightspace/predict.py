"""Accuracy predicted from weights: over a population of models, how well weight-space metrics rank and
predict test accuracy (WeightWatcher's claim, Martin and Mahoney 2021, tested on models whose accuracy is
known).

Per model, the means over its layers of the ``utilrank spectrum`` metrics (``alpha``, ``alpha_weighted``,
``stable_rank``, ``mp_softrank``, ``log_norm``: log10 of the squared Frobenius norm, ``log_spectral_norm``;
WeightWatcher's definitions unless ``options`` say otherwise) from the weights alone, and the MLU (mean
layer utilization at ``energy``) from one statistics pass over the training images: no test labels.

- **Rank agreement**: Spearman's rho of each metric with test accuracy (average ranks for ties, the
  two-sided p-value of the t approximation, as ``scipy.stats.spearmanr``), over all models and within each
  group of at least ``MIN_GROUP`` models.
- **Prediction**: ridge regression of accuracy on all the metrics (standardized), its penalty chosen by
  leave-one-out on the training folds, scored by leave-one-out over the models: each model's accuracy is
  predicted by a fit to all the others. The trivial predictor is the mean accuracy of the others. Reported:
  both mean absolute errors and RMSEs, and ``r2_loo = 1 - SSE(ridge) / SSE(trivial)`` (above 0: the
  metrics predict better than the mean).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._files import write_json
from ..analysis import build_report, collect_stats, compute_subspaces
from ..analysis.esd import ESDOptions
from ..analysis.spectrum import spectrum
from .population import Population

logger = logging.getLogger(__name__)

PREDICT_FORMAT = "utilrank.predict/1"
SPECTRAL_METRICS = ("alpha", "alpha_weighted", "stable_rank", "mp_softrank", "log_norm", "log_spectral_norm")
METRICS = (*SPECTRAL_METRICS, "mlu")
RIDGE_PENALTIES = tuple(10.0 ** k for k in range(-8, 4))  # on standardized metrics
MIN_GROUP = 5
MIN_MODELS = 4  # leave-one-out over fewer different models predicts nothing


# -- metrics of one model -------------------------------------------------------------------------------------


def model_metrics(model, data=None, *, energy: float = 0.99, options=None, batch_size: int = 256,
                  device: torch.device | str = "cpu") -> dict:
    """The model-level metrics (``METRICS``; ``mlu`` only when ``data`` is given)."""
    report, _ = spectrum(model, options=options, progress=False)
    out = {k: report["summary"][k] for k in SPECTRAL_METRICS}
    if data is not None:
        stats = collect_stats(model, DataLoader(data.train, batch_size=batch_size), device=device, progress=False)
        out["mlu"] = build_report(model, stats, compute_subspaces(model, stats, progress=False), energy).mlu
    return out


# -- statistics -----------------------------------------------------------------------------------------------


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    sorted_x = x[order]
    start = 0
    while start < x.size:
        end = start
        while end + 1 < x.size and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (t approximation with n - 2 degrees of freedom); NaN when a
    variable is constant or fewer than 3 pairs are given."""
    from scipy import stats  # a second to import: only for this test

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size != y.size:
        raise ValueError(f"spearman: {x.size} values against {y.size}")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if abs(rho) >= 1.0:
        return rho, 0.0
    t = rho * math.sqrt((x.size - 2) / (1 - rho * rho))
    return rho, float(2 * stats.t.sf(abs(t), x.size - 2))


def _ridge_fit(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Ridge on standardized columns (constant columns dropped): ``(coef, intercept, mean, scale)``."""
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, np.inf)  # a constant column contributes 0
    z = (x - mean) / scale
    coef = np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return coef, float(y.mean()), mean, scale


def _ridge_predict(fit, x: np.ndarray) -> np.ndarray:
    coef, intercept, mean, scale = fit
    return intercept + ((x - mean) / scale) @ coef


def standardize(x: np.ndarray) -> np.ndarray:
    """Columns centered and scaled to unit variance; a constant column becomes 0."""
    scale = x.std(0)
    return (x - x.mean(0)) / np.where(scale > 0, scale, np.inf)


def ridge_loo_residuals(z: np.ndarray, y: np.ndarray, penalty: float) -> np.ndarray:
    """Leave-one-out residuals of ridge with an unpenalized intercept on fixed (centered) columns ``z``,
    in closed form: the residuals of the fit to all rows over ``1 - h_ii``, ``h`` the hat matrix
    ``11^T / n + z (z^T z + penalty I)^-1 z^T``."""
    n = z.shape[0]
    h = z @ np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T) + 1.0 / n
    resid = y - y.mean() - (h - 1.0 / n) @ (y - y.mean())
    return resid / np.clip(1 - np.diag(h), 1e-12, None)


def _inner_loo_penalty(x: np.ndarray, y: np.ndarray, penalties: Sequence[float]) -> float:
    """The penalty whose leave-one-out squared error on ``(x, y)`` is smallest (the columns standardized
    once, on all of ``x``: this only picks the penalty)."""
    z = standardize(x)
    errors = [float(np.mean(ridge_loo_residuals(z, y, p) ** 2)) for p in penalties]
    return penalties[int(np.argmin(errors))]


def loo_regression(x: np.ndarray, y: np.ndarray, penalties: Sequence[float] = RIDGE_PENALTIES) -> dict:
    """Leave-one-out over the rows: each ``y[i]`` predicted by a ridge fit (penalty by inner leave-one-out)
    to the other rows, and by their mean; the errors of both."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    if n < MIN_MODELS:
        raise ValueError(f"leave-one-out regression needs at least {MIN_MODELS} models, got {n}")
    pred, trivial, chosen = np.empty(n), np.empty(n), []
    for i in range(n):
        keep = np.arange(n) != i
        penalty = _inner_loo_penalty(x[keep], y[keep], penalties)
        chosen.append(penalty)
        pred[i] = _ridge_predict(_ridge_fit(x[keep], y[keep], penalty), x[i : i + 1])[0]
        trivial[i] = y[keep].mean()
    sse, sse_trivial = float(np.sum((pred - y) ** 2)), float(np.sum((trivial - y) ** 2))
    full = _ridge_fit(x, y, _inner_loo_penalty(x, y, penalties))
    return {
        "loo_mae": float(np.mean(np.abs(pred - y))), "loo_rmse": math.sqrt(sse / n),
        "trivial_loo_mae": float(np.mean(np.abs(trivial - y))), "trivial_loo_rmse": math.sqrt(sse_trivial / n),
        "r2_loo": 1 - sse / sse_trivial if sse_trivial > 0 else math.nan,
        "predictions": pred.tolist(), "penalties": chosen,
        "coefficients": full[0].tolist(),  # on standardized metrics, fitted to all models
    }


# -- the experiment -------------------------------------------------------------------------------------------


def member_metrics(population: Population, data, *, energy: float = 0.99, options=None,
                   device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """``model_metrics`` of every member, cached beside a cached population (keyed by the definitions and
    ``energy``), so a second run reads them."""
    options = options or ESDOptions()
    cache = None
    if population.path is not None:
        key = json.dumps({"options": options.to_dict(), "energy": energy, "metrics": METRICS, "v": 1}, sort_keys=True)
        cache = population.path / f"metrics-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    out = []
    todo = [m for m in population.members if m.name not in known]
    bar = tqdm(population.members, desc="weight metrics", unit="model", disable=not progress or not todo)
    for member in bar:
        if member.name not in known:
            known[member.name] = model_metrics(population.load(member), data, energy=energy, options=options,
                                               device=device)
            if cache is not None:
                write_json(cache, known)
        out.append(known[member.name])
    return out


def predict_experiment(
    population: Population,
    data,
    *,
    target: str = "test",
    energy: float = 0.99,
    options=None,
    metrics: Sequence[str] = METRICS,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """The ``predict.json`` document (see the module docstring); ``target`` is ``"test"`` or ``"val"``."""
    if target not in ("test", "val"):
        raise ValueError(f"target = {target!r}: choose test or val")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; metrics are {', '.join(METRICS)}")
    started = time.perf_counter()
    options = options or ESDOptions()
    values = member_metrics(population, data, energy=energy, options=options, device=device, progress=progress)
    acc = np.array([getattr(m, target) for m in population.members], dtype=np.float64)
    table = np.array([[v[k] for k in metrics] for v in values], dtype=np.float64)
    groups = [m.group for m in population.members]
    correlations = {}
    for j, name in enumerate(metrics):
        rho, p = spearman(table[:, j], acc)
        by_group = {}
        for g in dict.fromkeys(groups):
            ii = [i for i, h in enumerate(groups) if h == g]
            if len(ii) >= MIN_GROUP:
                rg, pg = spearman(table[ii, j], acc[ii])
                by_group[g] = {"rho": rg, "p": pg, "n": len(ii)}
        correlations[name] = {"rho": rho, "p": p, "by_group": by_group}
    regression = {"features": list(metrics), **loo_regression(table, acc)}
    rows = [{**m.row(), "metrics": dict(zip(metrics, map(float, table[i]), strict=True)),
             "predicted": regression["predictions"][i]} for i, m in enumerate(population.members)]
    return {
        "format": PREDICT_FORMAT, "model": population.model, "dataset": population.dataset, "target": target,
        "energy": energy, "definitions": options.to_dict(), "members": rows, "metrics": list(metrics),
        "spearman": correlations, "regression": regression,
        "population": {"cache": str(population.path) if population.path else None, "recipe": population.recipe},
        "seconds": time.perf_counter() - started,
    }
