"""``LowRankMlp``: timm's ``Mlp`` (fc1 -> activation -> fc2) with both layers factored, run as one fused
op (``utilrank_kernels.ops.lowrank_mlp``) where a kernel backend is eligible.

The module keeps ``fc1`` and ``fc2`` as the ``LowRankLinear`` submodules they were, so the state-dict keys
of a compressed model do not change when its MLPs are fused, and its torch path is exactly
``drop2(fc2(drop1(act(fc1(x)))))``, timm's forward (``norm`` must be ``Identity``): training, hooks and
statistics collection see the two layers as before.
"""

from __future__ import annotations

import torch
from torch import nn

from .._kernel_args import ACTIVATIONS
from ..layers import swap_modules
from ..ops.lowrank import apply_activation, lowrank_mlp, mlp_choice
from .lowrank import LowRankLinear


def activation_name(act: nn.Module) -> str | None:
    """The fused kernels' name for an activation module, or None where they have no such epilogue."""
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if isinstance(act, nn.ReLU):
        return "relu"
    try:
        from timm.layers.activations import GELU, GELUTanh
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if isinstance(act, GELUTanh):
        return "gelu_tanh"
    if isinstance(act, GELU):
        return "gelu"
    return None


def _dropout_p(m: nn.Module) -> float | None:
    if isinstance(m, nn.Identity):
        return 0.0
    if type(m) is nn.Dropout:
        return float(m.p)
    return None


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _is_timm_mlp(m: nn.Module) -> bool:
    try:
        from timm.layers import Mlp
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    # subclasses that override forward (other data flows) are not ours to fuse
    return isinstance(m, Mlp) and type(m).forward is Mlp.forward


def fusable_reason(mlp: nn.Module) -> str | None:
    """Why ``mlp`` cannot become a ``LowRankMlp``, or None where it can."""
    if not _is_timm_mlp(mlp):
        return f"not a timm Mlp ({type(mlp).__name__})"
    if not (isinstance(mlp.fc1, LowRankLinear) and isinstance(mlp.fc2, LowRankLinear)):
        return "fc1 and fc2 are not both LowRankLinear"
    if activation_name(mlp.act) is None:
        return f"no fused epilogue for activation {type(mlp.act).__name__}"
    if not isinstance(mlp.norm, nn.Identity):
        return f"hidden norm {type(mlp.norm).__name__} between the layers"
    if _dropout_p(mlp.drop1) is None or _dropout_p(mlp.drop2) is None:
        return "drop1/drop2 are not plain Dropout"
    return None


class LowRankMlp(nn.Module):
    """``fc2(act(fc1(x)))`` with ``fc1``, ``fc2`` ``LowRankLinear``; dropouts as in timm's ``Mlp``."""

    def __init__(self, fc1: LowRankLinear, fc2: LowRankLinear, activation: str | None = "gelu",
                 drop1: float = 0.0, drop2: float = 0.0, backend: str = "auto"):
        super().__init__()
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"LowRankMlp: fc1 has {fc1.out_features} outputs, fc2 {fc2.in_features} inputs")
        if activation not in ACTIVATIONS:
            raise ValueError(f"LowRankMlp: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        self.fc1, self.fc2 = fc1, fc2
        self.activation, self.backend = activation, backend
        self.drop1, self.drop2 = nn.Dropout(drop1), nn.Dropout(drop2)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, backend: str | None = None) -> LowRankMlp:
        """The fused form of a timm ``Mlp`` whose ``fc1`` and ``fc2`` are ``LowRankLinear`` (reused, not
        copied); ``backend`` defaults to ``fc1``'s."""
        reason = fusable_reason(mlp)
        if reason is not None:
            raise ValueError(f"LowRankMlp.from_mlp: {reason}")
        module = cls(mlp.fc1, mlp.fc2, activation_name(mlp.act), _dropout_p(mlp.drop1), _dropout_p(mlp.drop2),
                     backend=mlp.fc1.backend if backend is None else backend)
        return module.train(mlp.training)

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_features

    @property
    def out_features(self) -> int:
        return self.fc2.out_features

    def _modules_path(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop1(apply_activation(self.fc1(x), self.activation))
        return self.drop2(self.fc2(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        if dropout or _has_hooks(self.fc1) or _has_hooks(self.fc2):
            return self._modules_path(x)
        fc1, fc2 = self.fc1, self.fc2
        params = (fc1.weight_a, fc1.weight_b, fc1.bias, fc2.weight_a, fc2.weight_b, fc2.bias)
        # the one dispatch rule (ops/_dispatch.py), measured on CUDA (ops/_tune.py)
        choice = mlp_choice(x, *params, backend=self.backend, activation=self.activation)
        if choice.impl == "torch":  # timm's forward, through the submodules
            return self._modules_path(x)
        return lowrank_mlp(x, *params, self.activation, choice=choice)  # "linears": fc1's and fc2's own choices

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, backend={self.backend!r}"


def fuse_lowrank_mlps(model: nn.Module) -> int:
    """Replace, in place, every timm ``Mlp`` of ``model`` whose ``fc1`` and ``fc2`` are both ``LowRankLinear``
    (and whose activation has a fused epilogue) by a ``LowRankMlp``; returns how many were replaced.

    State-dict keys are unchanged. ``model`` itself is never replaced (wrap it if it is an Mlp)."""
    fused = lambda m, name: LowRankMlp.from_mlp(m) if fusable_reason(m) is None else None  # noqa: E731
    return len(swap_modules(model, fused))
