"""A user's ImageFolder directory with a timm model, through `analyze` and `compress`."""

import json

import pytest
import timm
import torch
from _data import make_imagefolder

from utilrank_kernels.cli import main


@pytest.mark.slow
def test_analyze_timm_model_on_imagefolder(tmp_path):
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["analyze", "--model", "test_vit", "--data", str(data), "--batch-size", "4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "test_vit" and report["dataset"] == str(data)
    model = timm.create_model("test_vit")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(report["layers"]) + len(report["skipped"]) == len(layers)
    assert 0 < report["mlu"] <= 1


@pytest.mark.slow
def test_compress_timm_model_on_split_imagefolder(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=4, split=True)
    out = tmp_path / "out"
    assert main(["compress", "--model", "test_resnet", "--data", str(data), "--batch-size", "6",
                 "--no-search", "--energy", "0.9", "--finetune-epochs", "1", "--engines", "eager",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compressed"]["params"] < summary["dense"]["params"]
    from utilrank_kernels import load_compressed

    model = load_compressed(out)
    assert model.num_classes == 3
