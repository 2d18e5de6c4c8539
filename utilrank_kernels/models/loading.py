"""Build a model by name (built-in, timm or ``torchvision:NAME``) and load weights without unpickling."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._files import atomic_path, cache_dir, load_safetensors
from ..data import load_data
from ..data.datasets import SPLIT_SEED
from ..train import train
from . import torchvision as tv
from .builtin import BUILTIN_MODELS, build_builtin

logger = logging.getLogger(__name__)
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
INIT_SEED = 0


def seeded_init(build, *args, **kwargs) -> nn.Module:
    """A model's random initialization from a fixed seed, leaving the caller's random state as it was:
    this torch seeds its default generator at random per process, so an unseeded built-in would train to
    different weights in every fresh cache."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return build(*args, **kwargs)


def torch_load_problem(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one clause without torch's advice (to allowlist
    globals, or to load with ``weights_only=False``: both run the file's code)."""
    text = " ".join(str(exc).split())
    found = re.search(r"(?:Unsupported global: GLOBAL|GLOBAL) ([\w.]+)", text)
    if found:
        return (f"it holds pickled Python objects ({found.group(1)}), not only tensors; loading them would run code "
                "from the file, so it is refused: convert it to .safetensors where you trust its source")
    if re.search(r"Unsupported operand|WeightsUnpickler|weights_only", text):
        return ("it holds pickled data other than tensors; loading it would run code from the file, so it is "
                "refused: convert it to .safetensors where you trust its source")
    if re.search(r"PytorchStreamReader|zip archive|central directory|unexpected EOF|Ran out of input", text):
        return "a damaged or truncated torch file (its zip archive does not read)"
    return f"neither a safetensors nor a torch file (torch.load: {type(exc).__name__} {text[:100]})"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file, or a torch file with ``weights_only=True`` (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        state = load_safetensors(path, "checkpoint")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load's errors are of many kinds (unpickling, zip, EOF): one line
            raise ValueError(f"checkpoint {path}: {torch_load_problem(exc)}") from exc
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: expected a mapping of tensor names to tensors")
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


class HeadMismatch(ValueError):
    """The checkpoint fits the model except for its classifier's number of classes."""

    def __init__(self, message: str, checkpoint_classes: int):
        super().__init__(message)
        self.checkpoint_classes = checkpoint_classes


def classifier_name(model: nn.Module) -> str | None:
    """The name of the model's classifier: timm's ``get_classifier()``, else (torchvision) its last linear layer."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return tv.classifier_name(model)
    head = get()
    return next((n for n, m in model.named_modules() if m is head), None) if isinstance(head, nn.Module) else None


def checkpoint_head_classes(model: nn.Module, path: str | Path) -> int | None:
    """The number of classes of the classifier ``path`` holds for ``model``'s architecture (the rows of its
    ``<classifier>.weight``; ``model`` may be on the meta device), or None where it holds none."""
    head = classifier_name(model)
    weight = load_state_dict_file(path).get(f"{head}.weight") if head else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _batchnorm_counters(model: nn.Module, keys: list[str]) -> list[str]:
    """Those of ``keys`` that are a BatchNorm's ``num_batches_tracked`` counter."""
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    return [k for k in keys if k.endswith(".num_batches_tracked") and k.rsplit(".", 1)[0] in norms]


def load_checkpoint(model: nn.Module, path: str | Path, what: str = "model") -> nn.Module:
    """Load ``path`` into ``model`` strictly, after checking that every tensor is there in its shape: a misfit
    is one ``ValueError`` naming the tensors (``HeadMismatch`` where only the classifier's classes differ).

    BatchNorm ``num_batches_tracked`` counters the file lacks (torchvision's files, many exports) are not missing:
    torch's strict ``load_state_dict`` accepts their absence and keeps the model's own counters (0 on a fresh
    model); so does this, and logs it. They only count batches (for a BatchNorm without ``momentum``)."""
    state = load_state_dict_file(path)
    own = model.state_dict()
    counters = _batchnorm_counters(model, sorted(own.keys() - state.keys()))
    if counters:
        logger.info(f"checkpoint {path} has no num_batches_tracked for {len(counters)} BatchNorm layers; the "
                    "model's own counters are kept (as torch's strict load_state_dict keeps them)")
        state = {**state, **{k: own[k] for k in counters}}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected:
        problems = [f"missing {', '.join(missing[:6])}" if missing else "",
                    f"unexpected {', '.join(unexpected[:6])}" if unexpected else ""]
        raise ValueError(f"checkpoint {path} is not a {what} checkpoint: {'; '.join(p for p in problems if p)} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    if shapes:
        head = classifier_name(model)
        listed = ", ".join(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in sorted(shapes)[:4])
        if head and all(k.startswith(head + ".") for k in shapes):
            classes = state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else -1
            data_classes = own[f"{head}.weight"].shape[0] if f"{head}.weight" in own else "N"
            raise HeadMismatch(f"checkpoint {path} has a {classes}-class classifier ({listed}); give --num-classes "
                               f"{data_classes} to replace its head with one for the data's classes, or --label-map "
                               "FILE (JSON: class folder -> head index) to keep it", classes)
        raise ValueError(f"checkpoint {path} does not fit the {what}: {listed}")
    model.load_state_dict(state, strict=True)
    return model


def _builtin_cache_path(name: str) -> Path:
    _, kwargs, recipe = BUILTIN_MODELS[name]
    key = json.dumps({"name": name, "kwargs": kwargs, "recipe": recipe, "split": SPLIT_SEED, "init_seed": INIT_SEED,
                      "v": 2}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{name}-{digest}.safetensors"


def trained_builtin(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The built-in model trained on the built-in data: from the cache, or trained now and cached."""
    model = seeded_init(build_builtin, name)
    path = _builtin_cache_path(name)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    recipe = BUILTIN_MODELS[name][2]
    logger.info(f"training built-in {name} on digits (first use; cached at {path})")
    train(model, load_data("digits").train, augment=True, device=device, desc=f"train {name}", **recipe)
    model.cpu()
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return model.eval()


MODEL_NAMES = ("a built-in (" + ", ".join(BUILTIN_MODELS) + "), a timm model name (list them: python -c \"import "
               "timm; print(timm.list_models())\"), torchvision:NAME (python -c \"import torchvision; "
               "print(torchvision.models.list_models(module=torchvision.models))\") or hf:DIR (a Hugging Face model "
               "folder)")


def build_model(
    name: str, checkpoint: str | Path | None = None, num_classes: int | None = None, device: str = "cpu",
    *, reset_head: bool = False, **model_kwargs,
) -> tuple[nn.Module, dict]:
    """Return ``(model, config)``; ``config`` (arch, source, num_classes, model kwargs) rebuilds it.

    ``name``: a built-in, a timm name or ``torchvision:NAME``. ``reset_head``: a checkpoint whose classifier has
    another number of classes is loaded whole, then its head replaced by a fresh ``num_classes`` one (timm's
    ``reset_classifier``, or a new last linear layer of a torchvision model; ``config["head_reset"]``): the
    pretrained backbone on the user's classes. The new head is untrained."""
    if name in BUILTIN_MODELS:
        kwargs = dict(BUILTIN_MODELS[name][1])
        if checkpoint is None:
            model = trained_builtin(name, device=device)
        else:
            model = load_checkpoint(build_builtin(name), checkpoint, name)
        config = {"arch": name, "source": "builtin", "num_classes": kwargs["num_classes"], "model_kwargs": kwargs}
        return model.eval(), config
    if tv.is_torchvision_name(name):
        arch = tv.arch_name(name)
        build, source = (lambda **kw: tv.build_torchvision(arch, **kw)), "torchvision"
    else:
        import timm  # seconds to import: only for a timm model, after the built-ins

        if not timm.is_model(name):
            raise ValueError(f"--model {name}: not a model name; give {MODEL_NAMES}")
        arch, source = name, "timm"

        def build(**kw):
            return timm.create_model(name, pretrained=False, **kw)
    kwargs = dict(model_kwargs) if num_classes is None else {**model_kwargs, "num_classes": num_classes}
    model = seeded_init(build, **kwargs)
    head_reset = False
    if checkpoint is not None:
        try:
            load_checkpoint(model, checkpoint, name)
        except HeadMismatch as exc:
            if not reset_head or num_classes is None:
                raise
            model = seeded_init(build, **{**kwargs, "num_classes": exc.checkpoint_classes})
            load_checkpoint(model, checkpoint, name)
            _reset_head(model, num_classes)
            head_reset = True
    classes = tv.num_classes(model) if source == "torchvision" else model.num_classes
    config = {"arch": arch, "source": source, "num_classes": classes, "model_kwargs": kwargs}
    if head_reset:
        config["head_reset"] = True
    return model.eval(), config


def _reset_head(model: nn.Module, num_classes: int) -> None:
    """A fresh ``num_classes`` classifier from the fixed seed: timm's ``reset_classifier``, or (torchvision) a new
    last linear layer with its input width, initialized as ``nn.Linear`` initializes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        if callable(getattr(model, "reset_classifier", None)):
            model.reset_classifier(num_classes)
            return
        name = tv.classifier_name(model)
        old = model.get_submodule(name)
        model.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
