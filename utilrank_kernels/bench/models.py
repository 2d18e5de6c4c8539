"""What ``utilrank bench`` times: a compressed folder and its dense twin, a synthetic cut to a parameter
ratio, or the built-in compressed in-process."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..compress import CompressConfig, Plan, build_architecture, compress_model, expand
from ..data import load_data
from ..data.datasets import DIGITS_SIZE
from ..data.text import DEFAULT_MAX_LENGTH
from ..models import BUILTIN_MODELS, build_model
from ..nn import fuse_lowrank_mlps
from ..train import TrainRecipe
from .engines import TokenInput, example_input


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




def input_spec(model: nn.Module, config: dict) -> tuple[int, int, int] | TokenInput:
    """What one input of a compressed folder's model is, from its ``config.json``: ``input`` where recorded
    (``(C, H, W)`` of an image model; a ``TokenInput`` of ``max_length`` tokens for a text model); for a folder
    written before ``input`` was recorded, an HF model's ``hf_config`` (``num_channels`` and ``image_size``, or
    its vocabulary and positions), else ``input_size``'s built-in or timm size."""
    spec = config.get("input")
    if isinstance(spec, dict) and spec.get("kind") == "text":
        return TokenInput(spec["max_length"], spec["vocab_size"], spec.get("names") or ("input_ids", "attention_mask"))
    if isinstance(spec, dict) and spec.get("kind") == "image":
        channels, height, width = spec["size"]
        return channels, height, width
    if config.get("source") == "hf":
        hf = config.get("hf_config") or {}
        if "num_channels" in hf and "image_size" in hf:
            size = hf["image_size"]
            height, width = (size, size) if isinstance(size, int) else size
            return hf["num_channels"], height, width
        positions = hf.get("max_position_embeddings") or hf.get("n_positions") or DEFAULT_MAX_LENGTH
        if not hf.get("vocab_size"):
            raise ValueError(f"config.json of {config.get('arch')}: no input recorded and no hf_config.vocab_size to "
                             "draw token ids from")
        return TokenInput(min(positions, DEFAULT_MAX_LENGTH), hf["vocab_size"])
    return input_size(model, config["arch"], config)


def max_positions(config: dict) -> int | None:
    """The longest token sequence an HF text model takes (``max_position_embeddings`` / ``n_positions``)."""
    hf = config.get("hf_config") or {}
    positions = hf.get("max_position_embeddings") or hf.get("n_positions")
    return positions if isinstance(positions, int) and not isinstance(positions, bool) else None


def in_channels(config: dict) -> int | None:
    """The channels an image model takes, where ``config.json`` says (``input.size``, ``model_kwargs.in_chans``,
    an HF ``num_channels``)."""
    spec = config.get("input")
    if isinstance(spec, dict) and spec.get("kind") == "image":
        return spec["size"][0]
    if "in_chans" in config.get("model_kwargs", {}):
        return config["model_kwargs"]["in_chans"]
    if config.get("arch") in BUILTIN_MODELS:
        return BUILTIN_MODELS[config["arch"]][1].get("in_chans")
    return (config.get("hf_config") or {}).get("num_channels")


def check_input_size(given: Sequence[int], dense: nn.Module, spec: tuple[int, int, int] | TokenInput,
                     config: dict | None = None) -> tuple[int, int, int] | TokenInput:
    """An input size a user gave, checked against the model whose own is ``spec``: its count of numbers (C,H,W for
    an image model, the tokens per example for a text one), the channels or positions where ``config`` knows them,
    then one run of ``dense`` on a batch of one; ``ValueError`` says what does not fit."""
    if isinstance(spec, TokenInput):
        positions = max_positions(config or {})
        if len(given) != 1:
            raise ValueError(f"a text model takes one number, the tokens per example (its default {spec.length})")
        if positions is not None and given[0] > positions:
            raise ValueError(f"the model has {positions} positions (max_position_embeddings)")
        shape = TokenInput(given[0], spec.vocab_size, spec.names)
    else:
        if len(given) != 3:
            raise ValueError(f"an image model takes C,H,W (three numbers; its default {','.join(map(str, spec))})")
        channels = in_channels(config) if config else spec[0]
        if channels is not None and given[0] != channels:
            raise ValueError(f"the model takes {channels} input channel{'s' if channels != 1 else ''}, not {given[0]}")
        shape = tuple(given)
    try:
        with torch.inference_mode():
            dense.eval()(example_input(shape, 1))
    except Exception as exc:  # a size the model cannot take: its own error, first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"the model does not run on it ({first})") from exc
    return shape
