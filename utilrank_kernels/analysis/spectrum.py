"""Weights as data (DESIGN §1, second source): the empirical spectral density (ESD) of every layer and
its heavy-tail metrics, as WeightWatcher (Martin and Mahoney) defines them, for ``W`` and for the
data-projected ``W' = P_out W P_in``.

Per layer, with ``W`` of shape ``(out, in)``, ``N = max(out, in)``, ``M = min(out, in)``, ``Q = N / M``:

- **ESD**: the ``M`` eigenvalues of ``W^T W`` (or ``W W^T``), i.e. the squared singular values of
  ``W``; exact zeros (below the fp32 rank tolerance) are dropped and counted. A ``Conv2d`` is pooled as
  WeightWatcher pools it: each of its ``kh * kw`` slices ``W[:, :, i, j]`` (``out x C``) gives ``M``
  eigenvalues, and the ESD is all of them together.
- **alpha**: the power-law exponent of the ESD's tail, ``p(x) ~ x^-alpha`` for ``x >= xmin``, by the
  continuous maximum-likelihood estimate of Clauset, Shalizi and Newman,
  ``alpha = 1 + n / sum(log(x_i / xmin))``, with ``xmin`` the candidate (an eigenvalue) whose fit has
  the smallest Kolmogorov-Smirnov distance ``ks_distance`` to the tail.
- ``alpha_weighted = alpha * log10(lambda_max)``, ``log_spectral_norm = log10(lambda_max)``,
  ``log_norm = log10(sum(lambda))`` (the squared Frobenius norm), ``stable_rank = sum(lambda) / lambda_max``.
- **Marchenko-Pastur**: the ESD is rescaled (by its median), then the MP law of a random ``N x M`` matrix
  with entry scale ``sigma`` is fitted to a kernel density estimate of it (WeightWatcher's
  ``fit_density_with_range``: brute force over ``sigma``; the quarter-circle law of the singular
  values when ``Q == 1``). The bulk edge is ``lambda_plus = sigma^2 (1 + 1/sqrt(Q))^2``;
  ``mp_softrank = lambda_plus / lambda_max`` (near 1 for a random matrix, small when a few large
  spikes carry the layer); ``num_spikes`` counts the eigenvalues above the bulk edge plus the
  Tracy-Widom margin WeightWatcher adds, so that a random matrix's finite-size overshoot is no spike.

**Data-projected spectra.** Given statistics, ``W' = U_out U_out^T W U_in U_in^T`` at ``energy``;
its non-zero singular values are exactly those of the small ``M' = U_out^T W U_in`` (``k_out x k_in``),
so that matrix is the one analyzed (its MP null model is a random ``k_out x k_in`` matrix: the layer
restricted to the subspaces its data uses). For a conv, ``P_in`` acts on whole im2col patches, so
``W'`` has no per-position slices to pool: its ESD is that of the flattened projection.

Layers too small for a fit (a matrix, or each conv slice, with fewer than ``MIN_EVALS`` singular
values: WeightWatcher's ``min_evals``) are listed under ``skipped`` with the reason. Eigenvalues are
computed in fp64 (or fp32 if asked) on the weights' device, never in half precision; the fits run in
numpy on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._cache import write_json
from .stats import Statistics

SPECTRUM_FORMAT = "utilrank.spectrum/1"
MIN_EVALS = 10  # WeightWatcher's default min_evals: below this a tail fit is noise
MIN_TAIL = 5  # a candidate xmin must leave at least this many eigenvalues in the tail
MAX_CANDIDATES = 200  # xmin candidates tried before refining around the best one
SIGMA_GRID = np.arange(0.2, 3.0, 0.005)  # MP scales searched, in units of the ESD rescaled by its median
WELL_TRAINED = (2.0, 6.0)  # WeightWatcher's range of alpha for a well-trained layer
FilterFn = Callable[[nn.Module, str], bool]


# -- power law ----------------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """``p(x) = (alpha - 1) / xmin * (x / xmin)^-alpha`` for ``x >= xmin``; ``n_tail`` of ``n`` points."""

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int
    n: int

    def density(self, x: np.ndarray) -> np.ndarray:
        """The fitted density as a share of the whole ESD (the tail's fraction times its pdf)."""
        return (self.n_tail / self.n) * (self.alpha - 1.0) / self.xmin * (x / self.xmin) ** (-self.alpha)


def _fit_at(x: np.ndarray, cum_log: np.ndarray, i: int) -> tuple[float, float]:
    """alpha and KS distance of the fit whose xmin is ``x[i]`` (``x`` ascending)."""
    n = x.size - i
    log_sum = cum_log[i] - n * math.log(x[i])  # sum over the tail of log(x / xmin)
    if log_sum <= 0.0:
        return math.inf, math.inf
    alpha = 1.0 + n / log_sum
    cdf = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha)
    j = np.arange(n)
    ks = max(float(np.max((j + 1) / n - cdf)), float(np.max(cdf - j / n)))
    return alpha, ks


def fit_power_law(
    evals: np.ndarray, *, max_candidates: int = MAX_CANDIDATES, min_tail: int = MIN_TAIL
) -> PowerLawFit:
    """Clauset-Shalizi-Newman fit: for each candidate ``xmin``, the continuous MLE of alpha; the fit with
    the smallest KS distance wins. With more than ``max_candidates`` candidates, an evenly spaced subset
    (in rank) is tried, then every candidate between the best one's neighbours."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > 0]
    if x.size < min_tail + 1:
        raise ValueError(f"a power-law fit needs at least {min_tail + 1} positive values, got {x.size}")
    cum_log = np.cumsum(np.log(x)[::-1])[::-1]  # cum_log[i] = sum(log(x[i:]))
    last = x.size - min_tail  # candidates leave at least min_tail points in the tail
    first = np.unique(x[: last + 1], return_index=True)[1]  # one candidate per distinct value
    grid = first
    if first.size > max_candidates:
        grid = first[np.linspace(0, first.size - 1, max_candidates).round().astype(int)]
    results = {int(i): _fit_at(x, cum_log, int(i)) for i in grid}
    best = min(results, key=lambda i: results[i][1])
    if first.size > max_candidates:  # refine between the neighbouring grid points of the best one
        k = int(np.searchsorted(grid, best))
        lo, hi = grid[max(0, k - 1)], grid[min(grid.size - 1, k + 1)]
        for i in first[(first >= lo) & (first <= hi)]:
            results.setdefault(int(i), _fit_at(x, cum_log, int(i)))
        best = min(results, key=lambda i: results[i][1])
    alpha, ks = results[best]
    return PowerLawFit(float(alpha), float(x[best]), float(ks), int(x.size - best), int(x.size))


# -- Marchenko-Pastur ---------------------------------------------------------------------------------


@dataclass
class MPFit:
    """MP fit of an ESD; ``sigma`` is in units of the ESD rescaled to mean 1, the edges in the ESD's own."""

    sigma: float
    bulk_min: float
    bulk_max: float
    num_spikes: int
    softrank: float


def _linear_kde(samples: np.ndarray, grid: np.ndarray, bw: float) -> np.ndarray:
    """Density at ``grid`` of a linear (triangular) kernel of half-width ``bw`` (scikit-learn's
    ``KernelDensity(kernel="linear")``, which WeightWatcher uses), in chunks to bound memory."""
    out = np.zeros_like(grid)
    for start in range(0, samples.size, 2048):
        s = samples[start : start + 2048]
        out += np.clip(1.0 - np.abs(grid[:, None] - s[None, :]) / bw, 0.0, None).sum(1)
    return out / (samples.size * bw)


def _mp_density(x: np.ndarray, q: float, sigma: float) -> tuple[np.ndarray, float, float]:
    a, b = (sigma * (1 - 1 / math.sqrt(q))) ** 2, (sigma * (1 + 1 / math.sqrt(q))) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.sqrt(np.clip((b - x) * (x - a), 0.0, None)) / (2 * math.pi * sigma**2 * x / q)
    return np.nan_to_num(y, nan=0.0, posinf=0.0), a, b


def _quarter_circle(s: np.ndarray, sigma: float) -> np.ndarray:
    """Density of the singular values of a square random matrix scaled to entry variance ``sigma^2 / N``.
    (WeightWatcher's version keeps the support at [0, 2] whatever sigma; this one scales it.)"""
    return np.sqrt(np.clip(4 * sigma**2 - s**2, 0.0, None)) / (math.pi * sigma**2)


def fit_marchenko_pastur(evals: np.ndarray, q: float, m: int, *, bw: float = 0.1) -> MPFit:
    """WeightWatcher's ``mp_fit``: brute-force ``sigma`` minimizing the squared residual between the MP
    density and a linear-kernel KDE (bandwidth 0.1) of the rescaled ESD; fits whose support misses the
    KDE's mode are rejected. Three changes make it robust to strong spikes: the ESD is rescaled by its
    median, not its mean (the Frobenius norm); ``sigma`` is searched on a fixed grid around the bulk,
    not on one tied to ``lambda_max``; the KDE is evaluated over the bulk's possible range, not out to
    ``lambda_max``. With WeightWatcher's choices, a rank-3 signal three times the noise in a 400 x 200
    Gaussian matrix squashes the bulk under the bandwidth, puts the whole sigma grid above it and steps
    the KDE grid over it: ``mp_softrank`` 1.0 and no spikes; here, 0.001, 3 spikes and the bulk edge
    within 0.5% of the true one."""
    evals = np.asarray(evals, dtype=np.float64)
    scale = 1.0 / float(np.median(evals))  # robust to spikes, unlike the mean (see the docstring)
    x = evals * scale
    lam_max = float(x.max())
    square = q == 1.0
    samples = np.sqrt(x) if square else x
    # the grid covers the bulk any sigma of the search can give (edge <= 36, or 6 for singular values),
    # not the spikes: a grid out to a huge lambda_max would step over the kernel's bandwidth
    top = SIGMA_GRID[-1] * (2.0 if square else 1 + 1 / math.sqrt(q))
    grid = np.linspace(0.0, min(float(samples.max()), top if square else top**2) + 0.5, 1000)
    kde = _linear_kde(samples, grid, bw)
    keep = kde > 0.01  # WeightWatcher's threshold: the empty stretches carry no residual
    grid, kde = grid[keep], kde[keep]
    mode = grid[np.argmax(kde)]
    # the MP median lies between 0.65 sigma^2 (Q = 1) and sigma^2 (Q large): sigma is near 1 here
    best, best_resid = math.nan, math.inf
    for sigma in SIGMA_GRID:
        if square:
            if 2 * sigma > grid.max():
                continue
            resid = float(np.sum((_quarter_circle(grid, sigma) - kde) ** 2))
        else:
            y, a, b = _mp_density(grid, q, sigma)
            if b < mode or b > grid.max() or a > mode:
                continue
            resid = float(np.sum((y - kde) ** 2))
        if resid < best_resid:
            best, best_resid = float(sigma), resid
    if math.isnan(best):  # no admissible fit (a degenerate ESD): the bulk edge at lambda_max
        best = math.sqrt(lam_max) / (1 + 1 / math.sqrt(q))
    bulk_max = (best * (1 + 1 / math.sqrt(q))) ** 2
    bulk_min = (best * (1 - 1 / math.sqrt(q))) ** 2
    tracy_widom = (1 / math.sqrt(q)) * bulk_max ** (2 / 3) * m ** (-2 / 3)
    spikes = int(np.sum(x > bulk_max + math.sqrt(tracy_widom)))
    return MPFit(best, float(bulk_min / scale), float(bulk_max / scale), spikes, bulk_max / lam_max)


# -- one matrix ---------------------------------------------------------------------------------------


@dataclass
class ESD:
    """The eigenvalues of one layer's ``W^T W`` (pooled over conv slices) and their fits."""

    evals: np.ndarray  # ascending, non-zero
    n: int
    m: int
    slices: int
    num_zero: int
    power_law: PowerLawFit | None = None
    mp: MPFit | None = None
    metrics: dict = field(default_factory=dict)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"spectra are computed in float32 or float64, not {dtype} (half precision would "
                         "lose the small eigenvalues the fits need)")


def eigenvalues(
    weight: torch.Tensor, *, dtype: torch.dtype = torch.float64
) -> tuple[np.ndarray, int, int, int, int]:
    """``(evals, N, M, slices, num_zero)``: the squared singular values of a 2-D weight, or of each
    ``kh x kw`` slice of a 4-D conv weight pooled together, without the numerical zeros."""
    _check_dtype(dtype)
    w = weight.detach().to(dtype)
    if w.dim() == 4:
        mats = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])  # [kh*kw, out, C]
    elif w.dim() == 2:
        mats = w[None]
    else:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(w.shape)}")
    sv = torch.linalg.svdvals(mats)  # [slices, M], batched on the weight's device
    n, m = max(mats.shape[1:]), min(mats.shape[1:])
    # a singular value below the fp32 rank tolerance is a zero of W, not part of its spectrum
    tol = sv.max().clamp_min(torch.finfo(dtype).tiny) * n * torch.finfo(torch.float32).eps
    sv = sv.flatten()
    nonzero = sv[sv > tol]
    evals = np.sort((nonzero.to(torch.float64) ** 2).cpu().numpy())
    return evals, n, m, mats.shape[0], int(sv.numel() - nonzero.numel())


def esd_metrics(
    evals: np.ndarray, n: int, m: int, *, max_candidates: int = MAX_CANDIDATES
) -> tuple[dict, PowerLawFit, MPFit]:
    """WeightWatcher's per-layer metrics of an ESD (see the module docstring)."""
    if evals.size < MIN_EVALS:
        raise ValueError(f"{evals.size} non-zero eigenvalues, fewer than {MIN_EVALS}")
    pl = fit_power_law(evals, max_candidates=max_candidates)
    mp = fit_marchenko_pastur(evals, n / m, m)
    lam_max, total = float(evals.max()), float(evals.sum())
    metrics = {
        "alpha": pl.alpha, "xmin": pl.xmin, "ks_distance": pl.ks_distance, "num_pl": pl.n_tail,
        "alpha_weighted": pl.alpha * math.log10(lam_max), "log_spectral_norm": math.log10(lam_max),
        "log_norm": math.log10(total), "stable_rank": total / lam_max, "mp_softrank": mp.softrank,
        "num_spikes": mp.num_spikes, "sigma_mp": mp.sigma, "bulk_max": float(mp.bulk_max),
        "lambda_max": lam_max, "num_evals": int(evals.size),
    }
    return metrics, pl, mp


def matrix_esd(
    weight: torch.Tensor, *, dtype: torch.dtype = torch.float64, max_candidates: int = MAX_CANDIDATES
) -> ESD:
    """The ESD and metrics of one weight (2-D, or 4-D pooled over slices)."""
    evals, n, m, slices, zeros = eigenvalues(weight, dtype=dtype)
    what = (f"each {weight.shape[0]}x{weight.shape[1]} kernel slice" if weight.dim() == 4
            else f"the {weight.shape[0]}x{weight.shape[1]} matrix")
    if m < MIN_EVALS:  # pooling slices does not make a 64x1 slice a matrix with a spectrum
        raise ValueError(f"{what} has {m} singular value{'s' * (m != 1)} (fewer than {MIN_EVALS})")
    if evals.size < MIN_EVALS:
        raise ValueError(f"{what} has {evals.size} non-zero eigenvalues (fewer than {MIN_EVALS})")
    esd = ESD(evals, n, m, slices, zeros)
    esd.metrics, esd.power_law, esd.mp = esd_metrics(evals, n, m, max_candidates=max_candidates)
    esd.metrics.update({"N": n, "M": m, "Q": n / m, "slices": slices, "num_zero": zeros})
    return esd


# -- a model ------------------------------------------------------------------------------------------


def spectral_layers(
    model: nn.Module, filter_fn: FilterFn | None = None
) -> tuple[dict[str, nn.Module], list[dict]]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` (and factored ``LowRankLinear`` / ``LowRankConv2d``, whose
    ``weight`` is ``B @ A``) by full module name, and the ones left out with the reason."""
    from ..nn import LowRankConv2d, LowRankLinear

    layers, skipped = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d, LowRankLinear, LowRankConv2d)):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            skipped.append({"name": name, "reason": "excluded by filter"})
        elif getattr(module, "groups", 1) != 1:
            skipped.append({"name": name, "reason": f"grouped conv (groups={module.groups}): its slices are "
                                                    "block-diagonal, not one matrix"})
        else:
            layers[name] = module
    return layers, skipped


def _kind(module: nn.Module) -> str:
    return "conv2d" if module.weight.dim() == 4 else "linear"


def spectrum(
    model: nn.Module,
    stats: Statistics | None = None,
    energy: float = 0.99,
    *,
    filter_fn: FilterFn | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    max_candidates: int = MAX_CANDIDATES,
    progress: bool = True,
    model_name: str | None = None,
) -> tuple[dict, dict[str, dict[str, ESD]]]:
    """The ``spectrum.json`` report (DESIGN §4) and, per layer, ``{"weight": ESD, "projected": ESD}``.

    With ``stats``, each layer that has statistics also gets the metrics of its data-projected weight
    at ``energy`` (under ``"projected"``, with ``k_in``, ``k_out``, ``rank``, or the reason it has none).
    ``device`` moves each weight there for its SVD (default: where it is); ``dtype`` is the eigensolver's
    precision; ``model_name`` is the report's ``model`` (default: the statistics' or the class name)."""
    _check_dtype(dtype)
    from .report import analyze

    modules, skipped = spectral_layers(model, filter_fn)
    subspaces, ranks, no_projection = {}, {}, {}
    if stats is not None:
        stats_report, subspaces = analyze(model, stats, energy)
        ranks = {r["name"]: (r["k_in"], r["k_out"]) for r in stats_report["layers"]}
        no_projection = {s["name"]: s["reason"] for s in stats_report["skipped"]}
    rows, esds = [], {}
    for name, module in tqdm(modules.items(), desc="spectra", unit="layer", disable=not progress):
        weight = module.weight if device is None else module.weight.to(device)
        try:
            esd = matrix_esd(weight, dtype=dtype, max_candidates=max_candidates)
        except ValueError as exc:
            skipped.append({"name": name, "reason": f"too small for a fit: {exc}"})
            continue
        row = {"name": name, "kind": _kind(module), "shape": list(weight.shape), **esd.metrics}
        esds[name] = {"weight": esd}
        if stats is not None:
            row["projected"] = _projected(name, subspaces, ranks, no_projection, dtype, max_candidates, esds)
        rows.append(row)
    model_name = model_name or (stats.meta.get("model") if stats else None) or type(model).__name__
    report = {"format": SPECTRUM_FORMAT, "model": model_name,
              "projected": stats is not None, "energy": energy if stats is not None else None,
              "layers": rows, "skipped": skipped, "summary": summarize(rows)}
    return report, esds


def _projected(name, subspaces, ranks, no_projection, dtype, max_candidates, esds) -> dict:
    if name not in subspaces:
        return {"reason": no_projection.get(name, "no statistics for this layer")}
    sub = subspaces[name]
    k_in, k_out = ranks[name]
    small = sub.vec_out[:, :k_out].T @ sub.weight @ sub.vec_in[:, :k_in]  # [k_out, k_in]: W' restricted
    entry = {"k_in": k_in, "k_out": k_out, "rank": min(k_in, k_out)}
    try:
        esd = matrix_esd(small, dtype=dtype, max_candidates=max_candidates)
    except ValueError as exc:
        return {**entry, "reason": f"too small for a fit: {exc}"}
    esds[name]["projected"] = esd
    return {**entry, **esd.metrics}


def summarize(rows: list[dict]) -> dict:
    """Means over the fitted layers (WeightWatcher's model-level summary), weights and projections."""
    def mean(key, sub=None):
        vals = [(r.get(sub) or {}).get(key) if sub else r.get(key) for r in rows]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    keys = ("alpha", "alpha_weighted", "log_spectral_norm", "stable_rank", "mp_softrank", "num_spikes")
    out = {k: mean(k) for k in keys}
    out["layers"] = len(rows)
    out["under_trained"] = [r["name"] for r in rows if r["alpha"] > WELL_TRAINED[1]]
    out["over_trained"] = [r["name"] for r in rows if r["alpha"] < WELL_TRAINED[0]]
    if any("alpha" in (r.get("projected") or {}) for r in rows):
        out["projected"] = {k: mean(k, "projected") for k in keys}
    return out


def format_spectrum_table(report: dict) -> str:
    proj = report["projected"]
    head = (f"{'layer':<24} {'shape':>14} {'evals':>5} {'alpha':>6} {'KS D':>5} {'a_w':>6} {'logsn':>6} "
            f"{'stab r':>6} {'mp sr':>5} {'spk':>3}")
    if proj:
        head += f" | {'rank':>4} {'alpha':>6} {'mp sr':>5} {'spk':>3}"
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        shape = "x".join(str(s) for s in r["shape"])
        line = (f"{r['name'][-24:]:<24} {shape:>14} {r['num_evals']:>5} {r['alpha']:>6.2f} "
                f"{r['ks_distance']:>5.3f} "
                f"{r['alpha_weighted']:>6.2f} {r['log_spectral_norm']:>6.2f} {r['stable_rank']:>6.1f} "
                f"{r['mp_softrank']:>5.2f} {r['num_spikes']:>3}")
        if proj:
            p = r["projected"]
            if "alpha" in p:
                line += f" | {p['rank']:>4} {p['alpha']:>6.2f} {p['mp_softrank']:>5.2f} {p['num_spikes']:>3}"
            else:
                line += f" | {p.get('rank', '-'):>4} {p['reason']}"
        lines.append(line)
    for s in report["skipped"]:
        lines.append(f"{s['name'][-24:]:<24} skipped: {s['reason']}")
    s = report["summary"]
    if s["layers"]:
        lines.append(f"mean over {s['layers']} layers: alpha {s['alpha']:.2f}, "
                     f"alpha_weighted {s['alpha_weighted']:.2f}, "
                     f"log spectral norm {s['log_spectral_norm']:.2f}, stable rank {s['stable_rank']:.1f}, "
                     f"MP soft rank {s['mp_softrank']:.2f}")
        if "projected" in s:
            p = s["projected"]
            lines.append(f"data-projected at energy {report['energy']}: alpha {p['alpha']:.2f}, "
                         f"alpha_weighted {p['alpha_weighted']:.2f}, MP soft rank {p['mp_softrank']:.2f}")
        lo, hi = WELL_TRAINED
        lines.append(f"alpha outside [{lo:g}, {hi:g}]: {len(s['over_trained'])} below (over-fit or heavily "
                     f"correlated), {len(s['under_trained'])} above (under-trained)")
    return "\n".join(lines)


def write_spectrum(report: dict, esds: dict[str, dict[str, ESD]], out_dir: str | Path) -> None:
    """``out_dir/spectrum.json``, ``out_dir/alpha.png`` and ``out_dir/esd/<layer>.png``."""
    out_dir = Path(out_dir)
    from ..plots import plot_alpha, plot_esds

    write_json(out_dir / "spectrum.json", report)
    plot_alpha(report, out_dir / "alpha.png")
    plot_esds(report, esds, out_dir / "esd")
