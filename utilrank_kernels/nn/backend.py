"""Which implementation the factored modules of a model run on."""

from __future__ import annotations

from torch import nn

from ..ops._dispatch import check_backend
from .lowrank import LowRankConv2d, LowRankLinear
from .mlp import LowRankMlp

FACTORED_MODULES = (LowRankLinear, LowRankConv2d, LowRankMlp)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Point every factored module of ``model`` at ``backend`` ("auto" | "torch" | "triton" | "cuda"), in
    place; returns ``model``. "torch" gives plain ``F.linear`` / ``F.conv2d`` graphs (what ONNX and
    ``torch.export`` without this package need)."""
    check_backend("set_backend", backend)
    for m in model.modules():
        if isinstance(m, FACTORED_MODULES):
            m.backend = backend
    return model
