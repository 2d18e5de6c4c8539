"""Rank plans (DESIGN §4 ``plan.json``) and module replacement by a walk of the model.

A plan names the layers to factor and their ranks; layers absent from it stay dense (``dense``
records why). ``apply_plan`` swaps each named ``nn.Linear`` / ``nn.Conv2d`` for an (uninitialized)
``LowRankLinear`` / ``LowRankConv2d`` of that rank: the shape a compressed checkpoint loads into.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from .._cache import write_json
from ..nn import LowRankConv2d, LowRankLinear

PLAN_FORMAT = "utilrank.plan/1"
FilterFn = Callable[[nn.Module, str], bool]


def name_filter(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> FilterFn:
    """A ``filter_fn(module, name)`` from glob patterns on the layer name (``--exclude 'head'``)."""

    def keep(module: nn.Module, name: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    return keep


def make_plan(arch: str, layers: dict[str, dict], dense: dict[str, str] | None = None, **extra) -> dict:
    return {"format": PLAN_FORMAT, "arch": arch, "layers": layers, "dense": dict(dense or {}), **extra}


def save_plan(plan: dict, path: str | Path) -> None:
    write_json(path, plan)


def load_plan(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan {path}: no such file")
    plan = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("layers"), dict):
        raise ValueError(f"plan {path}: not a {PLAN_FORMAT} file")
    return plan


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _misfit(module: nn.Module | None, entry: dict) -> str | None:
    """Why ``entry`` cannot apply to ``module`` (None if it fits)."""
    rank = entry.get("rank")
    if module is None:
        return "no such layer"
    if not isinstance(rank, int) or rank < 1:
        return f"rank {rank!r} is not a positive integer"
    kind = entry.get("kind")
    if isinstance(module, nn.Linear) and kind == "linear":
        limit = min(module.in_features, module.out_features)
    elif isinstance(module, nn.Conv2d) and kind == "conv2d":
        if module.groups != 1:
            return "grouped conv"
        limit = min(module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels)
    else:
        return f"plan says {kind}, model has {type(module).__name__}"
    if rank > limit:
        return f"rank {rank} exceeds min(in, out) = {limit}"
    return None


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Replace every planned layer by an empty factored layer of its rank, in place.

    Raises ``ValueError`` listing every layer of the plan that does not fit the model."""
    modules = dict(model.named_modules())
    problems = [f"{name} ({why})" for name, entry in plan["layers"].items()
                if (why := _misfit(modules.get(name), entry))]
    if problems:
        raise ValueError(f"plan does not fit the model: {'; '.join(problems)}")
    for name, entry in plan["layers"].items():
        dense = modules[name]
        device, dtype = dense.weight.device, dense.weight.dtype
        if entry["kind"] == "linear":
            new = LowRankLinear(dense.in_features, dense.out_features, entry["rank"], dense.bias is not None,
                                device=device, dtype=dtype)
        else:
            new = LowRankConv2d(dense.in_channels, dense.out_channels, entry["rank"], dense.kernel_size,
                                dense.stride, dense.padding, dense.dilation, dense.bias is not None,
                                dense.padding_mode, device=device, dtype=dtype)
        replace_module(model, name, new)
    return model
