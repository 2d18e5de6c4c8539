"""Subspaces of one layer from its statistics (DESIGN §1 steps 2-4), in fp64."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stats import LayerStats


def symmetric_eigh(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0, numerical zeros set to 0) and eigenvectors of ``c``."""
    c = c.to(torch.float64)
    vals, vecs = torch.linalg.eigh(0.5 * (c + c.T))
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    # the statistics are sums of fp32 products: below this an eigenvalue is rounding noise (the rule
    # of matrix_rank at the precision the products were formed in; measured noise: ~1e-8 of the top)
    noise = vals[0] * torch.finfo(torch.float32).eps if vals.numel() else 0.0
    vals = torch.where(vals > noise, vals, torch.zeros_like(vals))
    return vals, vecs


def energy_rank(eigvals: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` eigenvalues hold at least ``energy`` of the trace.

    ``energy >= 1`` gives the numerical rank (the count of non-zero eigenvalues)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    nonzero = int((eigvals > 0).sum())
    if nonzero == 0 or energy >= 1.0:
        return nonzero
    cumulative = torch.cumsum(eigvals, 0)
    return min(nonzero, int((cumulative < energy * cumulative[-1]).sum()) + 1)


@dataclass
class LayerSubspaces:
    """Eigendecompositions of ``C_in`` and ``C_out = W C_in W^T``, computed once per layer and reused
    for every energy or rank a search tries."""

    name: str
    weight: torch.Tensor  # [out, in] fp64 (a conv's weight flattened as im2col lays out patches)
    eig_in: torch.Tensor
    vec_in: torch.Tensor
    eig_out: torch.Tensor
    vec_out: torch.Tensor

    def ranks(self, energy: float) -> tuple[int, int]:
        return energy_rank(self.eig_in, energy), energy_rank(self.eig_out, energy)

    def projected_weight(self, k_in: int, k_out: int) -> torch.Tensor:
        """``W' = P_out W P_in`` with the top ``k_in`` / ``k_out`` eigenvectors."""
        u_in, u_out = self.vec_in[:, :k_in], self.vec_out[:, :k_out]
        return u_out @ (u_out.T @ self.weight @ u_in) @ u_in.T


def layer_subspaces(stats: LayerStats, weight: torch.Tensor) -> LayerSubspaces:
    w = weight.detach().reshape(weight.shape[0], -1).to(device=stats.cov.device, dtype=torch.float64)
    if w.shape[1] != stats.in_features:
        raise ValueError(f"layer {stats.name}: weight has {w.shape[1]} inputs, statistics {stats.in_features}")
    eig_in, vec_in = symmetric_eigh(stats.cov)
    eig_out, vec_out = symmetric_eigh(w @ stats.cov.to(torch.float64) @ w.T)
    return LayerSubspaces(stats.name, w, eig_in, vec_in, eig_out, vec_out)
