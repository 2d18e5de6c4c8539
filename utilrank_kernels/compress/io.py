"""A compressed model on disk: ``model.safetensors``, ``plan.json``, ``config.json``. No pickle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._files import atomic_path, load_safetensors, write_json
from .._folder import OutputFolder, verify_manifest
from ..models import BUILTIN_MODELS, build_builtin
from ..models.hf import build_hf_architecture
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
    write_json(directory / "config.json", {"format": CONFIG_FORMAT, **config})


def save_compressed(model: nn.Module, plan: Plan, config: dict, out_dir: str | Path) -> Path:
    """Write the folder as a unit (``OUT.partial/``, then a manifest, then swapped into place): an existing
    ``out_dir`` is replaced whole, and a crash leaves it as it was."""
    folder = OutputFolder(out_dir, "save_compressed", force=True).prepare()
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
    try:
        config = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"compressed model {path}: config.json is not JSON ({exc})") from exc
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
