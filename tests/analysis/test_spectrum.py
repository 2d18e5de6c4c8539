"""Spectra of a model: which layers, conv pooling, the projected W', the report, plots, the command."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from utilrank_kernels._files import write_json
from utilrank_kernels.analysis import collect_stats
from utilrank_kernels.analysis.esd import ESDOptions
from utilrank_kernels.analysis.spectrum import SPECTRUM_FORMAT, spectrum
from utilrank_kernels.cli.spectrum import format_spectrum_table
from utilrank_kernels.plots import plot_alpha, plot_esds

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert report["definitions"] == ESDOptions().to_dict()
    rows = {r["name"]: r for r in report["layers"]}
    # WeightWatcher's rules: the depthwise conv's 24x1 slices pool to 9 eigenvalues (>= min_evals 8), the
    # 5x32 head has 5
    assert set(rows) == {"conv", "depthwise", "block.0", "block.2"}  # full module names
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"head"}  # nothing dropped silently
    assert "5 eigenvalues (fewer than min_evals 8)" in skipped["head"]
    for key in ("alpha", "ks_distance", "alpha_weighted", "log_spectral_norm", "stable_rank", "mp_softrank",
                "num_spikes"):
        assert all(key in r for r in rows.values())
    assert rows["conv"]["num_evals"] == 9 * 12 and rows["conv"]["kind"] == "conv2d"
    assert rows["depthwise"]["num_evals"] == 9 and "reason" in rows["depthwise"]["projected"]
    proj = rows["block.0"]["projected"]
    assert proj["rank"] == min(proj["k_in"], proj["k_out"]) and "alpha" in proj
    assert proj["num_evals"] == proj["rank"] and proj["scale"] == 1.0
    json.dumps(report)  # plain JSON types throughout
    assert "mean over 4 layers" in format_spectrum_table(report)
    write_json(tmp_path / "spectrum.json", report)  # what `utilrank spectrum` saves and draws
    plot_alpha(report, tmp_path / "alpha.png")
    plot_esds(report, esds, tmp_path / "esd")
    assert json.loads((tmp_path / "spectrum.json").read_text())["layers"][0]["name"] == "conv"
    assert (tmp_path / "alpha.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "esd").iterdir()) == ["block.0.png", "block.2.png", "conv.png",
                                                                    "depthwise.png"]


def test_project_definitions_skip_grouped_convs_and_small_slices():
    report, _ = spectrum(SpectralNet(), options=ESDOptions.utilrank(), progress=False)
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"depthwise", "head"}
    assert "grouped conv" in skipped["depthwise"] and "fewer than min_evals 8" in skipped["head"]
    assert "definitions differ from WeightWatcher's: ks=two-sided" in format_spectrum_table(report)


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
    # WeightWatcher's pooled count: the patch embedding's 16 slices of 64x1 give 16 eigenvalues (>= 8)
    assert report["skipped"] == [] and report["layers"][0]["name"] == "patch_embed.proj"
    assert len(list((out / "esd").iterdir())) == len(report["layers"]) == 18
    # random init: near the MP null model
    assert np.mean([r["mp_softrank"] for r in report["layers"]]) > 0.7
    assert main(["spectrum", "--checkpoint", str(ckpt), "--stats", str(tmp_path / "none.safetensors"),
                 "--out", str(out)]) == 2
