"""Factors of a layer (DESIGN §1 step 5) by one of three methods, the one function that factors a
whole model to a plan, and its inverse on weights (``expand``: each factored layer's ``B A`` back into a
dense weight).

- ``optimal``: the rank-r map closest to ``W`` on the data, ``U_r U_r^T W`` with ``U_r`` the top
  eigenvectors of ``C_out = W C_in W^T`` (``LayerSubspaces.output_optimal_factors``);
- ``data``: the paper's two-sided projection ``W' = P_out W P_in`` at the plan's ``k_in`` / ``k_out``
  (``LayerSubspaces.projection_factors``), the reference method;
- ``svd``: the truncated SVD of ``W`` alone, the baseline that ignores the data.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ..analysis.subspace import LayerSubspaces, Subspaces
from ..layers import swap_modules
from ..nn import LowRankConv2d, LowRankLinear
from .plan import LayerPlan, Plan, check_fits


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the weight alone: ``(A, B) = (sqrt(S) V^T, U sqrt(S))`` at ``rank``."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def layer_factors(module: nn.Module, sub: LayerSubspaces | None, entry: LayerPlan,
                  method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` (fp64) for one layer of a plan; the rank may come out below ``entry.rank`` where the
    layer's own rank is lower (a rank-deficient ``M`` or ``C_out``)."""
    if method == "svd":
        return svd_factors(module.weight, entry.rank)
    if sub is None:
        raise ValueError(f"layer {entry.kind} needs subspaces (statistics) for method {method!r}")
    if method == "optimal":
        return sub.output_optimal_factors(entry.rank)
    if method == "data":
        if entry.k_in is None or entry.k_out is None:
            return sub.projection_factors(entry.rank, entry.rank)
        return sub.projection_factors(entry.k_in, entry.k_out)
    raise ValueError(f"method must be 'optimal', 'data' or 'svd', got {method!r}")


def factor_layer(dense: nn.Module, a: torch.Tensor, b: torch.Tensor, rank: int | None = None) -> nn.Module:
    """The factored form of ``dense`` (``nn.Linear`` / ``nn.Conv2d``) with ``B @ A`` as its weight; with
    ``rank``, factors of a lower rank are padded with zeros to it (the same function, the planned shape)."""
    if rank is not None and a.shape[0] < rank:
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
    a = a.to(device=dense.weight.device, dtype=dense.weight.dtype)
    b = b.to(device=dense.weight.device, dtype=dense.weight.dtype)
    if isinstance(dense, nn.Conv2d):
        return LowRankConv2d.from_dense(dense, a, b)
    return LowRankLinear.from_dense(dense, a, b)


def factor_model(model: nn.Module, plan: Plan, subspaces: Subspaces | None = None, *, keep_ranks: bool = False,
                 inplace: bool = False) -> tuple[nn.Module, Plan]:
    """The model with every layer of ``plan`` factored by ``plan.method``, and the plan it really holds.

    Where a layer's factors come out at a lower rank than planned (its ``M`` or ``C_out`` is rank
    deficient), the returned plan records the rank used and says so, unless ``keep_ranks``: then the
    factors are padded with zeros to the planned rank (soups need every ingredient in one shape)."""
    check_fits(model, plan)
    if plan.method != "svd":
        missing = [n for n in plan.layers if subspaces is None or n not in subspaces]
        if missing:
            raise ValueError(f"method {plan.method!r} needs subspaces for layers {', '.join(missing[:8])}")
    model = model if inplace else copy.deepcopy(model)
    layers = dict(plan.layers)

    def factored(dense: nn.Module, name: str) -> nn.Module:
        entry = plan.layers[name]
        a, b = layer_factors(dense, subspaces[name] if subspaces is not None else None, entry, plan.method)
        if keep_ranks:
            return factor_layer(dense, a, b, entry.rank)
        if a.shape[0] != entry.rank:
            layers[name] = LayerPlan(**{**entry.__dict__, "rank": a.shape[0],
                                        "reason": f"{entry.reason}; rank {entry.rank} -> {a.shape[0]}: the "
                                                  "layer's numerical rank on the data".lstrip("; ")})
        return factor_layer(dense, a, b)

    swap_modules(model, factored, names=list(plan.layers))
    return model, plan.replace_layers(layers)


def expand(state_dict: Mapping[str, torch.Tensor], plan: Plan, *,
           source: str = "state dict") -> dict[str, torch.Tensor]:
    """The dense weights of a compressed model: ``state_dict`` with every planned layer's ``weight_a`` /
    ``weight_b`` replaced by its ``weight = B @ A`` (formed in fp64, shaped as the dense layer's weight, in
    ``A``'s dtype); every other tensor as given. ``source`` names the weights in errors."""
    state = dict(state_dict)
    for name, entry in plan.layers.items():
        ka, kb = f"{name}.weight_a", f"{name}.weight_b"
        if ka not in state or kb not in state:
            raise ValueError(f"{source}: planned layer {name} is not factored (no {ka} / {kb}); "
                             "was it compressed with this plan?")
        a, b = state.pop(ka), state.pop(kb)
        rank = a.shape[0]
        if rank != entry.rank or b.shape[1] != rank:
            raise ValueError(f"{source}: {name} has rank {rank} (weight_a {tuple(a.shape)}, weight_b "
                             f"{tuple(b.shape)}), the plan says {entry.rank}")
        w = b.reshape(b.shape[0], rank).double() @ a.reshape(rank, -1).double()
        state[f"{name}.weight"] = w.reshape(b.shape[0], *a.shape[1:]).to(a.dtype)
    return state
