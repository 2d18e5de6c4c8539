"""A compressed model on disk: ``model.safetensors``, ``plan.json``, ``config.json``. No pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._cache import atomic_path, write_json
from .plan import apply_plan, load_plan, save_plan

CONFIG_FORMAT = "utilrank.config/1"


def save_compressed(model: nn.Module, plan: dict, config: dict, out_dir: str | Path) -> None:
    """Write the folder; each file is written under a temporary name and renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "utilrank.model/1"})
    save_plan(plan, out_dir / "plan.json")
    write_json(out_dir / "config.json", {"format": CONFIG_FORMAT, **config})


def _build_architecture(config: dict) -> nn.Module:
    from ..models import BUILTIN_MODELS, build_builtin

    arch, kwargs = config["arch"], dict(config.get("model_kwargs", {}))
    if config.get("source") == "builtin" or arch in BUILTIN_MODELS:
        return build_builtin(arch, **kwargs)
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs)


def load_compressed(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the architecture (on the meta device: no time spent initializing weights that are
    about to be overwritten), apply the plan, and load the tensors strictly."""
    path = Path(path)
    for name in ("model.safetensors", "plan.json", "config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"compressed model {path}: missing {name}")
    config = json.loads((path / "config.json").read_text())
    plan = load_plan(path / "plan.json")
    state = load_file(str(path / "model.safetensors"), device=str(device))
    with torch.device("meta"):
        model = apply_plan(_build_architecture(config), plan)
    _fuse_mlps(model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"compressed model {path}: weights do not fit the plan: {exc}") from exc
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # a buffer the checkpoint does not hold (non-persistent): build for real and load again
        model = apply_plan(_build_architecture(config), plan)
        _fuse_mlps(model)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _fuse_mlps(model: nn.Module) -> int:
    """Where both layers of a timm Mlp are factored, run them as one fused LowRankMlp (if available)."""
    try:
        from ..nn import fuse_lowrank_mlps
    except ImportError:
        return 0
    return fuse_lowrank_mlps(model)
