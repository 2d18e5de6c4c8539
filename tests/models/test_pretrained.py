"""What users have: torchvision's model zoo (``--model torchvision:NAME``, its weight files) and checkpoints without
BatchNorm ``num_batches_tracked`` counters, loaded as torch's own strict ``load_state_dict`` loads them."""

import numpy as np
import pytest
import timm.data
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from utilrank_kernels.compress.io import build_architecture
from utilrank_kernels.models import build_model, load_checkpoint
from utilrank_kernels.models import torchvision as tv
from utilrank_kernels.models.builtin import build_builtin


def _perturbed_resnet18() -> torch.nn.Module:
    """torchvision's resnet18, random weights, with BatchNorm statistics and counters that are not the defaults (a
    load that dropped them would show in the outputs)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return net.eval()


def _without_counters(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_torchvision_checkpoint_without_batchnorm_counters_loads_as_torch_loads_it(tmp_path, suffix):
    state = _without_counters(_perturbed_resnet18())
    path = tmp_path / f"resnet18{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model, config = build_model("torchvision:resnet18", path)
    reference = torchvision.models.get_model("resnet18", weights=None)
    reference.load_state_dict(state, strict=True)  # torch's own strict load accepts the missing counters
    reference.eval()
    assert config["source"] == "torchvision" and config["arch"] == "resnet18" and config["num_classes"] == 1000
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # the architecture config.json records is the same network
    rebuilt = build_architecture(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in
                                                                       model.state_dict().items()}


def test_a_builtin_checkpoint_without_counters_loads_and_a_missing_statistic_is_still_refused(tmp_path, caplog):
    torch.manual_seed(0)
    net = build_builtin("vgg-digits")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.num_batches_tracked.fill_(3)
    state = _without_counters(net)
    save_file(state, str(tmp_path / "vgg.safetensors"))
    with caplog.at_level("INFO"):
        loaded = load_checkpoint(build_builtin("vgg-digits"), tmp_path / "vgg.safetensors", "vgg-digits")
    assert "no num_batches_tracked for 4 BatchNorm layers" in caplog.text
    reference = build_builtin("vgg-digits")
    reference.load_state_dict(state, strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a BatchNorm's running mean is a statistic, not a counter: its absence is still a misfit
    del state["features.1.running_mean"]
    save_file(state, str(tmp_path / "vgg-bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing features\.1\.running_mean"):
        load_checkpoint(build_builtin("vgg-digits"), tmp_path / "vgg-bad.safetensors", "vgg-digits")


def test_a_torchvision_head_is_replaced_with_num_classes_and_the_backbone_kept(tmp_path):
    net = _perturbed_resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model, config = build_model("torchvision:resnet18", tmp_path / "r18.pth", num_classes=3, reset_head=True)
    assert config["head_reset"] is True and config["num_classes"] == 3 and model.fc.out_features == 3
    for key, value in net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert build_architecture(config).fc.out_features == 3


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "vit_b_16", "inception_v3"])
def test_torchvision_eval_transforms_are_the_weights_own(arch):
    """The recipe as timm's data config prepares an image exactly as the weights' own ``transforms()``."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 417, 3), dtype=np.uint8))
    ours = timm.data.create_transform(**tv.data_config(arch))(image)
    theirs = torchvision.models.get_model_weights(arch).DEFAULT.transforms()(image)
    assert torch.equal(ours, theirs)


def test_only_classification_models_are_torchvision_names():
    names = tv.classification_models()
    assert "resnet18" in names and "fasterrcnn_resnet50_fpn" not in names and "raft_small" not in names
    with pytest.raises(ValueError, match="list_models"):
        tv.arch_name("torchvision:fasterrcnn_resnet50_fpn")


def test_an_hf_image_classifier_keeps_its_head_on_folders_named_by_its_indices(tmp_path):
    """``hf:DIR`` with a 10-class head on an ImageFolder of 3 folders named 2, 5, 9: the head is kept, not refused."""
    pytest.importorskip("transformers")
    from _data import make_imagefolder
    from _hf import make_vit

    from utilrank_kernels.models import ModelDataError, load_model_and_data

    make_vit(tmp_path / "vit", num_labels=10)
    make_imagefolder(tmp_path / "data", classes=("2", "5", "9"), per_class=2, size=32)
    loaded = load_model_and_data(f"hf:{tmp_path / 'vit'}", str(tmp_path / "data"))
    assert loaded.data.num_classes == 10 and loaded.model.config.num_labels == 10
    labels = [int(loaded.data.train[i][1]) for i in range(len(loaded.data.train))]
    assert labels and set(labels) <= {2, 5, 9}
    make_imagefolder(tmp_path / "named", per_class=2, size=32)  # cat, dog, fox: no class of the head
    with pytest.raises(ModelDataError, match="--num-classes 3 to replace the head, or --label-map FILE"):
        load_model_and_data(f"hf:{tmp_path / 'vit'}", str(tmp_path / "named"))
