"""The layers this package analyzes and factors, and the one walk that replaces modules in a model.

Every stage finds its layers here (``find_layers``), sees a layer as the matrix of a ``LayerShape`` (a conv's
input is its im2col patch, ``C * kh * kw``; ``nn.lowrank.layer_shape`` reads it off a dense or factored
layer) and swaps modules here (``swap_modules``, with a ``filter_fn(module, fully_qualified_name)`` as in
torchao's ``quantize_``). Imports nothing from the package: the modules of ``nn/`` build on it."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


def name_filter(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> FilterFn:
    """A ``filter_fn(module, name)`` from glob patterns on the layer name (``--exclude 'head'``)."""

    def keep(module: nn.Module, name: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    return keep


def factored_pays(rank: int, in_features: int, out_features: int) -> bool:
    """A factored layer has fewer weights than the dense one only when ``r (in + out) < in * out``."""
    return rank * (in_features + out_features) < in_features * out_features


@dataclass(frozen=True)
class LayerShape:
    """A layer as the matrix ``W`` (``out_features x in_features``) the method sees."""

    kind: str  # "linear" | "conv2d"
    in_features: int  # a conv's im2col patch size, C * kh * kw
    out_features: int
    kernel_size: tuple[int, int] | None = None
    bias: bool = True

    @property
    def full_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def params(self, rank: int | None = None) -> int:
        """Weights and bias, dense (``rank=None``) or factored at ``rank``."""
        n_in, n_out = self.in_features, self.out_features
        weights = n_in * n_out if rank is None else rank * (n_in + n_out)
        return weights + (n_out if self.bias else 0)


# subclasses whose forward computes what the base class's does (timm's Linear: a cast under TorchScript only)
SAME_FORWARD = frozenset({"timm.layers.linear.Linear"})


def _custom_forward(module: nn.Module) -> bool:
    """Whether a Linear / Conv2d subclass computes something else than its base class in its forward (timm's
    ``Conv2dSame`` pads there, ``StdConv2d`` standardizes the weight): factors of its weight would drop that."""
    cls = type(module)
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    if cls is base or f"{cls.__module__}.{cls.__qualname__}" in SAME_FORWARD:
        return False
    return cls.forward is not base.forward or (base is nn.Conv2d and cls._conv_forward is not base._conv_forward)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a ``nn.Linear`` / ``nn.Conv2d`` cannot be analyzed or factored (None if it can)."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped conv (groups={module.groups}) is not analyzed"
    if _custom_forward(module):
        return (f"{type(module).__name__} has its own forward (timm's Conv2dSame pads in it, StdConv2d standardizes "
                "its weight): factors of the weight would drop what it does")
    return None


def find_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The analyzable ``nn.Linear`` and groups=1 ``nn.Conv2d`` layers of ``model`` (passing ``filter_fn``),
    in module order, and the reason each other one is left out."""
    layers, skipped = {}, {}
    # nn.MultiheadAttention reads its out_proj's weight, never calling its forward: no statistics, no factors
    read_directly = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        reason = unsupported_reason(module)
        if reason is None and id(module) in read_directly:
            reason = "nn.MultiheadAttention's out_proj: the attention reads its weight directly, not its forward"
        if reason is None and filter_fn is not None and not filter_fn(module, name):
            reason = "excluded by filter"
        if reason is None:
            layers[name] = module
        else:
            skipped[name] = reason
    return layers, skipped


def swap_modules(model: nn.Module, replace: Callable[[nn.Module, str], nn.Module | None],
                 names: Sequence[str] | None = None) -> list[str]:
    """Replace, in place, each submodule for which ``replace(module, name)`` returns a module (``None``
    keeps it); ``names`` limits the walk to those fully qualified names (in that order). The root
    module itself is never replaced, nor anything inside a module replaced before it. Returns the names
    replaced."""
    modules = dict(model.named_modules())
    targets = [n for n in modules if n] if names is None else list(names)
    replaced: list[str] = []
    for name in targets:
        if any(name.startswith(r + ".") for r in replaced):
            continue
        new = replace(modules[name], name)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)
    return replaced
