"""A compressed model on disk: ``model.safetensors``, ``plan.json``, ``config.json``. No pickle.

``config.json`` rebuilds the architecture (``arch``, ``source``, ``model_kwargs``; an HF model's ``hf_config`` and
``task``) and says what the model takes (``input``): for images ``size`` ``[C, H, W]``, ``mean``, ``std``,
``interpolation`` (timm's data config, with its ``crop_pct`` and ``crop_mode``, or an HF image processor's
``resize``); for text the input ``names`` (``input_ids``, ``attention_mask``), ``max_length``, ``vocab_size``. An HF
model's tokenizer or image-processor files are copied into the folder's ``preprocessing/`` (``input.files``), so
``AutoTokenizer.from_pretrained(FOLDER / "preprocessing")`` prepares a deployment's input as the data was.
``utilrank export`` and ``utilrank bench --compressed`` read ``input``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._files import atomic_path, load_safetensors, read_json, write_json
from .._folder import OutputFolder, verify_manifest
from ..models import BUILTIN_MODELS, build_builtin
from ..models.hf import build_hf_architecture, preprocessing_files
from ..models.torchvision import arch_name as tv_arch_name
from ..models.torchvision import build_torchvision
from ..nn import fuse_lowrank_mlps, set_backend
from .plan import Plan, apply_plan

CONFIG_FORMAT = "utilrank.config/1"
logger = logging.getLogger(__name__)


def write_compressed(model: nn.Module, plan: Plan, config: dict, directory: str | Path) -> None:
    """``model.safetensors``, ``plan.json`` and ``config.json`` into ``directory`` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "utilrank.model/1"})
    plan.save(directory / "plan.json")
    write_json(directory / "config.json", {"format": CONFIG_FORMAT, **_copy_preprocessing(config, directory)})


PREPROCESSING = "preprocessing"  # the folder's subfolder of tokenizer / image-processor files


def _copy_preprocessing(config: dict, directory: Path) -> dict:
    """``config`` with ``input.files`` listing the HF folder's tokenizer / image-processor files, copied into
    ``directory/preprocessing/``; where the HF folder is gone, its path stays recorded (``hf_dir``) and a warning
    says the files were not copied."""
    spec = config.get("input")
    if config.get("source") != "hf" or not isinstance(spec, dict) or spec.get("preprocessing") != PREPROCESSING:
        return config
    source = Path(config.get("hf_dir") or "")
    files = preprocessing_files(source) if config.get("hf_dir") and source.is_dir() else []
    if not files:
        logger.warning(f"{directory.name}: the tokenizer / image-processor files of {source} are not there to copy; "
                       f"config.json records the folder ({source}) instead")
        return {**config, "input": {**spec, "preprocessing": str(source)}}
    target = directory / PREPROCESSING
    target.mkdir(exist_ok=True)
    for path in files:
        with atomic_path(target / path.name) as tmp:
            tmp.write_bytes(path.read_bytes())
    return {**config, "input": {**spec, "files": [f"{PREPROCESSING}/{p.name}" for p in files]}}


def save_compressed(model: nn.Module, plan: Plan, config: dict, out_dir: str | Path) -> Path:
    """Write the folder as a unit (``OUT.partial/``, then a manifest, then swapped into place): an existing
    ``out_dir`` is replaced whole, and a crash leaves it as it was."""
    with OutputFolder(out_dir, "save_compressed", force=True).prepare() as folder:  # a failure leaves out_dir
        write_compressed(model, plan, config, folder.partial)
        return folder.commit(argv=[])


def build_architecture(config: dict, source: str = "config.json") -> nn.Module:
    """The architecture ``config.json`` names (``arch``, ``source``, ``model_kwargs``; for ``source: "hf"`` the
    stored ``hf_config`` and ``task``), randomly initialized."""
    arch, kwargs = config.get("arch"), dict(config.get("model_kwargs", {}))
    try:
        if config.get("source") == "hf":  # a transformers model: its config class and Auto class, from hf_config
            return build_hf_architecture(config)
        if config.get("source") == "builtin" or arch in BUILTIN_MODELS:
            return build_builtin(arch, **kwargs)
        if config.get("source") == "torchvision":
            return build_torchvision(tv_arch_name(arch), **kwargs)
        import timm  # seconds to import: only for timm models

        if not isinstance(arch, str) or not timm.is_model(arch):
            raise ValueError(f"arch {arch!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) nor a timm model")
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{source}: cannot build arch {arch!r} with model_kwargs {kwargs}: "
                         f"{str(exc).strip(chr(39))}") from exc


def load_compressed(path: str | Path, device: str | torch.device = "cpu", *, backend: str = "auto",
                    fuse_mlps: bool = False) -> nn.Module:
    """Rebuild the architecture (on the meta device: no time spent initializing weights that are
    about to be overwritten), apply the plan, and load the tensors strictly: the model as it was saved.
    ``backend`` is set on every factored module (``set_backend``); ``fuse_mlps`` runs each timm ``Mlp``
    whose two layers are factored as one fused ``LowRankMlp`` (same state-dict keys and outputs)."""
    path = Path(path)
    for name in ("model.safetensors", "plan.json", "config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"compressed model {path}: missing {name}")
    if verify_manifest(path, required=("model.safetensors", "plan.json", "config.json")) is None:
        logger.warning(f"compressed model {path}: no manifest.json (written by hand or by an older version): "
                       "its files are not checked")
    config = read_json(path / "config.json", "config")  # SchemaError: the file and field
    plan = Plan.load(path / "plan.json")
    state = load_safetensors(path / "model.safetensors", "compressed model", str(device))
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"compressed model {path}: {bad} in model.safetensors holds NaN or Inf")
    with torch.device("meta"):
        model = apply_plan(build_architecture(config, f"compressed model {path}/config.json"), plan)
    if fuse_mlps:
        fuse_lowrank_mlps(model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"compressed model {path}: weights do not fit the plan: {exc}") from exc
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # a buffer the checkpoint does not hold (non-persistent): build for real and load again
        model = apply_plan(build_architecture(config), plan)
        if fuse_mlps:
            fuse_lowrank_mlps(model)
        model.load_state_dict(state, strict=True)
    return set_backend(model.to(device).eval(), backend)
