"""Spectra: the power-law MLE, the Marchenko-Pastur fit, conv pooling, the report, plots, the command."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from utilrank_kernels.analysis import collect_stats
from utilrank_kernels.analysis.spectrum import (
    MIN_EVALS,
    SPECTRUM_FORMAT,
    eigenvalues,
    fit_marchenko_pastur,
    fit_power_law,
    format_spectrum_table,
    matrix_esd,
    spectrum,
    write_spectrum,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def pareto(alpha, n, xmin=1.0, seed=0):
    """Samples of the continuous power law p(x) ~ x^-alpha, x >= xmin (inverse CDF)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


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


def test_subsampled_candidates_find_the_same_fit():
    x = np.concatenate([np.random.default_rng(4).uniform(0.1, 1.0, 3_000), pareto(3.0, 3_000, seed=5)])
    full = fit_power_law(x, max_candidates=10**9)
    fast = fit_power_law(x, max_candidates=50)
    assert fast.ks_distance <= full.ks_distance + 1e-3
    assert abs(fast.alpha - full.alpha) < 0.05


@pytest.mark.parametrize("shape", [(400, 200), (300, 300), (100, 1000), (192, 64)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_mp_softrank_of_a_random_gaussian_matrix_is_near_one(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 0.02  # the scale must not matter
    m = matrix_esd(w).metrics
    assert abs(m["mp_softrank"] - 1.0) < 0.1
    assert m["num_spikes"] == 0
    assert m["stable_rank"] > 0.2 * min(shape)


def test_planted_spikes_are_counted_and_lower_the_softrank():
    g = torch.Generator().manual_seed(8)
    kw = {"generator": g, "dtype": torch.float64}
    w = torch.randn(400, 200, **kw)
    for _ in range(3):  # three strong rank-one signals above the bulk
        w += 3.0 * torch.randn(400, 1, **kw) @ torch.randn(1, 200, **kw)
    m = matrix_esd(w).metrics
    assert m["num_spikes"] == 3
    assert m["mp_softrank"] < 0.3


def test_mp_fit_is_scale_free():
    evals = eigenvalues(torch.randn(300, 150, generator=torch.Generator().manual_seed(9)))[0]
    a, b = fit_marchenko_pastur(evals, 2.0, 150), fit_marchenko_pastur(evals * 1e4, 2.0, 150)
    assert a.softrank == pytest.approx(b.softrank) and a.bulk_max * 1e4 == pytest.approx(b.bulk_max)


def test_conv_slices_are_pooled():
    w = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    evals, n, m, slices, zeros = eigenvalues(w)
    assert (n, m, slices, zeros) == (16, 12, 9, 0) and evals.shape == (9 * 12,)
    expected = np.sort(np.concatenate([torch.linalg.svdvals(w[:, :, i, j]).numpy() ** 2
                                       for i in range(3) for j in range(3)]))
    assert np.allclose(evals, expected, rtol=1e-10)
    esd = matrix_esd(w)
    assert esd.metrics["slices"] == 9 and esd.metrics["num_evals"] == 108
    assert esd.metrics["Q"] == pytest.approx(16 / 12)
    # a conv with 4 input channels gives 4 eigenvalues per slice: too small, however many slices
    with pytest.raises(ValueError, match="each 20x4 kernel slice has 4 singular values"):
        matrix_esd(torch.randn(20, 4, 5, 5))


def test_zero_singular_values_are_counted_not_fitted():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(60, 15, generator=g, dtype=torch.float64) @ torch.randn(15, 40, generator=g).double()
    evals, n, m, _, zeros = eigenvalues(w)
    assert (n, m, zeros, evals.size) == (60, 40, 25, 15)


def test_half_precision_is_refused():
    with pytest.raises(ValueError, match="float32 or float64"):
        eigenvalues(torch.randn(20, 20), dtype=torch.float16)


class SpectralNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 24, 3, padding=1)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.block = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.depthwise(torch.relu(self.conv(x))).mean((2, 3))
        return self.head(self.block(x))


def test_model_spectrum_report_projected_and_plots(tmp_path):
    torch.manual_seed(0)
    model = SpectralNet()
    batches = [torch.randn(8, 12, 6, 6) for _ in range(4)]
    stats = collect_stats(model, batches, progress=False, meta={"model": "spectralnet"})
    report, esds = spectrum(model, stats, energy=0.999, progress=False)
    assert report["format"] == SPECTRUM_FORMAT and report["projected"] and report["model"] == "spectralnet"
    rows = {r["name"]: r for r in report["layers"]}
    assert set(rows) == {"conv", "block.0", "block.2"}  # full module names
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"depthwise", "head"}  # nothing dropped silently
    assert "grouped conv" in skipped["depthwise"] and f"fewer than {MIN_EVALS}" in skipped["head"]
    for key in ("alpha", "ks_distance", "alpha_weighted", "log_spectral_norm", "stable_rank", "mp_softrank",
                "num_spikes"):
        assert all(key in r for r in rows.values())
    assert rows["conv"]["num_evals"] == 9 * 12 and rows["conv"]["kind"] == "conv2d"
    proj = rows["block.0"]["projected"]
    assert proj["rank"] == min(proj["k_in"], proj["k_out"]) and "alpha" in proj
    assert proj["num_evals"] <= proj["rank"]
    json.dumps(report)  # plain JSON types throughout
    assert "mean over 3 layers" in format_spectrum_table(report)
    write_spectrum(report, esds, tmp_path)
    assert json.loads((tmp_path / "spectrum.json").read_text())["layers"][0]["name"] == "conv"
    assert (tmp_path / "alpha.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "esd").iterdir()) == ["block.0.png", "block.2.png", "conv.png"]


def test_weights_only_spectrum_has_no_projection():
    report, esds = spectrum(SpectralNet(), progress=False)
    assert not report["projected"] and report["energy"] is None
    assert all("projected" not in r for r in report["layers"]) and "projected" not in report["summary"]


@pytest.mark.slow
def test_spectrum_command_on_random_builtin_weights(tmp_path, capsys):
    """The command end to end, on random weights (no training): table printed, files written."""
    from utilrank_kernels.cli import main
    from utilrank_kernels.models import build_builtin

    ckpt = tmp_path / "random.safetensors"
    save_file({k: v.contiguous() for k, v in build_builtin("vit-digits").state_dict().items()}, str(ckpt))
    out = tmp_path / "out"
    assert main(["spectrum", "--checkpoint", str(ckpt), "--max-batches", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn.qkv" in printed and "data-projected at energy 0.999" in printed
    report = json.loads((out / "spectrum.json").read_text())
    assert {s["name"] for s in report["skipped"]} >= {"patch_embed.proj"}
    assert len(list((out / "esd").iterdir())) == len(report["layers"]) == 17
    # random init: near the MP null model
    assert np.mean([r["mp_softrank"] for r in report["layers"]]) > 0.7
    assert main(["spectrum", "--checkpoint", str(ckpt), "--stats", str(tmp_path / "none.safetensors"),
                 "--out", str(out)]) == 2
