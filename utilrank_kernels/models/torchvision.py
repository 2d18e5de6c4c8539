"""torchvision's classification models (``--model torchvision:NAME``): the architecture from torchvision's model
zoo (``torchvision.models.get_model(NAME, weights=None)``: nothing is downloaded), its weights from ``--checkpoint``
(a ``.safetensors`` file, or a torch file read with ``weights_only=True``: torchvision's own ``.pth`` files), and its
eval transforms from the weights' recipe (``resize_size``, ``crop_size``, interpolation, mean and std), expressed as
timm's eval transforms so that export and bench prepare images the same way."""

from __future__ import annotations

import math

from torch import nn

TORCHVISION_PREFIX = "torchvision:"
# torchvision's ImageNet recipe, for an architecture without registered weights
_DEFAULT_RECIPE = {"crop": 224, "resize": 256, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225)}


def is_torchvision_name(name: object) -> bool:
    """Whether ``--model`` names a torchvision model (``torchvision:NAME``)."""
    return isinstance(name, str) and name.startswith(TORCHVISION_PREFIX)


def classification_models() -> list[str]:
    """The names of torchvision's image classification models (``torchvision.models.list_models`` of the
    classification module: no detection, segmentation, video or quantized models)."""
    import torchvision.models  # torchvision: only for its models

    return torchvision.models.list_models(module=torchvision.models)


def arch_name(name: str) -> str:
    """``NAME`` of ``torchvision:NAME``, checked: a ``ValueError`` naming the way to list the names where it is
    not a torchvision classification model."""
    arch = name[len(TORCHVISION_PREFIX):] if is_torchvision_name(name) else name
    if arch not in classification_models():
        raise ValueError(f"--model {name}: {arch!r} is not a torchvision classification model (list them: python -c "
                         "\"import torchvision; print(torchvision.models.list_models(module=torchvision.models))\")")
    return arch


def build_torchvision(arch: str, **kwargs) -> nn.Module:
    """The randomly initialized architecture (``weights=None``: torchvision downloads nothing)."""
    import torchvision.models  # torchvision: only for its models

    return torchvision.models.get_model(arch, weights=None, **kwargs)


def classifier_name(model: nn.Module) -> str | None:
    """The classifier of a torchvision model: its last ``nn.Linear`` (``fc``, ``classifier.1``, ``heads.head``)."""
    return next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)


def num_classes(model: nn.Module) -> int | None:
    """The classes of the model's head (its last linear layer's outputs)."""
    name = classifier_name(model)
    return model.get_submodule(name).out_features if name else None


def recipe(arch: str) -> dict:
    """The eval transforms of ``arch``'s default weights (their ``transforms()``: an object, nothing downloaded),
    or torchvision's ImageNet recipe where the architecture has no registered weights."""
    import torchvision.models  # torchvision: only for its models

    try:
        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        return dict(_DEFAULT_RECIPE)
    return {"crop": int(transforms.crop_size[0]), "resize": int(transforms.resize_size[0]),
            "interpolation": transforms.interpolation.value, "mean": tuple(transforms.mean),
            "std": tuple(transforms.std)}


def data_config(arch: str) -> dict:
    """``recipe(arch)`` as timm's data config (``timm.data.create_transform``'s arguments): resize the short side to
    ``resize``, center-crop ``crop``; ``crop_pct`` is chosen so that timm's ``floor(crop / crop_pct)`` is
    ``resize``."""
    r = recipe(arch)
    crop_pct = r["crop"] / r["resize"]
    if math.floor(r["crop"] / crop_pct) != r["resize"]:  # a float that rounds below: nudge it down
        crop_pct = math.nextafter(crop_pct, 0.0)
    return {"input_size": (3, r["crop"], r["crop"]), "interpolation": r["interpolation"], "mean": r["mean"],
            "std": r["std"], "crop_pct": crop_pct, "crop_mode": "center"}
