"""What ``utilrank bench`` times: a compressed folder and its dense twin, a synthetic cut to a parameter
ratio, or the built-in compressed in-process."""

from __future__ import annotations

from torch import nn

from ..compress import CompressConfig, Plan, build_architecture, compress_model, expand
from ..data import load_data
from ..data.datasets import DIGITS_SIZE
from ..models import BUILTIN_MODELS, build_model
from ..nn import fuse_lowrank_mlps
from ..train import TrainRecipe


def cut_to_ratio(model: nn.Module, ratio: float, multiple: int = 16, arch: str | None = None) -> tuple[nn.Module, Plan]:
    """A copy of ``model`` with every ``nn.Linear`` / ``nn.Conv2d`` (groups = 1) factored to keep at most
    ``ratio`` of its weights (``compress.uniform_plan``), MLPs fused, and its plan. The factors are the
    weights' truncated SVD (timing depends on the ranks, not on the values; no data needed)."""
    config = CompressConfig(method="svd", param_fraction=ratio, rank_multiple=multiple, tolerance=None,
                            finetune=TrainRecipe(epochs=0))
    result = compress_model(model, None, config, arch=arch or type(model).__name__, score=False, progress=False)
    fuse_lowrank_mlps(result.model)
    return result.model.eval(), result.plan


def dense_twin(compressed: nn.Module, plan: Plan, config: dict) -> nn.Module:
    """The architecture of ``config`` with every factored layer of ``compressed`` multiplied back into a
    dense weight: the dense model that computes what ``compressed`` computes."""
    dense = build_architecture(config)
    dense.load_state_dict(expand(compressed.state_dict(), plan), strict=True)
    return dense.eval()


def compress_builtin(name: str, energy: float = 0.99) -> tuple[nn.Module, nn.Module, Plan]:
    """``(dense, compressed, plan)``: the trained built-in factored in-process on its data at ``energy`` (no
    search, no fine-tuning: timing depends on the ranks), MLPs fused."""
    model, _ = build_model(name)
    config = CompressConfig(energy=energy, tolerance=None, finetune=TrainRecipe(epochs=0))
    result = compress_model(model, load_data(None, model), config, arch=name, device="cpu", score=False,
                            progress=False)
    fuse_lowrank_mlps(result.model)
    return model.eval(), result.model.eval(), result.plan


def input_size(model: nn.Module, name: str, config: dict | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input: the digits' size for built-ins, timm's pretrained config otherwise."""
    arch = (config or {}).get("arch", name)
    if arch in BUILTIN_MODELS:
        kwargs = {**BUILTIN_MODELS[arch][1], **(config or {}).get("model_kwargs", {})}
        size = kwargs.get("img_size", DIGITS_SIZE)
        return kwargs.get("in_chans", 1), size, size
    import timm.data  # seconds to import: only for timm models

    channels, height, width = timm.data.resolve_data_config({}, model=model)["input_size"]
    kwargs = (config or {}).get("model_kwargs", {})  # timm's pretrained config does not follow these overrides
    img = kwargs.get("img_size", (height, width))
    height, width = (img, img) if isinstance(img, int) else img
    return kwargs.get("in_chans", channels), height, width


