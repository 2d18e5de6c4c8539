"""The empirical spectral density (ESD) of one weight matrix and its heavy-tail metrics (Martin and Mahoney),
by WeightWatcher's definitions (version 0.7.7, ``analyze(mp_fit=True)``, read from its source) unless an
``ESDOptions`` field asks for this project's own.

With ``W`` of shape ``(out, in)``, ``N = max(out, in)``, ``M = min(out, in)``, ``Q = N / M``:

- **Eigenvalues**: the ``M`` squared singular values of ``W``, numerical zeros included (WeightWatcher keeps
  them; ``num_zero`` counts those below the fp32 rank tolerance). A ``Conv2d`` is pooled: each of its
  ``kh * kw`` slices ``W[:, :, i, j]`` gives ``M`` eigenvalues, and the ESD is all of them together; with
  ``conv_norm`` (WeightWatcher's ``conv2d_norm``, on by default there) the slices are scaled by
  ``1/sqrt(2)`` first, which halves every eigenvalue (``log_spectral_norm`` drops by ``log10 2 = 0.301``;
  alpha does not change).
- **alpha**: the power-law exponent of the ESD's tail, ``p(x) ~ x^-alpha`` for ``x >= xmin``, by the
  continuous maximum-likelihood estimate of Clauset, Shalizi and Newman, ``alpha = 1 + n / sum(log(x_i /
  xmin))`` over the ``n`` tail values, fitted to the eigenvalues above ``fit_floor`` (WeightWatcher's
  ``EVALS_THRESH = 1e-5``, an absolute threshold). ``xmin`` is searched exhaustively: every fitted
  eigenvalue but the largest is a candidate, and the one whose fit has the smallest Kolmogorov-Smirnov
  distance ``ks_distance`` wins (the first of equals). WeightWatcher's KS distance compares each tail point
  with the empirical CDF just below it, ``D = max_j |F(x_j) - j/n|`` (``ks="ww"``; the ``powerlaw``
  package's ``arange(n)/n`` too); the standard two-sided statistic also takes ``(j+1)/n - F(x_j)``
  (``ks="two-sided"``), which is never smaller. ``alpha_sigma = (alpha - 1) / sqrt(n)`` is its standard error.
- **Small samples**: below ``SMALL_SAMPLE`` (20) fitted eigenvalues (a 10-class head), WeightWatcher's
  bias-corrected estimator ``alpha = 1 + (n - 1) / sum(log(x_i / xmin))`` over tails of at least 8 points,
  ``xmin`` again by the smallest KS distance (``small_sample``): on 15-point Pareto samples its median is
  the true alpha, where the plain MLE, free to pick a short tail, overshoots by 0.2 (tests/analysis).
  (``WW_powerlaw.fit_powerlaw_smallN`` also ranks the candidates by ``D - 0.868 / sqrt(n)``, but
  ``WWFit.__init__`` then overrides its choice with the smallest ``D``: what WeightWatcher reports is the
  latter, and so is this.)
- ``alpha_weighted = alpha * log10(lambda_max)``, ``log_spectral_norm = log10(lambda_max)``,
  ``log_norm = log10(sum(lambda))`` (the squared Frobenius norm), ``log_alpha_norm = log10(sum(lambda^alpha))``,
  ``stable_rank = sum(lambda) / lambda_max``, ``num_pl_spikes``: eigenvalues ``>= xmin``.
- **Marchenko-Pastur** (``mp="ww"``): the ESD is rescaled to mean 1, a linear-kernel density estimate
  (bandwidth 0.1) is taken on 1000 points from 0 to ``lambda_max + 0.5`` (points where it is below 0.01
  dropped), and ``sigma`` minimizes the squared residual of the MP density, by ``scipy.optimize.brute`` on
  ``[0.05, 2) * s`` in steps of ``0.01 * s`` (``s`` the sigma that puts the bulk edge at ``lambda_max``)
  then Nelder-Mead, as WeightWatcher's ``fit_density_with_range``; a bulk edge below the KDE's mode or
  beyond its range, or a lower edge above the mode, is rejected. On a square matrix (``Q == 1``) the
  singular values are fitted with WeightWatcher's quarter-circle law, whose support stays ``[0, 2]``
  whatever ``sigma`` (only its height scales). The bulk edge is ``lambda_plus = sigma^2 (1 + 1/sqrt(Q))^2``;
  ``mp_softrank = lambda_plus / lambda_max``; ``num_spikes`` counts the eigenvalues above
  ``lambda_plus + sqrt(TW)``, ``TW = Q^(-1/2) lambda_plus^(2/3) M^(-2/3)`` (the Tracy-Widom margin).
  ``mp="robust"`` is this project's fit, which survives strong spikes (``fit_marchenko_pastur_robust``).

Which matrices are fitted (``min_evals`` etc.) is decided by ``check_size``; the model walk is in
``analysis.spectrum``. Eigenvalues are computed in fp64 (or fp32 if asked), never in half precision.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

WELL_TRAINED = (2.0, 6.0)  # WeightWatcher's range of alpha for a well-trained layer
SMALL_SAMPLE = 20  # WW_powerlaw.SMALL_N_CUTOFF: fewer fitted eigenvalues take the bias-corrected estimator
SMALL_SAMPLE_MIN_TAIL = 8  # WW_powerlaw.fit_powerlaw_smallN's k_min
WW_FIT_FLOOR = 1e-5  # weightwatcher.constants.EVALS_THRESH: eigenvalues fitted by the power law are above it
CONV_NORM = 1.0 / math.sqrt(2.0)  # weightwatcher's conv2d_norm: sqrt(conv2d_count / 2) with one pooled matrix
KDE_BANDWIDTH = 0.1  # weightwatcher's mp_fit bandwidth (and this project's robust fit's)
KDE_FLOOR = 0.01  # weightwatcher's resid_mp THRESH: KDE points below it carry no residual
ROBUST_SIGMA_GRID = np.arange(0.2, 3.0, 0.005)  # robust MP fit: sigma in units of the ESD rescaled by its median
KS_BLOCK = 1 << 22  # elements of one block of the exhaustive xmin search: 32 MiB of fp64
KS_PROBES = 512  # points of the lower bound that prunes the xmin search on large ESDs


# -- definitions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ESDOptions:
    """Which definitions the ESD metrics follow. The defaults are WeightWatcher 0.7.7's; ``utilrank()`` gives
    this project's own choices (each documented in docs/weightspace.md)."""

    ks: str = "ww"  # "ww": max |F(x_j) - j/n| | "two-sided": the standard KS statistic
    small_sample: bool = True  # WeightWatcher's bias-corrected estimator below SMALL_SAMPLE fitted eigenvalues
    fit_floor: str = "ww"  # "ww": fit eigenvalues > 1e-5 (absolute) | "rank": above the fp32 rank tolerance
    conv_norm: bool = True  # pooled conv slices scaled by 1/sqrt(2) (WeightWatcher's conv2d_norm)
    mp: str = "ww"  # "ww": WeightWatcher's MP / quarter-circle fit | "robust": this project's
    min_evals: int = 8  # WeightWatcher's min_evals
    max_evals: int = 15000  # WeightWatcher's max_evals (pooled count)
    max_n: int = 50000  # WeightWatcher's max_N
    count: str = "pooled"  # "pooled": M * slices >= min_evals (WeightWatcher) | "slice": M >= min_evals
    grouped_convs: bool = True  # analyze a grouped conv's stored slices (WeightWatcher) | skip it

    def __post_init__(self) -> None:
        choices = {"ks": ("ww", "two-sided"), "fit_floor": ("ww", "rank"), "mp": ("ww", "robust"),
                   "count": ("pooled", "slice")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ESDOptions.{name} = {getattr(self, name)!r}: choose {' or '.join(allowed)}")
        if self.min_evals < 2 or self.max_evals < self.min_evals or self.max_n < 1:
            raise ValueError(f"ESDOptions: need 2 <= min_evals <= max_evals and max_n >= 1, got min_evals "
                             f"{self.min_evals}, max_evals {self.max_evals}, max_n {self.max_n}")

    @classmethod
    def utilrank(cls, **overrides) -> ESDOptions:
        """This project's choices: the standard KS statistic, a scale-free fit floor, no conv rescaling, the
        robust MP fit, every conv slice large enough, grouped convs skipped."""
        base = {"ks": "two-sided", "fit_floor": "rank", "conv_norm": False, "mp": "robust", "count": "slice",
                "grouped_convs": False}
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def is_weightwatcher(self) -> bool:
        return self == ESDOptions()


# -- power law ------------------------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """``p(x) = (alpha - 1) / xmin * (x / xmin)^-alpha`` for ``x >= xmin``; ``n_tail`` of the ``n`` fitted
    values lie in the tail."""

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int
    n: int
    sigma: float  # (alpha - 1) / sqrt(n_tail)

    def density(self, x: np.ndarray) -> np.ndarray:
        """The fitted density as a share of the fitted values (the tail's fraction times its pdf)."""
        return (self.n_tail / self.n) * (self.alpha - 1.0) / self.xmin * (x / self.xmin) ** (-self.alpha)


def _distances(x: np.ndarray, idx: np.ndarray, alpha: np.ndarray, cols: np.ndarray, ks: str) -> np.ndarray:
    """KS distance of each candidate ``idx`` (exponent ``alpha``) over the tail points among ``cols``."""
    with np.errstate(all="ignore"):
        cdf = 1.0 - (x[None, cols] / x[idx, None]) ** (1.0 - alpha[:, None])  # [B, T]
    n = (x.size - idx)[:, None].astype(np.float64)
    below = (cols[None, :] - idx[:, None]) / n  # the empirical CDF just below each point, j / n
    dist = np.abs(cdf - below) if ks == "ww" else np.maximum(below + 1.0 / n - cdf, cdf - below)
    return np.where(cols[None, :] >= idx[:, None], dist, -np.inf).max(axis=1)


def ks_distances(x: np.ndarray, candidates: np.ndarray, alphas: np.ndarray, ks: str = "ww") -> np.ndarray:
    """For each candidate ``i`` (an index into the ascending ``x``) with exponent ``alphas[i]``, the KS
    distance between the tail ``x[i:]`` and the power law from ``x[i]``; 1 where ``alpha <= 1`` (no
    normalizable law), as WeightWatcher leaves it. Vectorized over blocks of candidates (each a
    ``[candidates, tail]`` array)."""
    out = np.ones(candidates.size)
    block = max(1, KS_BLOCK // max(1, x.size))
    for start in range(0, candidates.size, block):
        idx, alpha = candidates[start : start + block], alphas[start : start + block]
        dist = _distances(x, idx, alpha, np.arange(int(idx.min()), x.size), ks)
        out[start : start + block] = np.where(alpha > 1.0, dist, 1.0)
    return out


def best_candidate(x: np.ndarray, candidates: np.ndarray, alphas: np.ndarray, ks: str = "ww") -> tuple[int, float]:
    """``(position in candidates, distance)`` of the smallest KS distance (the first of equals), exactly as
    ``argmin(ks_distances(...))`` but without computing every distance in full: the distance over
    ``KS_PROBES`` evenly spaced points is a lower bound of each candidate's, and the full distance is computed
    only for candidates whose bound does not exceed the best found so far (most of them, on a small ESD; a
    few hundred of 20,000 on a large one: 0.3 s instead of 5)."""
    if x.size <= 4 * KS_PROBES:
        d = ks_distances(x, candidates, alphas, ks)
        best = int(np.argmin(d))
        return best, float(d[best])
    # evenly spaced in rank, and geometrically dense toward the top, where the short tails live
    top = x.size - np.geomspace(1, x.size, KS_PROBES // 2)
    probes = np.unique(np.concatenate([np.linspace(0, x.size - 1, KS_PROBES // 2), top]).round().astype(np.int64))
    bound = np.ones(candidates.size)
    block = max(1, KS_BLOCK // probes.size)
    for start in range(0, candidates.size, block):
        idx, alpha = candidates[start : start + block], alphas[start : start + block]
        bound[start : start + block] = np.where(alpha > 1.0, _distances(x, idx, alpha, probes, ks), 1.0)
    order = np.argsort(bound, kind="stable")
    best, best_d = -1, math.inf
    chunk = 64  # candidates per exact pass: the best bounds first, so the best-so-far drops fast
    for start in range(0, order.size, chunk):
        pos = order[start : start + chunk]
        pos = pos[bound[pos] <= best_d]
        if pos.size == 0:
            break
        d = ks_distances(x, candidates[pos], alphas[pos], ks)
        for p, dp in zip(pos.tolist(), d.tolist(), strict=True):
            if dp < best_d or (dp == best_d and p < best):
                best, best_d = p, dp
    return best, best_d


def fit_power_law(values: np.ndarray, *, ks: str = "ww", small_sample: bool = True) -> PowerLawFit:
    """Clauset-Shalizi-Newman fit with an exhaustive ``xmin`` search (see the module docstring): every value
    but the largest is a candidate and the smallest KS distance wins; below ``SMALL_SAMPLE`` values with
    ``small_sample``, only tails of at least 8 points, with the bias-corrected exponent. ``values`` are the
    eigenvalues to fit (positive)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size < 2 or x[0] <= 0:
        raise ValueError(f"a power-law fit needs at least 2 positive values, got {x.size}"
                         + (" (not all positive)" if x.size and x[0] <= 0 else ""))
    log_x = np.log(x)
    tail_log = np.cumsum(log_x[::-1])[::-1]  # tail_log[i] = sum(log(x[i:]))
    cand = np.arange(x.size - 1)
    n = (x.size - cand).astype(np.float64)
    log_sum = tail_log[:-1] - n * log_x[:-1]  # sum over each tail of log(x / xmin)
    small = small_sample and x.size < SMALL_SAMPLE
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + ((n - 1.0) if small else n) / log_sum
    if not small:
        best, dist = best_candidate(x, cand, alphas, ks)
    else:
        usable = (n >= SMALL_SAMPLE_MIN_TAIL) & (log_sum > 1e-12)
        if not usable.any():  # no tail long enough: WeightWatcher fits all the values
            usable[0] = log_sum[0] > 1e-12
            if not usable[0]:
                return PowerLawFit(1.0, float(x[0]), 1.0, int(x.size), int(x.size), 0.0)
        alphas = np.where(usable, alphas, 0.0)
        d = np.where(usable, ks_distances(x, cand, alphas, ks), 1.0)
        best = int(np.argmin(d))
        dist = float(d[best])
    alpha = float(alphas[best])
    return PowerLawFit(alpha, float(x[best]), dist, int(n[best]), int(x.size),
                       (alpha - 1.0) / math.sqrt(n[best]))


# -- Marchenko-Pastur -----------------------------------------------------------------------------------------


@dataclass
class MPFit:
    """MP fit of an ESD; ``sigma`` is in the units of the rescaled ESD the fit ran on, the edges in the ESD's
    own."""

    sigma: float
    bulk_min: float
    bulk_max: float
    num_spikes: int
    softrank: float


def linear_kde(samples: np.ndarray, grid: np.ndarray, bw: float = KDE_BANDWIDTH) -> np.ndarray:
    """Density at ``grid`` of a linear (triangular) kernel of half-width ``bw``: scikit-learn's
    ``KernelDensity(kernel="linear")``, which WeightWatcher uses (equal to it to 1e-15), in chunks to bound
    memory."""
    out = np.zeros_like(grid)
    for start in range(0, samples.size, 2048):
        s = samples[start : start + 2048]
        out += np.clip(1.0 - np.abs(grid[:, None] - s[None, :]) / bw, 0.0, None).sum(1)
    return out / (samples.size * bw)


def _mp_edges(q: float, sigma: float) -> tuple[float, float]:
    return (sigma * (1 - 1 / math.sqrt(q))) ** 2, (sigma * (1 + 1 / math.sqrt(q))) ** 2


def _mp_density(x: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """The MP law of eigenvalues (weightwatcher's ``marchenko_pastur_fun``), 0 outside its support."""
    a, b = _mp_edges(q, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.sqrt((b - x) * (x - a)) / (2 * math.pi * sigma**2 * x / q)
    return np.nan_to_num(y)


def _spikes_and_fit(x: np.ndarray, q: float, m: int, sigma: float, scale: float) -> MPFit:
    """Bulk edges, Tracy-Widom spike count and soft rank of ``sigma`` on the rescaled ESD ``x``."""
    bulk_min, bulk_max = _mp_edges(q, sigma)
    tracy_widom = (1 / math.sqrt(q)) * bulk_max ** (2 / 3) * m ** (-2 / 3)
    spikes = int(np.sum(x > bulk_max + math.sqrt(tracy_widom)))
    return MPFit(float(sigma), bulk_min / scale, bulk_max / scale, spikes, bulk_max / float(x.max()))


def fit_marchenko_pastur(evals: np.ndarray, q: float, m: int, *, bw: float = KDE_BANDWIDTH) -> MPFit:
    """WeightWatcher's ``mp_fit`` (see the module docstring), with its KDE computed once instead of at every
    residual evaluation (it does not depend on ``sigma``): the same ``scipy.optimize.brute`` search and
    Nelder-Mead polish on the same residual."""
    from scipy import optimize  # heavy (~1 s on 2 cores): loaded by the first fit, not with the analysis

    evals = np.asarray(evals, dtype=np.float64)
    scale = evals.size / float(evals.sum())  # WeightWatcher's Wscale^2: the ESD rescaled to mean 1
    x = evals * scale
    square = q == 1.0
    samples = np.sqrt(x) if square else x
    grid = np.linspace(0.0, float(samples.max()) + 0.5, 1000)
    kde = linear_kde(samples, grid, bw)
    keep = kde > KDE_FLOOR
    grid, kde = grid[keep], kde[keep]
    mode, top = grid[np.argmax(kde)], grid.max()

    def residual(p: np.ndarray) -> float:
        sigma = float(np.ravel(p)[0])
        if square:
            with np.errstate(invalid="ignore"):
                y = np.nan_to_num(np.sqrt(4 - grid**2) / (math.pi * sigma**2))
        else:
            a, b = _mp_edges(q, sigma)
            if b < mode or b > top or a > mode:
                return 1000.0**2 * grid.size  # WeightWatcher's rejected fit: a residual of 1000 per point
            y = _mp_density(grid, q, sigma)
        return float(np.sum((y - kde) ** 2))

    s = math.sqrt(float(x.max())) / (1 + 1 / math.sqrt(q))  # the sigma whose bulk edge is lambda_max
    sigma = float(optimize.brute(residual, (slice(0.05 * s, 2.0 * s, 0.01 * s),), full_output=True)[0][0])
    return _spikes_and_fit(x, q, m, sigma, scale)


def _quarter_circle(s: np.ndarray, sigma: float) -> np.ndarray:
    """Density of the singular values of a square random matrix scaled to entry variance ``sigma^2 / N``
    (its support scales with sigma, unlike WeightWatcher's)."""
    return np.sqrt(np.clip(4 * sigma**2 - s**2, 0.0, None)) / (math.pi * sigma**2)


def fit_marchenko_pastur_robust(evals: np.ndarray, q: float, m: int, *, bw: float = KDE_BANDWIDTH) -> MPFit:
    """This project's MP fit (``mp="robust"``): WeightWatcher's residual and admissibility rule with four
    changes that make it survive strong spikes: the ESD is rescaled by its median, not its mean (the
    Frobenius norm); ``sigma`` is searched on a fixed grid around the bulk, not on one tied to
    ``lambda_max``; the KDE is evaluated over the bulk's possible range, not out to ``lambda_max``; and the
    quarter-circle support scales with sigma. Three rank-one signals 3x (10x) the noise in a 400 x 200
    Gaussian matrix: WeightWatcher's fit counts the 3 spikes but puts the bulk edge at 1.9x (21x) the true
    ``(sqrt(N) + sqrt(M))^2``, so its soft rank and bulk edge describe the spikes, not the bulk; this one
    puts the edge within 0.5% of the true one (tests/analysis). Numerical zeros are left out (they would
    move the median)."""
    evals = np.asarray(evals, dtype=np.float64)
    scale = 1.0 / float(np.median(evals))
    x = evals * scale
    lam_max = float(x.max())
    square = q == 1.0
    samples = np.sqrt(x) if square else x
    # the grid covers the bulk any sigma of the search can give (edge <= 36, or 6 for singular values),
    # not the spikes: a grid out to a huge lambda_max would step over the kernel's bandwidth
    top = ROBUST_SIGMA_GRID[-1] * (2.0 if square else 1 + 1 / math.sqrt(q))
    grid = np.linspace(0.0, min(float(samples.max()), top if square else top**2) + 0.5, 1000)
    kde = linear_kde(samples, grid, bw)
    keep = kde > KDE_FLOOR
    grid, kde = grid[keep], kde[keep]
    mode = grid[np.argmax(kde)]
    best, best_resid = math.nan, math.inf
    for sigma in ROBUST_SIGMA_GRID:
        if square:
            if 2 * sigma > grid.max():
                continue
            resid = float(np.sum((_quarter_circle(grid, sigma) - kde) ** 2))
        else:
            a, b = _mp_edges(q, sigma)
            if b < mode or b > grid.max() or a > mode:
                continue
            resid = float(np.sum((_mp_density(grid, q, sigma) - kde) ** 2))
        if resid < best_resid:
            best, best_resid = float(sigma), resid
    if math.isnan(best):  # no admissible fit (a degenerate ESD): the bulk edge at lambda_max
        best = math.sqrt(lam_max) / (1 + 1 / math.sqrt(q))
    return _spikes_and_fit(x, q, m, best, scale)


# -- one matrix -----------------------------------------------------------------------------------------------


@dataclass
class Eigenvalues:
    """The pooled eigenvalues of one weight (ascending, numerical zeros included) and its matrix geometry."""

    values: np.ndarray
    n: int
    m: int
    slices: int
    num_zero: int  # eigenvalues below the fp32 rank tolerance (zeros of W)
    zero_tol: float  # that tolerance, on eigenvalues
    scale: float  # the factor applied to W before its SVD (CONV_NORM for a pooled conv, else 1)


@dataclass
class ESD:
    """The eigenvalues of one layer's ``W^T W`` (pooled over conv slices) and their fits."""

    eig: Eigenvalues
    power_law: PowerLawFit
    mp: MPFit
    metrics: dict = field(default_factory=dict)

    @property
    def evals(self) -> np.ndarray:
        """The positive eigenvalues (what a log-scale plot can show)."""
        return self.eig.values[self.eig.values > 0]


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"spectra are computed in float32 or float64, not {dtype} (half precision would "
                         "lose the small eigenvalues the fits need)")


def eigenvalues(
    weight: torch.Tensor, *, dtype: torch.dtype = torch.float64, conv_norm: bool = True
) -> Eigenvalues:
    """The squared singular values of a 2-D weight, or of each ``kh x kw`` slice of a 4-D conv weight pooled
    together (scaled by ``CONV_NORM`` first with ``conv_norm``), computed batched on the weight's device."""
    check_dtype(dtype)
    w = weight.detach().to(dtype)
    if not bool(torch.isfinite(w).all()):  # the SVD would fail to converge, or fit garbage
        raise ValueError(f"the {'x'.join(map(str, w.shape))} weight holds NaN or Inf")
    if w.dim() == 4:
        mats = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])  # [kh*kw, out, C]
        scale = CONV_NORM if conv_norm else 1.0
    elif w.dim() == 2:
        mats, scale = w[None], 1.0
    else:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(w.shape)}")
    sv = torch.linalg.svdvals(mats * scale if scale != 1.0 else mats).flatten()  # [slices * M]
    n, m = max(mats.shape[1:]), min(mats.shape[1:])
    # a singular value below the fp32 rank tolerance is a zero of W (numpy's matrix_rank rule)
    tol = float(sv.max().clamp_min(torch.finfo(dtype).tiny)) * n * torch.finfo(torch.float32).eps
    values = np.sort((sv.to(torch.float64) ** 2).cpu().numpy())
    return Eigenvalues(values, n, m, mats.shape[0], int((sv <= tol).sum()), tol * tol, scale)


def check_size(n: int, m: int, slices: int, shape: str, options: ESDOptions) -> str | None:
    """Why an ``n x m`` matrix (or ``slices`` pooled conv slices of that shape, written ``shape``) is not
    fitted under ``options``, or None."""
    what = f"{slices} kernel slices of {shape} pooled" if slices > 1 else f"the {shape} matrix"
    count = m * slices
    if options.count == "slice" and m < options.min_evals:  # pooling slices does not make a 64x1 slice a matrix
        each = f"each {shape} kernel slice" if slices > 1 else f"the {shape} matrix"
        return f"{each} has {m} singular value{'s' * (m != 1)} (fewer than min_evals {options.min_evals})"
    if count < options.min_evals:
        return f"{what}: {count} eigenvalues (fewer than min_evals {options.min_evals})"
    if count > options.max_evals:
        return f"{what}: {count} eigenvalues (more than max_evals {options.max_evals})"
    if n > options.max_n:
        return f"{what}: N = {n} (more than max_n {options.max_n})"
    return None


def esd_of(eig: Eigenvalues, options: ESDOptions | None = None) -> ESD:
    """The power-law and MP fits and the per-layer metrics of pooled eigenvalues (see the module docstring);
    ``ValueError`` when there is nothing to fit."""
    options = options or ESDOptions()
    values = eig.values
    floor = WW_FIT_FLOOR if options.fit_floor == "ww" else eig.zero_tol
    fitted = values[values > floor]
    if fitted.size < 2:
        raise ValueError(f"{fitted.size} eigenvalue{'s' * (fitted.size != 1)} above the fit floor {floor:.3g} "
                         "(a power-law fit needs 2)")
    pl = fit_power_law(fitted, ks=options.ks, small_sample=options.small_sample)
    q = eig.n / eig.m
    if options.mp == "ww":
        mp = fit_marchenko_pastur(values, q, eig.m)
    else:
        mp = fit_marchenko_pastur_robust(values[values > eig.zero_tol], q, eig.m)
    lam_max, total = float(values.max()), float(values.sum())
    with np.errstate(over="ignore"):
        alpha_norm = float(np.sum(values**pl.alpha))
    metrics = {
        "alpha": pl.alpha, "alpha_sigma": pl.sigma, "xmin": pl.xmin, "ks_distance": pl.ks_distance,
        "num_pl_spikes": int(np.sum(values >= pl.xmin)), "alpha_weighted": pl.alpha * math.log10(lam_max),
        "log_alpha_norm": math.log10(alpha_norm) if alpha_norm > 0 else None,
        "lambda_max": lam_max, "log_spectral_norm": math.log10(lam_max), "log_norm": math.log10(total),
        "stable_rank": total / lam_max, "mp_softrank": mp.softrank, "num_spikes": mp.num_spikes,
        "sigma_mp": mp.sigma, "bulk_min": mp.bulk_min, "bulk_max": mp.bulk_max,
        "num_evals": int(values.size), "num_fit": int(fitted.size), "num_zero": eig.num_zero,
        "N": eig.n, "M": eig.m, "Q": q, "slices": eig.slices, "scale": eig.scale,
    }
    return ESD(eig, pl, mp, metrics)


def matrix_esd(
    weight: torch.Tensor, options: ESDOptions | None = None, *, dtype: torch.dtype = torch.float64
) -> ESD:
    """The ESD and metrics of one weight (2-D, or 4-D pooled over slices); ``ValueError`` naming the reason
    when it is too small or too large to fit under ``options`` (default: WeightWatcher's)."""
    options = options or ESDOptions()
    shape = f"{weight.shape[0]}x{weight.shape[1]}"
    if weight.dim() == 4:
        n, m, slices = max(weight.shape[:2]), min(weight.shape[:2]), weight.shape[2] * weight.shape[3]
    elif weight.dim() == 2:
        n, m, slices = max(weight.shape), min(weight.shape), 1
    else:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")
    reason = check_size(n, m, slices, shape, options)
    if reason is not None:
        raise ValueError(reason)
    conv_norm = options.conv_norm and weight.dim() == 4
    return esd_of(eigenvalues(weight, dtype=dtype, conv_norm=conv_norm), options)
