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


def _imagenet_indexed_folder(root, model, per_split=8):
    """train/ and val/ of random images in folders named by ImageNet index: in val/, half of the images in the
    folder of the class the model predicts for them, half in the next class's, so that the dense model's own
    accuracy is neither 0 nor 1."""
    import numpy as np
    import timm.data
    from PIL import Image

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(per_split):
            image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
            with torch.no_grad():
                predicted = int(model(transform(image)[None]).argmax())
            label = predicted if split == "train" or i % 2 == 0 else (predicted + 1) % 1000
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            image.save(root / split / str(label) / f"{i}.png")
    return transform


def _accuracy_on(model, transform, folder) -> float:
    """The model's top-1 over ``folder``'s images against their class folder's index, computed here."""
    from PIL import Image

    images = sorted(folder.glob("*/*.png"))
    with torch.no_grad():
        hits = [int(model(transform(Image.open(p).convert("RGB"))[None]).argmax()) == int(p.parent.name)
                for p in images]
    return sum(hits) / len(hits)


def test_an_imagenet_indexed_folder_keeps_the_checkpoints_head_and_its_labels(tmp_path):
    """The library face of the test below (fast): the head is the checkpoint's, the labels its indices, and the
    accuracy the summary reports (``metrics.accuracy`` on the test split) the checkpoint's own."""
    from utilrank_kernels.metrics import accuracy
    from utilrank_kernels.models import load_model_and_data

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=1000).eval()
    save_file(model.state_dict(), str(tmp_path / "in1k.safetensors"))
    transform = _imagenet_indexed_folder(tmp_path / "data", model)
    lines = []
    loaded = load_model_and_data("test_vit", str(tmp_path / "data"), checkpoint=tmp_path / "in1k.safetensors",
                                 log=lines.append)
    assert any("kept the pretrained 1000-class head" in line for line in lines)
    assert loaded.data.num_classes == 1000 and loaded.config["num_classes"] == 1000
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    expected = _accuracy_on(model, transform, tmp_path / "data" / "val")
    assert 0 < expected < 1
    assert accuracy()(loaded.model, loaded.data.test) == pytest.approx(expected)


@pytest.mark.slow
def test_an_imagenet_indexed_folder_keeps_the_1000_class_head_and_reports_its_own_accuracy(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=1000).eval()
    save_file(model.state_dict(), str(tmp_path / "in1k.safetensors"))
    transform = _imagenet_indexed_folder(tmp_path / "data", model)
    out = tmp_path / "c"
    assert main(["compress", "--model", "test_vit", "--checkpoint", str(tmp_path / "in1k.safetensors"), "--data",
                 str(tmp_path / "data"), "--finetune-epochs", "0", "--batch-size", "4", "--engines", "eager",
                 "--target-params", "0.7", "--out", str(out)]) == 0
    assert "kept the pretrained 1000-class head (class folders named by the head's class index)" in \
        capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 1000 and "head_reset" not in config
    # the dense accuracy, independently: the checkpoint's argmax over val/ (the test split here) against the folder
    expected = _accuracy_on(model, transform, tmp_path / "data" / "val")
    assert 0 < expected < 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_split"] == "val" and summary["dense"]["accuracy"] == pytest.approx(expected)
