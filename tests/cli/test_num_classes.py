"""A pretrained backbone on a user's classes: a 1000-class checkpoint compressed on a 3-class ImageFolder."""

import json

import pytest
import timm
import torch
from _data import make_imagefolder
from safetensors.torch import save_file

from utilrank_kernels import load_compressed
from utilrank_kernels.cli import main


@pytest.mark.slow
def test_a_1000_class_checkpoint_compresses_on_3_classes_with_num_classes(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data", per_class=4)
    backbone = timm.create_model("test_vit", pretrained=False, num_classes=1000)
    save_file(backbone.state_dict(), str(tmp_path / "in1k.safetensors"))
    out = tmp_path / "c"
    assert main(["compress", "--model", "test_vit", "--checkpoint", str(tmp_path / "in1k.safetensors"), "--data",
                 str(data), "--num-classes", "3", "--head-epochs", "1", "--finetune-epochs", "0", "--batch-size", "4",
                 "--engines", "eager", "--out", str(out)]) == 0
    assert "a new 3-class head, trained 1 epochs" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 3 and config["head_reset"] is True
    model = load_compressed(out)
    with torch.no_grad():
        assert model(torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])).shape == (2, 3)
    # the backbone is the checkpoint's (no fine-tuning here): every tensor outside the head and the factored
    # layers is kept
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("head") and "weight_" not in k}
    plan = json.loads((out / "plan.json").read_text())
    for key, value in kept.items():
        if key.rsplit(".", 1)[0] not in plan["layers"]:
            assert torch.equal(value, backbone.state_dict()[key]), key
