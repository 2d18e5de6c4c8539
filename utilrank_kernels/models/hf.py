"""Hugging Face transformers models from a local folder (``--model hf:DIR``), and the config that rebuilds them.

The folder is what ``save_pretrained`` writes (``config.json``, weights; a tokenizer or image processor for
the data). Nothing is downloaded: every ``from_pretrained`` is ``local_files_only=True`` (and transformers
honors ``HF_HUB_OFFLINE``). The class follows the folder's ``architectures``: a ``...ForImageClassification`` or
``...ForSequenceClassification`` head loads with its Auto class, anything else (``BertModel``, a masked-LM head)
as the bare encoder with ``AutoModel``.

The model is used as loaded, never wrapped: layer names are the model's own (``encoder.layer.0.attention.self.query``
for ``AutoModel``), so statistics and plans fit ``AutoModel.from_pretrained(DIR)`` as a user loads it. Batches
are dicts of tensors and the model is called with ``**batch`` (``data.batch.model_input``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..data.batch import call_model
from .loading import seeded_init

logger = logging.getLogger(__name__)
HF_PREFIX = "hf:"
# task -> the transformers Auto class that loads it
AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "encoder": "AutoModel",
}
_HEAD_SUFFIXES = {"ForImageClassification": "image-classification",
                  "ForSequenceClassification": "sequence-classification"}


def is_hf_name(name: object) -> bool:
    """Whether ``--model`` names a local Hugging Face folder (``hf:DIR``)."""
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(cls.__module__.startswith("transformers.") and cls.__name__ == "PreTrainedModel"
               for cls in type(model).__mro__)


def hf_directory(name: str) -> Path:
    """The folder of ``hf:DIR``; a ``FileNotFoundError`` naming it when it is no model folder."""
    directory = Path(name[len(HF_PREFIX):] if is_hf_name(name) else name).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"--model {name}: {directory} is not a Hugging Face model folder (no config.json)")
    return directory


def read_config(name: str) -> dict:
    """The folder's ``config.json`` as a dict (no transformers import: the options are checked against it before
    anything heavy loads)."""
    path = hf_directory(name) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model {name}: {path} is not JSON ({exc})") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"--model {name}: {path} has no model_type (not a transformers config)")
    return config


def num_labels(config: dict) -> int:
    """A raw ``config.json``'s number of classes (transformers' default is 2)."""
    return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def task_of(architectures: list[str] | None) -> str:
    """``image-classification``, ``sequence-classification`` or ``encoder`` from a config's ``architectures``."""
    for arch in architectures or ():
        for suffix, task in _HEAD_SUFFIXES.items():
            if arch.endswith(suffix):
                return task
    return "encoder"


def has_classification_head(model: nn.Module) -> bool:
    """Whether the model's output has class logits: every non-HF model here is a classifier; an HF model when it
    is a ``...For*Classification``."""
    return not is_hf_model(model) or task_of([type(model).__name__]) != "encoder"


def classifier(model: nn.Module) -> nn.Module:
    """The classification head of an HF ``...For*Classification`` model (``--num-classes`` trains it alone)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no .classifier module to replace")
    return head


def require_transformers():
    """The ``transformers`` module, or a one-line error saying how to install it."""
    try:
        import transformers  # optional (the [hf] extra), and seconds to import
    except ImportError as exc:
        raise ValueError("Hugging Face models need transformers: pip install 'utilrank-kernels[hf]'") from exc
    return transformers


def _auto_class(task: str):
    return getattr(require_transformers(), AUTO_CLASSES[task])


def load_hf_model(name: str, *, num_labels: int | None = None) -> tuple[nn.Module, dict]:
    """``(model, config)`` from the local folder of ``hf:DIR`` (fp32, eval mode); ``config`` (``source: "hf"``,
    ``task``, ``hf_config``: the folder's config as a dict) rebuilds the architecture without the folder.

    ``num_labels``: a classification checkpoint whose head has another number of labels gets a new, untrained
    head of ``num_labels`` (``config["head_reset"]``): transformers' ``ignore_mismatched_sizes``."""
    AutoConfig = require_transformers().AutoConfig
    directory = hf_directory(name)
    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model {name}: {directory}/config.json is not a transformers config ({exc})") from exc
    task = task_of(hf_config.architectures)
    architectures = ", ".join(hf_config.architectures or ["none"])
    if task == "encoder" and not all(a.endswith("Model") for a in hf_config.architectures or ()):
        logger.info(f"--model {name}: architectures {architectures} have no classification head: loaded as the bare "
                    "encoder (AutoModel); the head's weights are not used")
    head_reset = num_labels is not None and task != "encoder" and num_labels != hf_config.num_labels
    if num_labels is not None and task == "encoder":
        raise ValueError(f"--num-classes: --model {name} ({architectures}) has no classification head to replace")
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if head_reset else {}
    try:  # a head or pooler the checkpoint lacks is initialized from a fixed seed
        model, info = seeded_init(_auto_class(task).from_pretrained, directory, local_files_only=True,
                                   dtype=torch.float32, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"--model {name}: cannot load {AUTO_CLASSES[task]} from {directory} ({exc})") from exc
    new = sorted(set(info.get("missing_keys", ())) | {m[0] if isinstance(m, tuple) else m
                                                       for m in info.get("mismatched_keys", ())})
    if new:
        logger.warning(f"--model {name}: {len(new)} tensors are not in the checkpoint (or have another shape) and "
                       f"are randomly initialized: {', '.join(new[:6])}{' ...' if len(new) > 6 else ''}")
    config = {"arch": type(model).__name__, "source": "hf", "task": task, "hf_config": model.config.to_dict(),
              "hf_dir": str(directory.resolve())}
    if head_reset:
        config["head_reset"] = True
    return model.eval(), config


def build_hf_architecture(config: dict) -> nn.Module:
    """A randomly initialized model of a ``config.json`` written for an HF model (``hf_config``, ``task``): the
    transformers config class of its ``model_type`` from the stored dict, then the task's Auto class
    ``from_config``. No folder and no download needed. Builds on the caller's default device (``meta`` in
    ``load_compressed``)."""
    AutoConfig = require_transformers().AutoConfig
    hf = dict(config.get("hf_config") or {})
    task = config.get("task", "encoder")
    model_type = hf.pop("model_type", None)
    if not model_type or task not in AUTO_CLASSES:
        raise ValueError(f"an HF config needs hf_config.model_type and a task in {', '.join(AUTO_CLASSES)}; got "
                         f"model_type {model_type!r}, task {task!r}")
    hf_config = type(AutoConfig.for_model(model_type)).from_dict(hf)
    return _auto_class(task).from_config(hf_config)


class KeywordInputs(nn.Module):
    """Calls the wrapped model with a dict input as keyword arguments: for measurements that call ``model(x)``
    (``measure.count_flops``, ``latency_ms``) on a model that takes ``**batch``. Never used for naming (it adds a
    ``model.`` prefix)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return call_model(self.model, inputs)


class ImageProcessorTransform:
    """An HF image processor as a torchvision-style transform: PIL image -> ``pixel_values`` ``[C, H, W]``
    (a class, not a lambda, so that DataLoader workers can pickle it)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def image_transform(name: str) -> ImageProcessorTransform:
    """The transform of the folder's image processor (``preprocessor_config.json``), local only."""
    directory = hf_directory(name)
    try:
        processor = require_transformers().AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--model {name}: no image processor in {directory} (preprocessor_config.json) to prepare "
                         f"--data images: save one with AutoImageProcessor's save_pretrained ({exc})") from exc
    return ImageProcessorTransform(processor)


def tokenizer(name: str):
    """The folder's tokenizer, local only."""
    directory = hf_directory(name)
    try:
        return require_transformers().AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--model {name}: no tokenizer in {directory} (tokenizer.json, vocab.txt) for --data text: "
                         f"({exc})") from exc
