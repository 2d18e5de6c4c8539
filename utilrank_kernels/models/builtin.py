"""The built-in models: small enough to train on a 2-core CPU in about a minute, deterministic.

``vit-digits`` is a timm ``VisionTransformer`` (16x16 input, 4x4 patches, width 64, depth 4);
``vgg-digits`` is the paper's VGG11 experiment in miniature (3x3 convs, BatchNorm, max pools, an
MLP classifier).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VIT_DIGITS_KWARGS = dict(
    img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
    mlp_ratio=4.0, class_token=True, global_pool="token",
)
VGG_DIGITS_KWARGS = dict(in_chans=1, num_classes=10, widths=(32, 64, 128, 128), hidden=256)


def vit_digits(**overrides) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer  # timm: seconds to import, only when building

    return VisionTransformer(**{**VIT_DIGITS_KWARGS, **overrides})


class VGGDigits(nn.Module):
    """conv-bn-relu blocks with max pools after the 1st, 2nd and 4th, then a two-layer classifier."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths=(32, 64, 128, 128), hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i in (0, 1, len(widths) - 1):
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 2 * 2, hidden), nn.ReLU(inplace=True), nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg_digits(**overrides) -> nn.Module:
    return VGGDigits(**{**VGG_DIGITS_KWARGS, **overrides})


# name -> (constructor, default kwargs, training recipe)
BUILTIN_MODELS: dict[str, tuple[Callable[..., nn.Module], dict, dict]] = {
    "vit-digits": (vit_digits, VIT_DIGITS_KWARGS, dict(epochs=40, lr=2e-3, weight_decay=0.05, batch_size=64)),
    "vgg-digits": (vgg_digits, VGG_DIGITS_KWARGS, dict(epochs=15, lr=2e-3, weight_decay=5e-4, batch_size=64)),
}


def build_builtin(name: str, **kwargs) -> nn.Module:
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-ins are {', '.join(BUILTIN_MODELS)}")
    ctor, defaults, _ = BUILTIN_MODELS[name]
    return ctor(**{**defaults, **kwargs})
