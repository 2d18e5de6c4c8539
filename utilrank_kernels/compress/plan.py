"""Rank plans (DESIGN §4 ``plan.json``): which layers are factored at which rank, and why.

A ``Plan`` is a frozen value: the stages that change ranks (the search, a budget, the latency-aware
pass, factoring itself where a small SVD cuts deeper) each return a new plan, never edit the one they
were given. Layers absent from ``layers`` stay dense; ``dense`` records why. ``apply_plan`` swaps each
planned ``nn.Linear`` / ``nn.Conv2d`` for an empty factored layer of its rank: the shape a compressed
checkpoint loads into.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from torch import nn

from .._files import read_json, write_json
from ..layers import swap_modules, unsupported_reason
from ..nn import LowRankConv2d, LowRankLinear
from ..nn.lowrank import layer_shape

PLAN_FORMAT = "utilrank.plan/1"
METHODS = ("optimal", "data", "svd")
_LAYER_KEYS = ("kind", "rank", "k_in", "k_out", "energy", "reason", "latency")


@dataclass(frozen=True)
class LayerPlan:
    """One factored layer: ``rank`` (the factors' inner size); ``k_in``/``k_out`` are the subspace sizes
    the data-projection method uses (``rank = min(k_in, k_out)`` where the plan came from energies);
    ``energy`` the cut it was chosen at, ``reason`` why, ``latency`` the timings a latency-aware plan
    measured (``{"device", "batch", "dense_ms", "factored_ms"}``)."""

    kind: str
    rank: int
    k_in: int | None = None
    k_out: int | None = None
    energy: float | None = None
    reason: str = ""
    latency: Mapping | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    def with_rank(self, rank: int, reason: str | None = None) -> LayerPlan:
        """This layer at ``rank``; ``k_in``/``k_out`` raised to at least ``rank`` (never lowered: data-aware
        factors keep at least the subspaces they had)."""
        k_in = None if self.k_in is None else max(self.k_in, rank)
        k_out = None if self.k_out is None else max(self.k_out, rank)
        return replace(self, rank=rank, k_in=k_in, k_out=k_out, reason=self.reason if reason is None else reason)


@dataclass(frozen=True)
class Plan:
    """``plan.json``: the architecture name, the factored layers (in model order), the layers kept dense
    with their reasons, the factoring ``method`` and free-form ``meta`` (energy, tolerances, budgets)."""

    arch: str
    layers: Mapping[str, LayerPlan]
    dense: Mapping[str, str] = field(default_factory=dict)
    method: str = "optimal"
    meta: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"plan method {self.method!r}: choose one of {', '.join(METHODS)}")
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "dense", MappingProxyType(dict(self.dense)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def ranks(self) -> dict[str, int]:
        return {name: entry.rank for name, entry in self.layers.items()}

    def replace_layers(self, layers: Mapping[str, LayerPlan], dense: Mapping[str, str] | None = None,
                       **meta) -> Plan:
        """A new plan with these layers (and dense reasons, and extra meta); this one is unchanged."""
        return replace(self, layers=layers, dense=self.dense if dense is None else dense,
                       meta={**self.meta, **meta})

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "arch": self.arch, "method": self.method,
                "layers": {n: e.to_dict() for n, e in self.layers.items()}, "dense": dict(self.dense),
                **dict(self.meta)}

    @classmethod
    def from_dict(cls, doc: Mapping, source: str = "plan") -> Plan:
        if doc.get("format") != PLAN_FORMAT or not isinstance(doc.get("layers"), Mapping):
            raise ValueError(f"{source}: not a {PLAN_FORMAT} file")
        layers = {}
        for name, entry in doc["layers"].items():
            if not isinstance(entry, Mapping) or "kind" not in entry or "rank" not in entry:
                raise ValueError(f"{source}: layer {name} needs 'kind' and 'rank'")
            layers[name] = LayerPlan(**{k: entry[k] for k in _LAYER_KEYS if k in entry})
        meta = {k: v for k, v in doc.items() if k not in ("format", "arch", "method", "layers", "dense")}
        # plans written before the method was recorded factored by projection onto the data subspaces
        return cls(str(doc.get("arch", "")), layers, dict(doc.get("dense") or {}), doc.get("method", "data"), meta)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan {path}: no such file")
        return cls.from_dict(read_json(path, "plan", "plan"), f"plan {path}")  # SchemaError: the file and field


def misfit(module: nn.Module | None, entry: LayerPlan) -> str | None:
    """Why ``entry`` cannot apply to ``module`` (None if it fits)."""
    if module is None:
        return "no such layer"
    if not isinstance(entry.rank, int) or entry.rank < 1:
        return f"rank {entry.rank!r} is not a positive integer"
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"plan says {entry.kind}, model has {type(module).__name__}"
    reason = unsupported_reason(module)
    if reason is not None:
        return reason
    shape = layer_shape(module)
    if shape.kind != entry.kind:
        return f"plan says {entry.kind}, model has {type(module).__name__}"
    if entry.rank > shape.full_rank:
        return f"rank {entry.rank} exceeds min(in, out) = {shape.full_rank}"
    return None


def check_fits(model: nn.Module, plan: Plan) -> None:
    """Raise ``ValueError`` listing every layer of ``plan`` that does not fit ``model``."""
    modules = dict(model.named_modules())
    problems = [f"{name} ({why})" for name, entry in plan.layers.items() if (why := misfit(modules.get(name), entry))]
    if problems:
        raise ValueError(f"plan does not fit the model: {'; '.join(problems)}")


def empty_factored(dense: nn.Module, rank: int) -> nn.Module:
    """An uninitialized factored layer of ``rank`` with ``dense``'s geometry, device and dtype."""
    kw = {"device": dense.weight.device, "dtype": dense.weight.dtype}
    if isinstance(dense, nn.Conv2d):
        return LowRankConv2d(dense.in_channels, dense.out_channels, rank, dense.kernel_size, dense.stride,
                             dense.padding, dense.dilation, dense.bias is not None, dense.padding_mode, **kw)
    return LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None, **kw)


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace every planned layer by an empty factored layer of its rank, in place (the architecture a
    compressed checkpoint loads into). Raises ``ValueError`` listing every misfit first."""
    check_fits(model, plan)
    swap_modules(model, lambda m, name: empty_factored(m, plan.layers[name].rank), names=list(plan.layers))
    return model
