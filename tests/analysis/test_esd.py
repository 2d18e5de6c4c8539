"""Estimators of one ESD: the power-law MLE and its exhaustive xmin search, the KS variants, the small-sample
estimator, the Marchenko-Pastur fits, eigenvalues of matrices and pooled convs, the size rules."""

import math

import numpy as np
import pytest
import torch

from utilrank_kernels.analysis.esd import (
    CONV_NORM,
    KS_PROBES,
    SMALL_SAMPLE,
    ESDOptions,
    best_candidate,
    eigenvalues,
    fit_marchenko_pastur,
    fit_marchenko_pastur_robust,
    fit_power_law,
    ks_distances,
    linear_kde,
    matrix_esd,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def pareto(alpha, n, xmin=1.0, seed=0):
    """Samples of the continuous power law p(x) ~ x^-alpha, x >= xmin (inverse CDF)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def reference_fit(values, ks="ww", small_sample=True):
    """The definitions written out as loops over candidates (the module docstring), fp64."""
    x = sorted(float(v) for v in values)
    n_all = len(x)
    small = small_sample and n_all < SMALL_SAMPLE
    best = None
    for i in range(n_all - 1):
        tail = x[i:]
        n = len(tail)
        s = sum(math.log(t / x[i]) for t in tail)
        if small and (n < 8 or s <= 1e-12):
            continue
        alpha = 1 + ((n - 1) if small else n) / s if s > 0 else math.inf
        if alpha <= 1:
            d = 1.0
        else:
            cdf = [1 - (t / x[i]) ** (1 - alpha) for t in tail]
            if ks == "ww":
                d = max(abs(c - j / n) for j, c in enumerate(cdf))
            else:
                d = max(max((j + 1) / n - c, c - j / n) for j, c in enumerate(cdf))
        if best is None or d < best[0]:
            best = (d, alpha, x[i], n)
    return best


@pytest.mark.parametrize("n", [9, 15, 19, 20, 64, 300], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("ks", ["ww", "two-sided"])
def test_exhaustive_search_matches_the_definition_written_as_loops(n, ks):
    rng = np.random.default_rng(n)
    x = np.concatenate([rng.uniform(0.1, 1.0, n // 2), pareto(2.5, n - n // 2, seed=n)])
    d, alpha, xmin, n_tail = reference_fit(x, ks)
    fit = fit_power_law(x, ks=ks)
    assert fit.ks_distance == pytest.approx(d, rel=1e-10) and fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert (fit.xmin, fit.n_tail, fit.n) == (xmin, n_tail, n)
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(n_tail), rel=1e-10)


@pytest.mark.parametrize("ks", ["ww", "two-sided"])
def test_pruned_search_finds_the_exhaustive_minimum(ks):
    """Above 4 * KS_PROBES values the search computes full distances only where a lower bound allows:
    same candidate and distance as every distance computed in full."""
    rng = np.random.default_rng(21)
    x = np.sort(np.concatenate([rng.uniform(0.1, 1.0, 3_000), pareto(2.2, 3_000, seed=22)]))
    assert x.size > 4 * KS_PROBES
    cand = np.arange(x.size - 1)
    n = x.size - cand
    alphas = 1 + n / (np.cumsum(np.log(x)[::-1])[::-1][:-1] - n * np.log(x[:-1]))
    full = ks_distances(x, cand, alphas, ks)
    best, dist = best_candidate(x, cand, alphas, ks)
    assert best == int(np.argmin(full)) and dist == full[best]


def test_two_sided_ks_is_never_smaller():
    x = np.concatenate([np.random.default_rng(3).uniform(0.1, 1.0, 200), pareto(3.0, 200, seed=4)])
    assert fit_power_law(x, ks="two-sided").ks_distance >= fit_power_law(x, ks="ww").ks_distance


def test_small_sample_estimator_is_less_biased_than_the_plain_mle():
    """Below 20 values: the exponent 1 + (n - 1) / sum(log(x / xmin)) over tails of at least 8 points. On
    400 samples of 15 points from a Pareto law with alpha 2.5, its median is the truth; the plain MLE, free
    to pick a short tail, overshoots."""
    small = [fit_power_law(pareto(2.5, 15, seed=s)) for s in range(400)]
    plain = [fit_power_law(pareto(2.5, 15, seed=s), small_sample=False) for s in range(400)]
    assert all(f.n_tail >= 8 for f in small)
    assert abs(np.median([f.alpha for f in small]) - 2.5) < 0.02
    assert np.median([f.alpha for f in plain]) - 2.5 > 0.1


@pytest.mark.parametrize("alpha", [1.5, 2.0, 2.5, 3.0, 4.0], ids=lambda a: f"alpha{a}")
def test_alpha_recovered_from_a_power_law(alpha):
    fit = fit_power_law(pareto(alpha, 20_000, seed=int(alpha * 10)))
    assert abs(fit.alpha - alpha) < 0.1
    assert fit.ks_distance < 0.05


def test_alpha_recovered_above_a_bulk_with_xmin_search():
    """A power-law tail over a uniform bulk: the KS-optimal xmin finds where the tail starts."""
    rng = np.random.default_rng(1)
    tail = pareto(2.5, 8_000, xmin=2.0, seed=2)
    bulk = rng.uniform(0.05, 1.5, 6_000)  # below the tail: must be cut off by xmin
    fit = fit_power_law(np.concatenate([bulk, tail]))
    assert abs(fit.alpha - 2.5) < 0.1
    assert 1.4 <= fit.xmin <= 2.5
    assert fit.n_tail <= 8_300


def test_alpha_of_a_matrix_with_a_power_law_spectrum():
    """W = U diag(sqrt(lambda)) V^T with lambda drawn from a power law: matrix_esd recovers its alpha."""
    g = torch.Generator().manual_seed(0)
    lam = torch.tensor(pareto(2.5, 1_000, seed=5))
    # signed permutations: orthogonal factors at no cost, and a W that is no diagonal
    u = torch.eye(1_200, dtype=torch.float64)[torch.randperm(1_200, generator=g)[:1_000]].T
    v = torch.eye(1_000, dtype=torch.float64)[torch.randperm(1_000, generator=g)]
    w = (u * (lam.sqrt() * (2 * torch.randint(0, 2, (1_000,), generator=g) - 1))) @ v.T
    esd = matrix_esd(w)
    assert np.allclose(np.sort(esd.evals), np.sort(lam.numpy()), rtol=1e-8)
    assert abs(esd.metrics["alpha"] - 2.5) < 0.1
    m = esd.metrics
    assert m["alpha_weighted"] == pytest.approx(m["alpha"] * math.log10(lam.max().item()))
    assert m["stable_rank"] == pytest.approx(lam.sum().item() / lam.max().item())
    assert m["num_pl_spikes"] == int((esd.eig.values >= m["xmin"]).sum()) == esd.power_law.n_tail


def test_linear_kde_is_a_normalized_triangular_kernel():
    samples = np.random.default_rng(0).gamma(2.0, size=300)
    grid = np.linspace(-1, samples.max() + 1, 20_001)
    dens = linear_kde(samples, grid)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-6)
    one = linear_kde(np.array([1.0]), np.array([1.0, 1.05, 1.1]))
    assert np.allclose(one, [10.0, 5.0, 0.0])


@pytest.mark.parametrize("mp", ["ww", "robust"])
@pytest.mark.parametrize("shape", [(400, 200), (300, 300), (100, 1000), (192, 64)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_mp_softrank_of_a_random_gaussian_matrix_is_near_one(shape, mp):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 0.02  # the scale must not matter
    m = matrix_esd(w, ESDOptions(mp=mp)).metrics
    assert abs(m["mp_softrank"] - 1.0) < 0.1
    assert m["num_spikes"] == 0
    assert m["stable_rank"] > 0.2 * min(shape)


def spiked(seed=8):
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g, "dtype": torch.float64}
    w = torch.randn(400, 200, **kw)
    for _ in range(3):  # three strong rank-one signals above the bulk
        w += 3.0 * torch.randn(400, 1, **kw) @ torch.randn(1, 200, **kw)
    return w


def test_robust_mp_fit_places_the_bulk_edge_under_strong_spikes():
    """Three rank-one signals 3x the noise in a 400 x 200 Gaussian matrix: both fits count the 3 spikes, but
    WeightWatcher's (ESD rescaled by its mean, sigma grid tied to lambda_max) puts the bulk edge far above
    the true one, (sqrt(400) + sqrt(200))^2; the robust fit puts it within 0.5%."""
    true_edge = (400**0.5 + 200**0.5) ** 2
    robust = matrix_esd(spiked(), ESDOptions(mp="robust")).metrics
    assert robust["num_spikes"] == 3 and robust["mp_softrank"] < 0.3
    assert robust["bulk_max"] == pytest.approx(true_edge, rel=0.005)
    ww = matrix_esd(spiked(), ESDOptions()).metrics
    assert ww["num_spikes"] == 3 and ww["bulk_max"] > 1.5 * true_edge


@pytest.mark.parametrize("fit", [fit_marchenko_pastur, fit_marchenko_pastur_robust], ids=["ww", "robust"])
def test_mp_fit_is_scale_free(fit):
    evals = eigenvalues(torch.randn(300, 150, generator=torch.Generator().manual_seed(9))).values
    a, b = fit(evals, 2.0, 150), fit(evals * 1e4, 2.0, 150)
    assert a.softrank == pytest.approx(b.softrank) and a.bulk_max * 1e4 == pytest.approx(b.bulk_max)


def test_conv_slices_are_pooled_and_scaled_as_weightwatcher_does():
    w = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    expected = np.sort(np.concatenate([torch.linalg.svdvals(w[:, :, i, j]).numpy() ** 2
                                       for i in range(3) for j in range(3)]))
    raw = eigenvalues(w, conv_norm=False)
    assert (raw.n, raw.m, raw.slices, raw.num_zero, raw.scale) == (16, 12, 9, 0, 1.0)
    assert np.allclose(raw.values, expected, rtol=1e-10)
    scaled = eigenvalues(w)  # conv2d_norm: W / sqrt(2) halves every eigenvalue
    assert scaled.scale == CONV_NORM and np.allclose(scaled.values, expected / 2, rtol=1e-10)
    ww, own = matrix_esd(w).metrics, matrix_esd(w, ESDOptions(conv_norm=False)).metrics
    assert ww["log_spectral_norm"] == pytest.approx(own["log_spectral_norm"] - math.log10(2))
    assert ww["alpha"] == pytest.approx(own["alpha"]) and ww["num_evals"] == 108 and ww["slices"] == 9
    assert ww["Q"] == pytest.approx(16 / 12)


def test_size_rules_pooled_and_per_slice():
    """A 20x4x5x5 conv has 4 eigenvalues per slice and 100 pooled: WeightWatcher fits it (pooled count >=
    min_evals 8); the per-slice rule does not. A 10x7 matrix has 7 < 8."""
    conv = torch.randn(20, 4, 5, 5, generator=torch.Generator().manual_seed(12))
    assert matrix_esd(conv).metrics["num_evals"] == 100
    with pytest.raises(ValueError, match="each 20x4 kernel slice has 4 singular values .fewer than min_evals 8"):
        matrix_esd(conv, ESDOptions(count="slice"))
    with pytest.raises(ValueError, match="the 10x7 matrix: 7 eigenvalues .fewer than min_evals 8"):
        matrix_esd(torch.randn(10, 7))
    with pytest.raises(ValueError, match="more than max_evals 50"):
        matrix_esd(conv, ESDOptions(max_evals=50))
    assert matrix_esd(torch.randn(10, 8)).metrics["num_evals"] == 8


def test_zeros_are_kept_in_the_esd_but_not_fitted():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(60, 15, generator=g, dtype=torch.float64) @ torch.randn(15, 40, generator=g).double()
    eig = eigenvalues(w)
    assert (eig.n, eig.m, eig.num_zero, eig.values.size) == (60, 40, 25, 40)
    m = matrix_esd(w).metrics
    assert (m["num_evals"], m["num_fit"], m["num_zero"]) == (40, 15, 25)
    assert matrix_esd(w, ESDOptions(fit_floor="rank")).metrics["num_fit"] == 15
    # WeightWatcher's floor is absolute: a weight scaled by 1e-6 has nothing above 1e-5 left to fit
    with pytest.raises(ValueError, match="above the fit floor 1e-05"):
        matrix_esd(w * 1e-6)
    assert matrix_esd(w * 1e-6, ESDOptions(fit_floor="rank")).metrics["alpha"] == pytest.approx(m["alpha"])


def test_options_are_checked():
    with pytest.raises(ValueError, match="ESDOptions.ks = 'kuiper'"):
        ESDOptions(ks="kuiper")
    assert ESDOptions().is_weightwatcher and not ESDOptions.utilrank().is_weightwatcher
    assert ESDOptions.utilrank(mp="ww").mp == "ww"


def test_half_precision_is_refused():
    with pytest.raises(ValueError, match="float32 or float64"):
        eigenvalues(torch.randn(20, 20), dtype=torch.float16)
