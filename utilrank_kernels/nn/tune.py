"""Pre-tuning a model, and which backend each of its factored layers runs.

``tune(model, *example_inputs)`` runs one eager forward pass (no gradient) on the example inputs: on CUDA, with the
measured choice on (``UTILRANK_TUNE`` not ``0``), each factored op's candidates are timed then for every key not
yet recorded (``retune=True``: every key again) and the choices land in the cache (``ops/_tune.py``), so that
CUDA-graph capture and ``torch.compile`` later read them. Both it and ``layer_backends`` return, per factored
layer, the implementation it ran.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch import nn

from ..ops import _tune
from .backend import FACTORED_MODULES
from .mlp import LowRankMlp


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The factored modules of ``model`` that its forward calls as a whole: a ``LowRankMlp``'s ``fc1`` and
    ``fc2`` count as the MLP (hooks on them would move the MLP off its fused path)."""
    inside = {id(m) for mlp in model.modules() if isinstance(mlp, LowRankMlp) for m in (mlp.fc1, mlp.fc2)}
    return [(name or type(model).__name__, m) for name, m in model.named_modules()
            if isinstance(m, FACTORED_MODULES) and id(m) not in inside]


def _backend(calls: list[tuple[str, str]]) -> str:
    """One layer's calls as one name: ``triton:fused``; an MLP run as two linears ``linears(torch+triton:split)``
    (by the measured choice) or, on the torch path, ``torch``."""
    impls = [impl for _, impl in calls]
    if not impls:
        return "not run"
    if impls[0] == "linears":
        return f"linears({'+'.join(impls[1:])})"
    return impls[0] if len(set(impls)) == 1 else "+".join(impls)  # timm's forward: fc1's, then fc2's


def layer_backends(model: nn.Module, *example_inputs, **example_kwargs) -> list[dict]:
    """``[{"layer": name, "module": class name, "backend": implementation}]`` for each factored layer of
    ``model`` (in module order), from one eager forward pass without gradient on the example inputs; a layer
    the pass did not call says ``"not run"``."""
    layers = _layers(model)
    starts: dict[str, int] = {}
    calls: dict[str, list[tuple[str, str]]] = {}
    with torch.no_grad(), _tune.recording() as record:
        handles = []
        for name, module in layers:  # a layer's calls: those recorded between its pre-hook and its hook
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: starts.update({name: len(record)})))
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: calls.update({name: record[starts[name]:]})))
        try:
            model(*example_inputs, **example_kwargs)
        finally:
            for h in handles:
                h.remove()
    return [{"layer": name, "module": type(m).__name__, "backend": _backend(calls.get(name, []))}
            for name, m in layers]


def tune(model: nn.Module, *example_inputs, retune: bool = False, **example_kwargs) -> list[dict]:
    """Time and record the measured choice of every factored op ``model`` runs on the example inputs (on CUDA,
    unless ``UTILRANK_TUNE=0``; on the CPU nothing is timed); ``retune``: time keys already recorded again.
    Returns :func:`layer_backends`' list: what each factored layer runs now."""
    with _tune.retuning() if retune else contextlib.nullcontext():
        return layer_backends(model, *example_inputs, **example_kwargs)


def summary(layers: list[dict]) -> str:
    """``triton:fused 12, torch 24``: how many layers run each backend."""
    return ", ".join(f"{backend} {n}" for backend, n in Counter(d["backend"] for d in layers).most_common())
