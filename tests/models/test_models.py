"""Model building: random initializations are seeded, so built-ins train to the same weights everywhere."""

import torch

from utilrank_kernels.models.builtin import build_builtin
from utilrank_kernels.models.loading import build_model, seeded_init


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_random_init_ignores_and_keeps_the_callers_random_state():
    torch.manual_seed(1)
    first = seeded_init(build_builtin, "vit-digits")
    after_build = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_build)  # the caller's generator did not move
    torch.manual_seed(2)
    assert _same_weights(first, seeded_init(build_builtin, "vit-digits"))
    torch.manual_seed(3)
    timm_a, _ = build_model("test_vit", num_classes=3)
    torch.manual_seed(4)
    timm_b, _ = build_model("test_vit", num_classes=3)
    assert _same_weights(timm_a, timm_b)


def test_a_pickled_checkpoint_is_refused_in_one_line_without_torchs_advice(tmp_path):
    """A torch file holding pickled objects is refused naming them, with this package's advice (safetensors), never
    torch's (to allowlist globals or load with weights_only=False: both run the file's code)."""
    import pytest

    from utilrank_kernels.models import load_state_dict_file

    torch.save({"w": torch.zeros(2), "code": print}, tmp_path / "objects.pt")
    (tmp_path / "damaged.pt").write_bytes((tmp_path / "objects.pt").read_bytes()[:60])
    for name, words in (("objects.pt", ("(print)", "pickled Python objects", ".safetensors")),
                        ("damaged.pt", ("damaged or truncated",))):
        with pytest.raises(ValueError) as info:
            load_state_dict_file(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and str(tmp_path / name) in message and all(w in message for w in words), message
        assert "weights_only=False" not in message and "safe_globals" not in message and "likely" not in message


def test_the_config_records_the_input_and_its_preprocessing(tmp_path):
    """What a compressed folder's config.json says the model takes: timm's data config for a timm model on an
    ImageFolder (size, mean, std, interpolation, crop), the digits' normalization for a model of the digits."""
    from _data import make_imagefolder

    from utilrank_kernels.data.datasets import DIGITS_MEAN, DIGITS_STD
    from utilrank_kernels.models import load_model_and_data

    images = make_imagefolder(tmp_path / "img", per_class=3, size=16)
    loaded = load_model_and_data("test_vit", str(images))
    spec = loaded.config["input"]
    assert spec["kind"] == "image" and spec["names"] == ["input"] and spec["preprocessing"] == "timm"
    assert spec["size"] == [3, 160, 160] and len(spec["mean"]) == len(spec["std"]) == 3
    assert spec["interpolation"] == "bicubic" and 0 < spec["crop_pct"] <= 1 and spec["crop_mode"] == "center"
    digits = load_model_and_data("test_vit", "digits").config["input"]
    assert digits == {"kind": "image", "names": ["input"], "size": [1, 16, 16], "mean": [DIGITS_MEAN],
                      "std": [DIGITS_STD], "interpolation": "bilinear", "preprocessing": "digits"}
