"""Hugging Face transformers models from a local folder (``--model hf:DIR``), and the config that rebuilds them.

The folder is what ``save_pretrained`` writes (``config.json``, weights; a tokenizer or image processor for
the data). Nothing is downloaded: every ``from_pretrained`` is ``local_files_only=True`` (and transformers
honors ``HF_HUB_OFFLINE``). No code from the folder runs: every load passes ``trust_remote_code=False``, and a
folder whose JSON files name custom code (``auto_map``, a ``module.Class`` of a ``.py`` file beside them) is refused
by ``read_config`` before transformers is imported. The folder is checked before anything loads
(``read_config``, ``check_weights``): encoder-decoders (T5) are refused in one line, and so are weights that are
missing or truncated, a missing tokenizer, and a tokenizer whose vocabulary exceeds the embedding's rows.

transformers' ``Conv1D`` (GPT-2, GPT, ImageGPT: a linear layer whose weight is stored transposed, ``(in, out)``)
is replaced by the ``nn.Linear`` it computes (``conv1d_to_linear``: weight transposed, same outputs) when the model
is loaded and when ``config.json`` rebuilds it, so such layers are analyzed and factored as any linear layer; a
compressed folder's ``model.safetensors`` holds their weights in ``nn.Linear``'s ``(out, in)`` layout.

The class follows the folder's ``architectures``: a ``...ForImageClassification`` or
``...ForSequenceClassification`` head loads with its Auto class, anything else (``BertModel``, a masked-LM head)
as the bare encoder with ``AutoModel``.

The model is used as loaded, never wrapped: layer names are the model's own (``encoder.layer.0.attention.self.query``
for ``AutoModel``), so statistics and plans fit ``AutoModel.from_pretrained(DIR)`` as a user loads it. Batches
are dicts of tensors and the model is called with ``**batch`` (``data.batch.model_input``).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .._files import open_safetensors
from ..data.batch import call_model
from ..layers import swap_modules
from .loading import seeded_init, torch_load_problem

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
# the files of a folder's tokenizer or image processor: copied into a compressed folder's preprocessing/
PREPROCESSING_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                       "tokenizer.model", "preprocessor_config.json", "processor_config.json")
# a tokenizer's vocabulary: without one of these, transformers builds a tokenizer of the special tokens alone
# and every word becomes [UNK]
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_CODE_KEYS = ("auto_map", "custom_pipelines")  # what transformers reads as "run the code of this folder"
_MAX_JSON_BYTES = 64 << 20  # a config is kilobytes; a tokenizer.json megabytes
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbers


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
    """The folder's ``config.json`` as a dict, checked before transformers is imported: JSON of an object with a
    ``model_type``, no custom code named by any of the folder's JSON files (``refuse_custom_code``), not an
    encoder-decoder (T5, BART: their forward needs decoder inputs this package does not feed)."""
    directory = hf_directory(name)
    path = directory / "config.json"
    config = _read_json(name, path)
    refuse_custom_code(name, directory)
    if not isinstance(config, dict) or "model_type" not in config:
        got = "an object without model_type" if isinstance(config, dict) else f"JSON of type {type(config).__name__}"
        raise ValueError(f"--model {name}: {path} is not a transformers config (expected an object with "
                         f"model_type, got {got})")
    if not isinstance(config["model_type"], str) or not config["model_type"]:
        raise ValueError(f"--model {name}: {path}: model_type must be a name, got {config['model_type']!r}")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ValueError(f"--model {name}: {path}: architectures must be a list of class names, got "
                         f"{architectures!r} (a {type(architectures).__name__})")
    if config.get("is_encoder_decoder"):
        raise ValueError(f"--model {name}: {config['model_type']} ({', '.join(architectures or ['no architectures'])}) "
                         "is an encoder-decoder model (is_encoder_decoder in config.json): not supported; use an "
                         "encoder-only or decoder-only model")
    return config


def _read_json(name: str, path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model {name}: {path} is not JSON ({' '.join(str(exc).split())})") from exc


def _code_references(doc, modules: set[str], where: str = "") -> list[str]:
    """Where ``doc`` (a JSON value) names custom code: an ``auto_map`` / ``custom_pipelines`` key, or a string
    ``module.Class`` (``repo--module.Class``) whose ``module.py`` is in the folder (``modules``)."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            at = f"{where}.{key}" if where else str(key)
            if key in _CODE_KEYS:
                found.append(f"{at}: {json.dumps(value)[:80]}")
            else:
                found += _code_references(value, modules, at)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += _code_references(value, modules, f"{where}[{i}]")
    elif isinstance(doc, str):
        match = re.fullmatch(r"(?:[\w.-]+--)?([\w]+)\.[A-Za-z_]\w*", doc)
        if match and match.group(1) in modules:
            found.append(f"{where}: {doc} (in {match.group(1)}.py)")
    return found


def refuse_custom_code(name: str, directory: Path) -> None:
    """A ``ValueError`` where one of the folder's JSON files names code to run (transformers' ``auto_map``,
    ``custom_pipelines``, or a class of a ``.py`` file beside it): such a folder is refused before transformers
    sees it, whatever the user would answer to its prompt. Every load passes ``trust_remote_code=False`` too."""
    modules = {p.stem for p in directory.glob("*.py")}
    for path in sorted(directory.glob("*.json")):
        if not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # config.json is read (and refused) on its own; another file is transformers' to read
        found = _code_references(doc, modules)
        if found:
            raise ValueError(f"--model {name}: {path} names custom code ({found[0]}): refused, utilrank never runs a "
                             "model folder's code (trust_remote_code=False); use a model type transformers ships")


def check_weights(name: str) -> Path:
    """The folder's weight file (safetensors preferred, as transformers loads them), checked before any load: one
    line naming the file when there is none, a shard of an index is missing, or a safetensors file is truncated or
    not one. A ``.bin`` file is read by transformers with ``weights_only=True``; its problems are named at load."""
    directory = hf_directory(name)
    found = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if found is None:
        raise ValueError(f"--model {name}: {directory} holds no weights ({', '.join(WEIGHT_FILES[:3])}): save the "
                         "model with save_pretrained")
    files = [found]
    if found.name.endswith(".index.json"):
        index = _read_json(name, found)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"--model {name}: {found}: no weight_map of tensor names to shard files")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"--model {name}: {found} lists {missing[0]}, which is not in {directory}")
    for path in files:
        if path.suffix == ".safetensors":
            with open_safetensors(path, f"--model {name}: weights"):
                pass  # the header parses and covers the file: a truncated file fails here
        else:
            _check_torch_file(name, path)
    return found


def _check_torch_file(name: str, path: Path) -> None:
    """A ``.bin`` weight file read as transformers reads it (``weights_only=True``), memory-mapped so that the
    tensors are not read: a pickle of code or a damaged file is one line naming it, before any data is prepared."""
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except Exception as exc:  # torch.load's errors are of many kinds (unpickling, zip, EOF): one line
        raise ValueError(f"--model {name}: weights {path}: {torch_load_problem(exc)}") from exc


def check_model_type(name: str, config: dict) -> None:
    """Refuse a ``model_type`` the installed transformers does not ship (before it logs and raises on its own)."""
    require_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # optional: the [hf] extra

    if config["model_type"] not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"--model {name}: config.json's model_type {config['model_type']!r} is not a model type "
                         f"transformers {require_transformers().__version__} ships: not a transformers config")


def num_labels(config: dict) -> int:
    """A raw ``config.json``'s number of classes (transformers' default is 2)."""
    labels = config.get("id2label")
    if isinstance(labels, dict) and labels:
        return len(labels)
    count = config.get("num_labels", 2)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"config.json: num_labels must be an integer >= 1, got {count!r}")
    return count


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


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' run for paragraphs): its first sentence-bearing line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` (GPT-2's linear layer, weight stored ``(in, out)``) by the
    ``nn.Linear`` it computes (weight transposed to ``(out, in)``, same bias, same outputs), in place; returns the
    names replaced. Works on the meta device (``load_compressed`` builds there)."""
    require_transformers()
    from transformers.pytorch_utils import Conv1D as conv1d  # optional (the [hf] extra), checked above

    def replace(module: nn.Module, name: str) -> nn.Module | None:
        if not isinstance(module, conv1d):
            return None
        weight = module.weight
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        return linear

    return swap_modules(model, replace)


def load_hf_model(name: str, *, num_labels: int | None = None) -> tuple[nn.Module, dict]:
    """``(model, config)`` from the local folder of ``hf:DIR`` (fp32, eval mode); ``config`` (``source: "hf"``,
    ``task``, ``hf_config``: the folder's config as a dict) rebuilds the architecture without the folder.

    ``num_labels``: a classification checkpoint whose head has another number of labels gets a new, untrained
    head of ``num_labels`` (``config["head_reset"]``): transformers' ``ignore_mismatched_sizes``. transformers'
    ``Conv1D`` layers become ``nn.Linear`` (``conv1d_to_linear``; ``config["conv1d_as_linear"]`` names them)."""
    check_model_type(name, read_config(name))  # custom code, encoder-decoders: before transformers reads the folder
    weights = check_weights(name)
    AutoConfig = require_transformers().AutoConfig
    directory = hf_directory(name)
    try:
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--model {name}: {directory}/config.json is not a transformers config "
                         f"({_one_line(exc)})") from exc
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
                                  trust_remote_code=False, dtype=torch.float32, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        # a weight file transformers cannot read: one line naming it (torch's advice to unpickle dropped)
        problem = torch_load_problem(exc) if weights.suffix == ".bin" else _one_line(exc)
        raise ValueError(f"--model {name}: cannot load {AUTO_CLASSES[task]} from {weights} ({problem})") from exc
    new = sorted(set(info.get("missing_keys", ())) | {m[0] if isinstance(m, tuple) else m
                                                       for m in info.get("mismatched_keys", ())})
    if new:
        logger.warning(f"--model {name}: {len(new)} tensors are not in the checkpoint (or have another shape) and "
                       f"are randomly initialized: {', '.join(new[:6])}{' ...' if len(new) > 6 else ''}")
    converted = conv1d_to_linear(model)
    if converted:
        logger.info(f"--model {name}: {len(converted)} transformers Conv1D layers (weights stored transposed) run as "
                    "nn.Linear, weights transposed; the compressed folder stores them as nn.Linear")
    config = {"arch": type(model).__name__, "source": "hf", "task": task, "hf_config": model.config.to_dict(),
              "hf_dir": str(directory.resolve())}
    if converted:
        config["conv1d_as_linear"] = converted
    if head_reset:
        config["head_reset"] = True
    return model.eval(), config


def build_hf_architecture(config: dict) -> nn.Module:
    """A randomly initialized model of a ``config.json`` written for an HF model (``hf_config``, ``task``): the
    transformers config class of its ``model_type`` from the stored dict, then the task's Auto class
    ``from_config`` (transformers' own classes only: a stored ``auto_map`` is refused), ``Conv1D`` layers as
    ``nn.Linear`` as when it was loaded. No folder and no download needed. Builds on the caller's default device
    (``meta`` in ``load_compressed``)."""
    AutoConfig = require_transformers().AutoConfig
    hf = dict(config.get("hf_config") or {})
    task = config.get("task", "encoder")
    model_type = hf.pop("model_type", None)
    if not model_type or task not in AUTO_CLASSES:
        raise ValueError(f"an HF config needs hf_config.model_type and a task in {', '.join(AUTO_CLASSES)}; got "
                         f"model_type {model_type!r}, task {task!r}")
    code = [key for key in _CODE_KEYS if key in hf]
    if code:
        raise ValueError(f"hf_config.{code[0]} names custom code: refused, utilrank never runs a model's own code")
    hf_config = type(AutoConfig.for_model(model_type)).from_dict(hf)
    model = _auto_class(task).from_config(hf_config, trust_remote_code=False)
    conv1d_to_linear(model)
    return model


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
    if not (directory / "preprocessor_config.json").is_file():
        raise ValueError(f"--model {name}: no image processor in {directory} (preprocessor_config.json) to prepare "
                         "--data images: save one with AutoImageProcessor's save_pretrained")
    try:
        processor = require_transformers().AutoImageProcessor.from_pretrained(directory, local_files_only=True,
                                                                              trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--model {name}: {directory}/preprocessor_config.json is not an image processor "
                         f"({_one_line(exc)})") from exc
    return ImageProcessorTransform(processor)


def tokenizer(name: str):
    """The folder's tokenizer, local only; refused where the folder holds no vocabulary (transformers would build
    one of the special tokens alone: every word ``[UNK]``)."""
    directory = hf_directory(name)
    if not any((directory / f).is_file() for f in VOCABULARY_FILES):
        raise ValueError(f"--model {name}: no tokenizer in {directory} (none of {', '.join(VOCABULARY_FILES[:3])}, "
                         "...) for --data text: save the model's tokenizer there with save_pretrained")
    try:
        loaded = require_transformers().AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                                      trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--model {name}: the tokenizer in {directory} does not load ({_one_line(exc)})") from exc
    special = len(set(getattr(loaded, "all_special_tokens", ())))
    if len(loaded) <= special:
        raise ValueError(f"--model {name}: the tokenizer in {directory} has {len(loaded)} tokens, its special tokens "
                         "alone: its vocabulary file is empty or unreadable")
    return loaded


def check_vocabulary(name: str, loaded_tokenizer, config: dict) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding rows (``vocab_size``): a tokenizer of
    another model, whose ids would index outside the embedding."""
    rows = config.get("vocab_size")
    if isinstance(rows, int) and not isinstance(rows, bool) and len(loaded_tokenizer) > rows:
        raise ValueError(f"--model {name}: the tokenizer has {len(loaded_tokenizer):,} tokens, the model's "
                         f"embedding {rows:,} rows (vocab_size in config.json): the tokenizer is another model's")


def text_input(loaded_tokenizer, max_length: int) -> dict:
    """``config.json``'s ``input`` for a text model: the tensors a deployment feeds (``input_ids``,
    ``attention_mask``), the length the data was cut to, the tokenizer (copied into the folder's
    ``preprocessing/`` by ``write_compressed``)."""
    return {"kind": "text", "names": ["input_ids", "attention_mask"], "max_length": int(max_length),
            "vocab_size": len(loaded_tokenizer), "pad_token_id": loaded_tokenizer.pad_token_id,
            "pad_token": loaded_tokenizer.pad_token,
            "tokenizer_class": type(loaded_tokenizer).__name__, "preprocessing": "preprocessing"}


def image_input(transform: ImageProcessorTransform, config: dict) -> dict:
    """``config.json``'s ``input`` for an image model: ``size`` ``[C, H, W]`` (the model's ``num_channels``,
    ``image_size``) and the image processor's resize, mean and std (its file copied into ``preprocessing/``)."""
    processor = transform.processor.to_dict()
    size = config["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    spec = {"kind": "image", "names": ["pixel_values"], "size": [int(config["num_channels"]), height, width],
            "mean": _floats(processor.get("image_mean")), "std": _floats(processor.get("image_std")),
            "interpolation": _RESAMPLE.get(processor.get("resample"), str(processor.get("resample"))),
            "resize": processor.get("size"), "rescale_factor": processor.get("rescale_factor"),
            "processor_class": processor.get("image_processor_type", type(transform.processor).__name__),
            "preprocessing": "preprocessing"}
    return {k: v for k, v in spec.items() if v is not None}


def _floats(values) -> list[float] | None:
    return None if values is None else [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]


def preprocessing_files(directory: str | Path) -> list[Path]:
    """The tokenizer and image-processor files of an HF folder (``PREPROCESSING_FILES`` that are there)."""
    directory = Path(directory)
    return [directory / f for f in PREPROCESSING_FILES if (directory / f).is_file()]
