"""Factors of a layer (DESIGN §1 step 5): ``W' = P_out W P_in = B A`` with no SVD of a big matrix,
and the weights-only baseline (truncated SVD of ``W``) at the same rank."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..analysis.subspace import LayerSubspaces
from ..nn import LowRankConv2d, LowRankLinear
from .plan import replace_module


def data_factors(sub: LayerSubspaces, k_in: int, k_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A == U_out U_out^T W U_in U_in^T``; ``A``: ``(r, in)``, ``B``: ``(out, r)``.

    ``r = min(k_in, k_out)``, cut further by an SVD of the small ``M = U_out^T W U_in`` where ``M``
    is itself rank-deficient."""
    u_in, u_out = sub.vec_in[:, :k_in], sub.vec_out[:, :k_out]
    m = u_out.T @ sub.weight @ u_in  # [k_out, k_in]
    p, s, qh = torch.linalg.svd(m, full_matrices=False)
    r = int((s > s[0] * max(m.shape) * torch.finfo(torch.float32).eps).sum()) if s.numel() and s[0] > 0 else 0
    if r < min(k_in, k_out):
        return qh[:r] @ u_in.T, u_out @ (p[:, :r] * s[:r])
    if k_in <= k_out:
        return u_in.T, u_out @ m
    return m @ u_in.T, u_out


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the weight alone: the baseline that ignores the data."""
    w = weight.detach().reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def factored_layer(dense: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    a, b = a.to(dense.weight.dtype), b.to(dense.weight.dtype)
    if isinstance(dense, nn.Conv2d):
        return LowRankConv2d.from_dense(dense, a, b)
    return LowRankLinear.from_dense(dense, a, b)


def decompose(
    model: nn.Module, subspaces: dict[str, LayerSubspaces], plan: dict, *, method: str = "data",
    inplace: bool = False,
) -> nn.Module:
    """The model with every layer of ``plan`` factored: ``method="data"`` projects onto the data
    subspaces at the plan's ``k_in``/``k_out``; ``method="svd"`` truncates the SVD of ``W`` at the
    plan's rank."""
    if method not in ("data", "svd"):
        raise ValueError(f"method must be 'data' or 'svd', got {method!r}")
    model = model if inplace else copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, entry in plan["layers"].items():
        dense = modules[name]
        if method == "data":
            a, b = data_factors(subspaces[name], entry["k_in"], entry["k_out"])
        else:
            a, b = svd_factors(dense.weight, entry["rank"])
        if a.shape[0] != entry["rank"]:  # the small SVD cut deeper: record the rank really used
            entry["rank"] = a.shape[0]
        replace_module(model, name, factored_layer(dense, a.to(dense.weight.device), b.to(dense.weight.device)))
    return model
