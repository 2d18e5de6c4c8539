"""Weights as data (DESIGN §1, second source): every layer's empirical spectral density and heavy-tail metrics
(definitions in ``analysis.esd``: WeightWatcher's by default), for ``W`` and for the data-projected
``W' = P_out W P_in``, gathered into the ``spectrum.json`` report.

**Which layers.** Every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` (the layer kinds WeightWatcher
analyzes in PyTorch, Conv1d aside), and the factored ``LowRankLinear`` / ``LowRankConv2d`` (whose ``weight``
is ``B @ A``), by full module name. A matrix is fitted when ``esd.check_size`` allows it: by default
WeightWatcher's pooled count, ``M * slices >= min_evals`` (8), so a ViT's patch embedding (``64 x 1`` slices,
16 of them) and resnet18's ``conv1`` (``64 x 3``, 49) are analyzed. A grouped conv is analyzed as stored
(its ``out x in/groups`` slices, as WeightWatcher does) unless ``grouped_convs=False``. Every other layer of
those kinds is listed under ``skipped`` with the reason.

**Data-projected spectra.** Given statistics, ``W' = U_out U_out^T W U_in U_in^T`` at ``energy``; its
non-zero singular values are exactly those of the small ``M' = U_out^T W U_in`` (``k_out x k_in``), so
that matrix is the one analyzed (its MP null model is a random ``k_out x k_in`` matrix: the layer restricted
to the subspaces its data uses). For a conv, ``P_in`` acts on whole im2col patches, so ``W'`` has no
per-position slices to pool: its ESD is that of the flattened projection (no ``conv_norm``).

Eigenvalues are computed in fp64 (or fp32 if asked) on the weights' device, never in half precision; the
fits run in numpy on the host.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import FilterFn
from ..nn import LowRankConv2d, LowRankLinear
from .esd import ESD, WELL_TRAINED, ESDOptions, check_dtype, matrix_esd
from .stats import Statistics
from .subspace import compute_subspaces

logger = logging.getLogger(__name__)

SPECTRUM_FORMAT = "utilrank.spectrum/1"
SUMMARY_KEYS = ("alpha", "alpha_weighted", "log_spectral_norm", "log_norm", "stable_rank", "mp_softrank",
                "num_spikes")


def spectral_layers(
    model: nn.Module, filter_fn: FilterFn | None = None, options: ESDOptions | None = None
) -> tuple[dict[str, nn.Module], list[dict]]:
    """The layers whose weights have a spectrum, by full module name, and the ones left out with the reason."""
    options = options or ESDOptions()

    layers, skipped = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding, LowRankLinear, LowRankConv2d)):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            skipped.append({"name": name, "reason": "excluded by filter"})
        elif getattr(module, "groups", 1) != 1 and not options.grouped_convs:
            skipped.append({"name": name, "reason": f"grouped conv (groups={module.groups}): its slices are "
                                                    "block-diagonal, not one matrix (grouped_convs=False)"})
        else:
            layers[name] = module
    return layers, skipped


def check_finite(modules: dict[str, nn.Module], stats: Statistics | None = None) -> None:
    """``ValueError`` naming the first layer whose weight, or whose statistics, hold NaN or Inf: a spectrum of
    them is a failed SVD or a meaningless fit, never a result."""
    for name, module in modules.items():
        if not bool(torch.isfinite(module.weight).all()):
            raise ValueError(f"layer {name}: its weight holds NaN or Inf")
    check_finite_statistics(stats)


def check_finite_statistics(stats: Statistics | None, source: str = "the statistics") -> None:
    """``ValueError`` naming ``source`` and the first layer whose input covariance holds NaN or Inf."""
    for name, s in (stats.layers.items() if stats is not None else ()):
        if not bool(torch.isfinite(s.cov).all()):
            raise ValueError(f"{source}: layer {name}: its input covariance holds NaN or Inf")


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "conv2d" if module.weight.dim() == 4 else "linear"


def spectrum(
    model: nn.Module,
    stats: Statistics | None = None,
    energy: float = 0.99,
    *,
    options: ESDOptions | None = None,
    filter_fn: FilterFn | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    model_name: str | None = None,
) -> tuple[dict, dict[str, dict[str, ESD]]]:
    """The ``spectrum.json`` report (DESIGN §4) and, per layer, ``{"weight": ESD, "projected": ESD}``.

    ``options`` are the metrics' definitions (default: WeightWatcher's). With ``stats``, each layer that has
    statistics also gets the metrics of its data-projected weight at ``energy`` (under ``"projected"``, with
    ``k_in``, ``k_out``, ``rank``, or the reason it has none). ``device`` moves each weight there for its SVD
    (default: where it is); ``dtype`` is the eigensolver's precision; ``model_name`` is the report's
    ``model`` (default: the statistics' or the class name)."""
    check_dtype(dtype)
    options = options or ESDOptions()
    modules, skipped = spectral_layers(model, filter_fn, options)
    check_finite(modules, stats)
    projections = _restricted_weights(model, stats, energy) if stats is not None else {}
    rows, esds = [], {}
    for name, module in tqdm(modules.items(), desc="spectra", unit="layer", disable=not progress):
        weight = module.weight if device is None else module.weight.to(device)
        try:
            esd = matrix_esd(weight, options, dtype=dtype)
        except ValueError as exc:
            skipped.append({"name": name, "reason": f"not fitted: {exc}"})
            continue
        row = {"name": name, "kind": _kind(module), "shape": list(weight.shape), **esd.metrics}
        esds[name] = {"weight": esd}
        if stats is not None:
            row["projected"] = _projected(name, projections, options, dtype, esds)
        rows.append(row)
    model_name = model_name or (stats.meta.get("model") if stats else None) or type(model).__name__
    report = {"format": SPECTRUM_FORMAT, "model": model_name, "definitions": options.to_dict(),
              "projected": stats is not None, "energy": energy if stats is not None else None,
              "layers": rows, "skipped": skipped, "summary": summarize(rows)}
    return report, esds


def _restricted_weights(model: nn.Module, stats: Statistics, energy: float) -> dict[str, torch.Tensor | str]:
    """Per layer with statistics, ``M' = U_out^T W U_in`` at ``energy`` (``[k_out, k_in]``), or the reason there
    is none: the subspaces and their energy ranks, no report (whose weight ranks cost an SVD per layer)."""
    subspaces = compute_subspaces(model, stats, progress=False)
    out: dict[str, torch.Tensor | str] = {s["name"]: s["reason"] for s in stats.skipped}
    out.update(subspaces.skipped)
    for name, sub in subspaces.items():
        k_in, k_out = sub.ranks(energy)
        if k_in == 0 or k_out == 0:
            out[name] = "its inputs or outputs are all zero on the data"
        else:
            out[name] = sub.restricted(k_in, k_out)
    return out


def _projected(name: str, projections: dict, options: ESDOptions, dtype: torch.dtype, esds: dict) -> dict:
    small = projections.get(name, "no statistics for this layer")
    if isinstance(small, str):
        return {"reason": small}
    k_out, k_in = small.shape
    entry = {"k_in": k_in, "k_out": k_out, "rank": min(k_in, k_out)}
    try:
        esd = matrix_esd(small, options, dtype=dtype)
    except ValueError as exc:
        return {**entry, "reason": f"not fitted: {exc}"}
    esds[name]["projected"] = esd
    return {**entry, **esd.metrics}


def summarize(rows: list[dict]) -> dict:
    """Means over the fitted layers (WeightWatcher's model-level summary), weights and projections."""

    def mean(key, sub=None):
        vals = [(r.get(sub) or {}).get(key) if sub else r.get(key) for r in rows]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out = {k: mean(k) for k in SUMMARY_KEYS}
    out["layers"] = len(rows)
    out["under_trained"] = [r["name"] for r in rows if r["alpha"] > WELL_TRAINED[1]]
    out["over_trained"] = [r["name"] for r in rows if r["alpha"] < WELL_TRAINED[0]]
    if any("alpha" in (r.get("projected") or {}) for r in rows):
        out["projected"] = {k: mean(k, "projected") for k in SUMMARY_KEYS}
    return out
