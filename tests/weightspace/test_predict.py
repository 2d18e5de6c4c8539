"""Accuracy from weights: Spearman against scipy, the closed-form leave-one-out against refits, the LOO
regression on a known linear relation, model metrics, the experiment and its plot; the cached population."""

import json

import numpy as np
import pytest
import torch
from scipy import stats

from utilrank_kernels.plots import plot_predict
from utilrank_kernels.weightspace.population import train_population, weights_digest
from utilrank_kernels.weightspace.predict import (
    METRICS,
    average_ranks,
    loo_regression,
    model_metrics,
    predict_experiment,
    ridge_loo_residuals,
    spearman,
    standardize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_spearman_matches_scipy(ties):
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.5 * x + rng.normal(size=30)
    if ties:
        x, y = np.round(x, 0), np.round(y, 0)
    assert np.allclose(average_ranks(x), stats.rankdata(x))
    rho, p = spearman(x, y)
    ref = stats.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert np.isnan(spearman(np.ones(5), np.arange(5))[0])


def test_closed_form_loo_residuals_equal_refits():
    rng = np.random.default_rng(1)
    z = standardize(rng.normal(size=(15, 4)))
    y = rng.normal(size=15)
    for penalty in (1e-6, 0.3, 10.0):
        closed = ridge_loo_residuals(z, y, penalty)
        for i in range(15):  # refit without row i: intercept unpenalized, the columns as given
            keep = np.arange(15) != i
            design = np.column_stack([np.ones(14), z[keep]])
            reg = np.diag([0.0] + [penalty] * 4)
            coef = np.linalg.solve(design.T @ design + reg, design.T @ y[keep])
            assert closed[i] == pytest.approx(y[i] - np.r_[1.0, z[i]] @ coef, rel=1e-8, abs=1e-12)


def test_loo_regression_of_a_perfect_linear_relation_is_exact():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(25, 3)) * [1.0, 100.0, 0.01]  # scales the standardization must undo
    y = 0.3 + x @ np.array([0.02, 0.0005, 5.0])
    r = loo_regression(x, y)
    assert r["loo_mae"] < 1e-6 and r["r2_loo"] > 1 - 1e-9
    assert r["trivial_loo_mae"] > 0.01
    # the trivial predictor: each y predicted by the mean of the others
    n = y.size
    assert r["trivial_loo_mae"] == pytest.approx(np.mean(np.abs((y.sum() - y) / (n - 1) - y)))
    noise = loo_regression(rng.normal(size=(25, 3)), rng.normal(size=25))
    assert noise["r2_loo"] < 0.3  # no relation: no better than the mean
    with pytest.raises(ValueError, match="at least 4 models"):
        loo_regression(x[:3], y[:3])


def test_model_metrics_of_a_small_model():
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from utilrank_kernels.models import build_builtin

    torch.manual_seed(0)
    model = build_builtin("vit-digits").eval()
    images = torch.randn(64, 1, 16, 16)
    data = SimpleNamespace(train=TensorDataset(images, torch.zeros(64, dtype=torch.long)))
    m = model_metrics(model, data, energy=0.99)
    assert set(m) == set(METRICS) and 0 < m["mlu"] <= 1 and m["alpha"] > 1
    assert set(model_metrics(model)) == set(METRICS) - {"mlu"}


def test_weights_or_statistics_with_nan_are_refused_naming_the_layer():
    """A NaN weight was a LinAlgError traceback from the SVD (``utilrank predict`` with a NaN file)."""
    from utilrank_kernels.analysis import LayerStats, Statistics
    from utilrank_kernels.analysis.esd import matrix_esd
    from utilrank_kernels.analysis.spectrum import spectrum
    from utilrank_kernels.models import build_builtin

    torch.manual_seed(0)
    model = build_builtin("vit-digits").eval()
    cov = torch.eye(64, dtype=torch.float64)
    cov[3, 3] = float("inf")
    stats = Statistics({"head": LayerStats("head", "linear", 64, 10, cov, 5)})
    with pytest.raises(ValueError, match="the statistics: layer head: its input covariance holds NaN or Inf"):
        spectrum(model, stats, progress=False)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer blocks\.1\.mlp\.fc2: its weight holds NaN or Inf"):
        model_metrics(model)
    with pytest.raises(ValueError, match="the 64x256 weight holds NaN or Inf"):
        matrix_esd(model.blocks[1].mlp.fc2.weight)


def test_weights_digest_covers_every_tensor_including_batchnorm_counters():
    state = torch.nn.BatchNorm1d(3).state_dict()  # num_batches_tracked: a 0-d int64 tensor
    digest = weights_digest(state)
    changed = dict(state, num_batches_tracked=torch.tensor(1))
    assert weights_digest(changed) != digest
    assert weights_digest(dict(state, weight=state["weight"] + 1e-7)) != digest
    assert weights_digest({k: v.clone() for k, v in state.items()}) == digest


@pytest.mark.slow
def test_cached_population_predict_and_plot(tmp_path, monkeypatch):
    """A tiny recipe from a random base: every kind of member made, the SWA average the mean of its
    snapshots, the population read back from the cache without training (and one lost member retrained),
    then the prediction experiment on it."""
    from utilrank_kernels.data import load_data
    from utilrank_kernels.models import build_builtin

    torch.manual_seed(0)
    base = build_builtin("vit-digits")
    recipe = {"finetune": {"seeds": [1], "lrs": [1e-3], "epochs": 1, "weight_decay": 0.01},
              "subsets": {"classes": [[0, 1, 2, 3, 4]], "seeds": [1], "epochs": 1, "lr": 1e-3, "weight_decay": 0.01},
              "swa": {"cycles": 2, "lr": 1e-3, "weight_decay": 0.01, "seed": 5},
              "scratch": {"stages": [1, 1], "runs": [{"seed": 3, "lr": 2e-3, "weight_decay": 0.05, "batch_size": 64}]}}
    population = train_population("vit-digits", recipe=recipe, base=base, progress=False)
    names = [m.name for m in population.members]
    assert names == ["base", "finetune-s1-lr0.001", "classes0-4-s1", "swa-cycle1", "swa-cycle2", "swa-average",
                     "scratch-s3-e1", "scratch-s3-e2"]
    assert population.groups() == ["base", "finetune", "classes 0-4", "swa", "scratch"]
    by_name = {m.name: m for m in population.members}
    for k, v in by_name["swa-average"].state.items():
        if v.is_floating_point():
            mean = (by_name["swa-cycle1"].state[k].double() + by_name["swa-cycle2"].state[k].double()) / 2
            assert torch.allclose(v.double(), mean, atol=1e-6)
    assert all(0 <= m.val <= 1 and 0 <= m.test <= 1 for m in population.members)

    import utilrank_kernels.weightspace.population as population_module

    (population.path / "scratch-s3-e2.safetensors").unlink()  # a member lost: only it is trained again
    trained, real_train = [], population_module.train
    monkeypatch.setattr(population_module, "train", lambda *a, **k: trained.append(k["desc"]) or real_train(*a, **k))
    again = train_population("vit-digits", recipe=recipe, base=base, progress=False)
    assert trained == ["scratch-s3-e2"] and again.path == population.path
    assert torch.equal(again.members[3].state["head.weight"], population.members[3].state["head.weight"])

    doc = predict_experiment(again, load_data("digits"), progress=False)
    json.dumps(doc)
    assert doc["format"] == "utilrank.predict/1" and len(doc["members"]) == 8
    assert set(doc["spearman"]) == set(METRICS) and len(doc["regression"]["predictions"]) == 8
    assert list(population.path.glob("metrics-*.json"))  # cached beside the population
    plot_predict(doc, tmp_path / "predict.png")
    assert (tmp_path / "predict.png").stat().st_size > 10_000
