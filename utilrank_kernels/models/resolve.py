"""A model and its data from plain names: what ``--model``, ``--checkpoint``, ``--data`` and ``--num-classes``
name on the command line, resolved the same way in a notebook::

    from utilrank_kernels.models import load_model_and_data

    loaded = load_model_and_data("hf:bert-small", "text:lines.txt", max_length=64)
    loaded.model, loaded.data.train, loaded.config

A model is a built-in (``vit-digits``, ``vgg-digits``), a timm name or ``torchvision:NAME`` (with ``checkpoint``
weights) or ``hf:DIR``, a local Hugging Face folder whose tokenizer or image processor prepares the data. A problem
with the names is one ``ModelDataError`` line (the command exits 2 on it).

A pretrained head is kept where an ImageFolder's class folders name its classes (by index, by WordNet id, or by
``label_map``: ``data.datasets.head_labels``): the labels become the head's indices and the dense model's accuracy
is its own; ``num_classes`` trains a new head instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import DataSplits, load_data, load_imagefolder_splits, load_text_splits
from ..data.datasets import DIGITS_MEAN, DIGITS_SIZE, DIGITS_STD
from ..data.text import DEFAULT_MAX_LENGTH, is_text_data
from ..measure import count_params
from ..train import train_head
from . import hf
from . import torchvision as tv
from .builtin import BUILTIN_MODELS
from .loading import build_model, checkpoint_head_classes

Log = Callable[[str], None]


class ModelDataError(ValueError):
    """A model, checkpoint or data name that does not resolve (a missing file, a misfit, an unknown name): one
    line naming the option."""


@dataclass(frozen=True)
class ModelAndData:
    """The model (eval mode, on the device asked for), its train/val/test splits, and the ``config`` that rebuilds
    the architecture (``arch``, ``source``: builtin, timm or hf, ...; saved as a compressed folder's
    ``config.json``)."""

    model: nn.Module
    data: DataSplits
    config: dict


def load_model_and_data(
    model: str, data: str | None = None, *, checkpoint: str | Path | None = None, num_classes: int | None = None,
    head_epochs: int = 5, max_length: int | None = None, label_map: str | Path | None = None,
    device: str | torch.device = "cpu", log: Log | None = None,
) -> ModelAndData:
    """The model named ``model`` with ``checkpoint``'s weights, and the data ``data`` names (``None``: the
    built-in digits; an ImageFolder directory; ``text:FILE`` with an ``hf:DIR`` model).

    ``num_classes``: the checkpoint's classifier has other classes than the data: it is replaced by a new head,
    trained ``head_epochs`` epochs with the backbone frozen. ``label_map``: a JSON file of class folder -> index of
    the checkpoint's head, which is kept (folders named by index or WordNet id need none). ``max_length``: tokens
    per line of text data (default 128, or the model's positions if fewer). ``log`` gets a line per step (the
    command prints them)."""
    log = log or (lambda line: None)
    device = torch.device(device)
    # a line before the imports and the load (timm, scikit-learn: seconds on a small machine)
    log(f"loading --model {model}" + (f" and --data {data}" if data else "") + " ...")
    if label_map is not None and not Path(label_map).is_file():
        raise ModelDataError(f"--label-map {label_map}: no such file")
    if label_map is not None and num_classes is not None:
        raise ModelDataError(f"--label-map {label_map} keeps the pretrained head, --num-classes {num_classes} "
                             "replaces it: give one")
    try:
        net, config, splits = _load(model, data, checkpoint, num_classes, max_length, label_map, device, log)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ModelDataError(str(exc).strip("'\"")) from exc
    check_finite(net, f"--checkpoint {checkpoint}" if checkpoint else f"--model {model}")
    net = net.to(device)
    log(("" if model in BUILTIN_MODELS else f"{model}: {count_params(net):,} parameters; ")
        + f"data {splits.name}: {len(splits.train):,} train, {len(splits.val):,} val, {len(splits.test):,} test")
    if config.get("head_reset"):  # a fresh classifier: trained first, so that a search measures a real model
        log(f"--num-classes {num_classes}: a new {num_classes}-class head, trained {head_epochs} epochs with the "
            "backbone frozen")
        head = hf.classifier(net) if hf.is_hf_model(net) else net.get_classifier()
        train_head(net, splits.train, head, epochs=head_epochs, device=device)
    elif num_classes is not None:
        log(f"--num-classes {num_classes}: the checkpoint's head already has {num_classes} classes; kept")
    elif getattr(splits, "head_labels", ""):
        log(f"kept the pretrained {splits.num_classes}-class head ({splits.head_labels}): labels are its class "
            "indices and the dense accuracy is the pretrained model's own")
    return ModelAndData(net, splits, config)


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse weights that hold NaN or Inf, naming the tensor (before they poison every statistic after it)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelDataError(f"{source}: {name} holds NaN or Inf")


def _load(model: str, data: str | None, checkpoint, num_classes: int | None, max_length: int | None, label_map,
          device: torch.device, log: Log) -> tuple[nn.Module, dict, DataSplits]:
    if hf.is_hf_name(model):
        return _load_hf(model, data, checkpoint, num_classes, max_length, label_map)
    if is_text_data(data):
        raise ValueError(f"--data {data}: text needs a tokenizer: give --model hf:DIR (a Hugging Face model folder "
                         "with one)")
    if label_map is not None and data in (None, "digits"):
        raise ValueError(f"--label-map {label_map}: maps the class folders of an ImageFolder --data; the digits "
                         "have their own 10 classes")
    if model in BUILTIN_MODELS:
        return _load_builtin(model, data, checkpoint, num_classes, device, log)
    return _load_timm(model, data, checkpoint, num_classes, label_map)


def digits_input(names: list[str] | None = None) -> dict:
    """``config.json``'s ``input`` for a model of the built-in digits: 1x16x16, normalized by the digits' mean and
    std (``data.datasets.load_digits_splits``: 8x8 images / 16, bilinear to 16x16)."""
    return {"kind": "image", "names": names or ["input"], "size": [1, DIGITS_SIZE, DIGITS_SIZE],
            "mean": [DIGITS_MEAN], "std": [DIGITS_STD], "interpolation": "bilinear", "preprocessing": "digits"}


def timm_input(net: nn.Module, data_config: dict | None = None) -> dict:
    """``config.json``'s ``input`` for a timm model on an ImageFolder: timm's data config (input size, mean, std,
    interpolation, crop), the eval transforms its data went through (``data_config`` where given: a torchvision
    model's recipe as timm's data config)."""
    import timm.data  # seconds to import: only for a timm model

    data_config = data_config or timm.data.resolve_data_config({}, model=net)
    spec = {"kind": "image", "names": ["input"], "size": [int(v) for v in data_config["input_size"]],
            "mean": [float(v) for v in data_config["mean"]], "std": [float(v) for v in data_config["std"]],
            "interpolation": data_config.get("interpolation"), "crop_pct": data_config.get("crop_pct"),
            "crop_mode": data_config.get("crop_mode"), "preprocessing": "timm"}
    return {k: v for k, v in spec.items() if v is not None}


def _load_builtin(model: str, data: str | None, checkpoint, num_classes: int | None, device: torch.device,
                  log: Log) -> tuple[nn.Module, dict, DataSplits]:
    if data not in (None, "digits"):
        raise ValueError(f"--model {model} is built for the digits data (1x16x16); with --data {data} use a timm "
                         "model name")
    if num_classes is not None:
        raise ValueError(f"--num-classes: the built-in {model} already has the digits' 10 classes")
    net, config = build_model(model, checkpoint, device=str(device))
    log(f"{model}: {count_params(net):,} parameters")  # the data takes seconds more
    return net, {**config, "input": digits_input()}, load_data(data, net)


def _load_timm(model: str, data: str | None, checkpoint, num_classes: int | None,
               label_map) -> tuple[nn.Module, dict, DataSplits]:
    """A timm or ``torchvision:NAME`` model on the digits or an ImageFolder."""
    torchvision = tv.is_torchvision_name(model)
    tv_config = tv.data_config(tv.arch_name(model)) if torchvision else None
    if data in (None, "digits"):
        if torchvision:
            raise ValueError(f"--data {data or 'digits'}: the digits are 1x16x16 images; --model {model} takes "
                             "3-channel images: give --data an ImageFolder directory")
        splits = load_data(data)
        shape = {"in_chans": splits.in_chans, "img_size": splits.img_size}
    else:  # timm's eval transforms come from the model's config: a meta-device copy is enough
        with torch.device("meta"):
            probe, _ = build_model(model)
        head = _pretrained_head(probe, checkpoint, num_classes)
        if tv_config is not None:
            import timm.data  # seconds to import: only for an ImageFolder

            splits = load_imagefolder_splits(data, transform=timm.data.create_transform(**tv_config),
                                             img_size=tv_config["input_size"][-1], head_classes=head,
                                             label_map=label_map)
        else:
            splits = load_imagefolder_splits(data, probe, head_classes=head, label_map=label_map)
        shape = {}
    _check_num_classes(num_classes, splits)
    if num_classes is not None and checkpoint is None:
        raise ValueError("--num-classes replaces a checkpoint's classifier: give --checkpoint")
    net, config = build_model(model, checkpoint, num_classes=splits.num_classes or None,
                              reset_head=num_classes is not None, **shape)
    spec = digits_input() if shape else timm_input(net, tv_config)
    return net, {**config, "input": spec}, splits


def _check_num_classes(num_classes: int | None, splits: DataSplits) -> None:
    """``--num-classes`` (a new head, trained on the labels) fits the data: as many classes, and labels at all."""
    if num_classes is None:
        return
    if not splits.num_classes:
        raise ValueError(f"--num-classes {num_classes}: --data {splits.name} has no class folders (unlabelled "
                         "images), and a new head trains on labels; drop --num-classes to keep the model's head")
    if num_classes != splits.num_classes:
        raise ValueError(f"--num-classes {num_classes}: the data has {splits.num_classes} classes")


def _pretrained_head(probe: nn.Module, checkpoint, num_classes: int | None) -> int | None:
    """The classes of the checkpoint's head, which an ImageFolder whose folders name them keeps; None where there
    is no pretrained head to keep (no checkpoint, or ``--num-classes`` asks for a new one)."""
    if checkpoint is None or num_classes is not None:
        return None
    return checkpoint_head_classes(probe, checkpoint)


def _load_hf(model: str, data: str | None, checkpoint, num_classes: int | None,
             max_length: int | None, label_map=None) -> tuple[nn.Module, dict, DataSplits]:
    """``hf:DIR``: the folder's model with ``text:FILE`` (its tokenizer), an ImageFolder (its image processor) or
    the built-in digits (a model configured for 1x16x16 images). The folder is checked first (custom code,
    encoder-decoders, missing or truncated weights), then the data (the tokenizer against the embedding), then the
    model loads."""
    if checkpoint is not None:
        raise ValueError(f"--checkpoint: --model {model} loads the weights of its folder; give no --checkpoint")
    hf_config = hf.read_config(model)
    hf.check_model_type(model, hf_config)
    hf.check_weights(model)
    labels = hf.num_labels(hf_config)
    task = hf.task_of(hf_config.get("architectures"))
    head = labels if task == "image-classification" and num_classes is None else None
    if label_map is not None and (is_text_data(data) or data in (None, "digits")):
        raise ValueError(f"--label-map {label_map}: maps the class folders of an ImageFolder --data")
    splits, spec = _hf_data(model, hf_config, data, max_length, head, label_map)
    _check_num_classes(num_classes, splits)
    if task != "encoder" and splits.num_classes and labels != splits.num_classes and num_classes is None:
        raise ValueError(f"--model {model} has a {labels}-class head ({task}), --data {data} has "
                         f"{splits.num_classes} classes: give --num-classes {splits.num_classes} to replace the head"
                         + (", or --label-map FILE (JSON: class folder -> head index) to keep it" if head else ""))
    net, config = hf.load_hf_model(model, num_labels=num_classes)
    return net, {**config, "input": spec}, splits


def _hf_data(model: str, hf_config: dict, data: str | None, max_length: int | None, head: int | None = None,
             label_map=None) -> tuple[DataSplits, dict]:
    """The data of an ``hf:DIR`` model, prepared by the folder's tokenizer or image processor, and the input spec
    ``config.json`` records for it."""
    image_model = "num_channels" in hf_config and "image_size" in hf_config
    if data is None:
        raise ValueError(f"--model {model}: give --data: " + (
            "an ImageFolder directory (or digits for a 1x16x16 model)" if image_model else "text:FILE (one example "
            "per line)"))
    if is_text_data(data):
        if image_model:
            raise ValueError(f"--data {data}: --model {model} takes images, not text")
        positions = hf_config.get("max_position_embeddings", hf_config.get("n_positions"))
        positions = positions if isinstance(positions, int) and not isinstance(positions, bool) else None
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(f"--max-length {max_length}: --model {model} has {positions} positions "
                             "(max_position_embeddings)")
        length = max_length or min(positions or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        tokenizer = hf.tokenizer(model)
        hf.check_vocabulary(model, tokenizer, hf_config)
        return load_text_splits(data, tokenizer, length), hf.text_input(tokenizer, length)
    if data == "digits":
        shape = (hf_config.get("num_channels"), hf_config.get("image_size"))
        if shape != (1, 16):
            raise ValueError(f"--data digits: the digits are 1x16x16 images; --model {model} takes "
                             f"num_channels {shape[0]}, image_size {shape[1]}")
        return load_data("digits"), digits_input(["pixel_values"])
    if not image_model:
        raise ValueError(f"--data {data}: --model {model} takes text: give --data text:FILE")
    size = hf_config["image_size"]
    transform = hf.image_transform(model)
    splits = load_imagefolder_splits(data, transform=transform, img_size=size if isinstance(size, int) else size[0],
                                     head_classes=head, label_map=label_map)
    return splits, hf.image_input(transform, hf_config)
