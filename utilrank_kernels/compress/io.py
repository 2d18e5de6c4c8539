"""A compressed model on disk: ``model.safetensors``, ``plan.json``, ``config.json``. No pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._cache import atomic_path, load_safetensors, write_json
from ..nn import fuse_lowrank_mlps, set_backend
from .plan import Plan, apply_plan

CONFIG_FORMAT = "utilrank.config/1"


def save_compressed(model: nn.Module, plan: Plan, config: dict, out_dir: str | Path) -> None:
    """Write the folder; each file is written under a temporary name and renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "utilrank.model/1"})
    plan.save(out_dir / "plan.json")
    write_json(out_dir / "config.json", {"format": CONFIG_FORMAT, **config})


def _build_architecture(config: dict) -> nn.Module:
    from ..models import BUILTIN_MODELS, build_builtin

    arch, kwargs = config["arch"], dict(config.get("model_kwargs", {}))
    if config.get("source") == "builtin" or arch in BUILTIN_MODELS:
        return build_builtin(arch, **kwargs)
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs)


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
    config = json.loads((path / "config.json").read_text())
    plan = Plan.load(path / "plan.json")
    state = load_safetensors(path / "model.safetensors", "compressed model", str(device))
    with torch.device("meta"):
        model = apply_plan(_build_architecture(config), plan)
    if fuse_mlps:
        fuse_lowrank_mlps(model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"compressed model {path}: weights do not fit the plan: {exc}") from exc
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # a buffer the checkpoint does not hold (non-persistent): build for real and load again
        model = apply_plan(_build_architecture(config), plan)
        if fuse_mlps:
            fuse_lowrank_mlps(model)
        model.load_state_dict(state, strict=True)
    return set_backend(model.to(device).eval(), backend)
