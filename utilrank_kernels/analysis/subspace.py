"""Subspaces of every layer from its statistics (DESIGN §1 steps 2-5), in fp64: the stage between the
statistics and everything that chooses or builds factors. ``compute_subspaces`` eigendecomposes once;
the searches, plans and factorizations reuse the result (and ``Subspaces.save``/``load`` keep it)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .._files import atomic_path, open_safetensors
from .stats import LayerStats, Statistics

SUBSPACES_FORMAT = "utilrank.subspaces/1"
# The one rule for a numerical zero, on eigenvalues (squared singular values): at most this fraction of
# the largest. Statistics are sums of fp32 products, and factors are formed from fp32 weights: below it a
# value is rounding noise (measured on the built-ins: covariance noise ~1e-8 of the top eigenvalue).
NOISE_RTOL = torch.finfo(torch.float32).eps
logger = logging.getLogger(__name__)


def nonzero(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Which of ``eigenvalues`` (of a PSD matrix, or squared singular values) are not numerical zeros."""
    top = eigenvalues.max() if eigenvalues.numel() else 0.0
    return eigenvalues > top * NOISE_RTOL


# Below this size an fp64 eigendecomposition runs on one thread: LAPACK's threads meet at spinning barriers,
# and on a 2-core machine shared with other work a 256-wide eigh took 2.9 s on 2 threads against 0.016 s on
# one (1024 wide: 6.0 s against 1.2 s; `python benchmarks/run.py eigh-threads`).
SINGLE_THREAD_EIGH_BELOW = 1536


@contextlib.contextmanager
def _eigh_threads(size: int) -> Iterator[None]:
    """One torch thread while a CPU eigendecomposition of ``size`` runs, below the threshold; restored after."""
    threads = torch.get_num_threads()
    if size >= SINGLE_THREAD_EIGH_BELOW or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def symmetric_eigh(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0, numerical zeros set to 0) and eigenvectors of ``c``."""
    c = c.to(torch.float64)
    with _eigh_threads(c.shape[0] if c.device.type == "cpu" else SINGLE_THREAD_EIGH_BELOW):
        vals, vecs = torch.linalg.eigh(0.5 * (c + c.T))
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    return torch.where(nonzero(vals), vals, torch.zeros_like(vals)), vecs


def energy_rank(eigvals: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` eigenvalues hold at least ``energy`` of the trace.

    ``energy >= 1`` gives the numerical rank (the count of non-zero eigenvalues)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    count = int((eigvals > 0).sum())
    if count == 0 or energy >= 1.0:
        return count
    cumulative = torch.cumsum(eigvals, 0)
    return min(count, int((cumulative < energy * cumulative[-1]).sum()) + 1)


def numerical_rank(matrix: torch.Tensor) -> int:
    """The rank of ``matrix`` under the package's one rule for a numerical zero."""
    s = torch.linalg.svdvals(matrix.to(torch.float64))
    return int(nonzero(s * s).sum())


def restricted_weight(u_out: torch.Tensor, weight: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """``M = U_out^T W U_in`` (``[k_out, k_in]``): the weight (a conv's flattened to ``[out, in]``) restricted
    to the subspaces ``U_out`` / ``U_in`` span. ``W' = P_out W P_in`` is ``U_out M U_in^T``: the same non-zero
    singular values and the same Frobenius distances, at the small size."""
    return u_out.T @ weight.reshape(weight.shape[0], -1) @ u_in


@dataclass(frozen=True)
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
        """``(k_in, k_out)`` at ``energy``."""
        return energy_rank(self.eig_in, energy), energy_rank(self.eig_out, energy)

    def bases(self, k_in: int, k_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_in, U_out)``: the top ``k_in`` eigenvectors of ``C_in`` and the top ``k_out`` of ``C_out``."""
        return self.vec_in[:, :k_in], self.vec_out[:, :k_out]

    def restricted(self, k_in: int, k_out: int) -> torch.Tensor:
        """``M = U_out^T W U_in`` (``[k_out, k_in]``) at these ranks (``restricted_weight``)."""
        u_in, u_out = self.bases(k_in, k_out)
        return restricted_weight(u_out, self.weight, u_in)

    def projection_factors(self, k_in: int, k_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's projection ``W' = P_out W P_in = B A`` (DESIGN §1 step 5) as ``(A, B)``: ``A``
        ``(r, in)``, ``B`` ``(out, r)``, ``r = min(k_in, k_out)``, cut further where the small
        ``M = U_out^T W U_in`` is itself rank deficient (then ``r`` is ``M``'s numerical rank)."""
        u_in, u_out = self.bases(k_in, k_out)
        m = restricted_weight(u_out, self.weight, u_in)  # [k_out, k_in]
        p, s, qh = torch.linalg.svd(m, full_matrices=False)
        r = int(nonzero(s * s).sum()) if s.numel() and s[0] > 0 else 0
        if r < min(k_in, k_out):
            return qh[:r] @ u_in.T, u_out @ (p[:, :r] * s[:r])
        if k_in <= k_out:
            return u_in.T, u_out @ m
        return m @ u_in.T, u_out

    def output_optimal_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-``rank`` map closest to ``W`` on the data, ``argmin sum_t ||W x_t - W' x_t||^2``:
        ``W' = U_r U_r^T W`` with ``U_r`` the top eigenvectors of ``C_out = W C_in W^T`` (the truncated
        SVD of ``W C_in^(1/2)``, as in SVD-LLM), as ``(A, B) = (U_r^T W, U_r)``."""
        rank = min(rank, int((self.eig_out > 0).sum()))
        u = self.vec_out[:, :rank]
        return u.T @ self.weight, u

    def projected_weight(self, k_in: int, k_out: int) -> torch.Tensor:
        """``W' = P_out W P_in`` with the top ``k_in`` / ``k_out`` eigenvectors, as its factors give it."""
        a, b = self.projection_factors(k_in, k_out)
        return b @ a

    def relative_output_error(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """``sum_t ||(W - B A) x_t||^2 / sum_t ||W x_t||^2`` on the statistics' data, from ``C_in`` as
        ``U_in diag(eig_in) U_in^T`` (no pass over the data)."""
        d = (self.weight - b.detach().double() @ a.detach().double()) @ self.vec_in  # [out, in]
        total = float(self.eig_out.sum())
        return float((d * d * self.eig_in).sum()) / total if total > 0 else 0.0


def layer_subspaces(stats: LayerStats, weight: torch.Tensor) -> LayerSubspaces:
    w = weight.detach().reshape(weight.shape[0], -1).to(device=stats.cov.device, dtype=torch.float64)
    if w.shape[1] != stats.in_features:
        raise ValueError(f"layer {stats.name}: weight has {w.shape[1]} inputs, statistics {stats.in_features}")
    eig_in, vec_in = symmetric_eigh(stats.cov)
    eig_out, vec_out = symmetric_eigh(w @ stats.cov.to(torch.float64) @ w.T)
    return LayerSubspaces(stats.name, w, eig_in, vec_in, eig_out, vec_out)


class Subspaces(Mapping[str, LayerSubspaces]):
    """Every analyzed layer's ``LayerSubspaces``, by name; ``skipped`` names the layers the statistics
    cover but that have no subspace (no tokens, or all-zero inputs or outputs), with the reason."""

    def __init__(self, layers: Mapping[str, LayerSubspaces], skipped: Mapping[str, str] | None = None,
                 meta: Mapping | None = None):
        self._layers, self.skipped, self.meta = dict(layers), dict(skipped or {}), dict(meta or {})

    def __getitem__(self, name: str) -> LayerSubspaces:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (safetensors) atomically."""
        tensors = {f"{name}::{field}": getattr(s, field).detach().cpu().contiguous()
                   for name, s in self._layers.items()
                   for field in ("weight", "eig_in", "vec_in", "eig_out", "vec_out")}
        header = {"format": SUBSPACES_FORMAT, "layers": list(self._layers), "skipped": self.skipped, "meta": self.meta}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"utilrank": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Subspaces:
        with open_safetensors(path, "subspaces", str(device)) as f:
            header = json.loads((f.metadata() or {}).get("utilrank", "{}"))
            if header.get("format") != SUBSPACES_FORMAT:
                raise ValueError(f"subspaces {path}: not a {SUBSPACES_FORMAT} file")
            layers = {name: LayerSubspaces(name, *(f.get_tensor(f"{name}::{k}") for k in
                                                   ("weight", "eig_in", "vec_in", "eig_out", "vec_out")))
                      for name in header["layers"]}
        return cls(layers, header.get("skipped"), header.get("meta"))

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the first layer whose weight is not the one these subspaces were
        computed from (the subspaces of another model, or of the model before fine-tuning)."""
        modules = dict(model.named_modules())
        for name, s in self._layers.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"subspaces name layer {name}, which the model does not have")
            w = module.weight.detach().reshape(module.weight.shape[0], -1).to(s.weight.device, torch.float64)
            if w.shape != s.weight.shape or not torch.allclose(w, s.weight, rtol=1e-5, atol=1e-7):
                raise ValueError(f"layer {name}: its weight differs from the one the subspaces were computed "
                                 "from (statistics of another model?)")


def compute_subspaces(model: nn.Module, stats: Statistics, *, progress: bool = True) -> Subspaces:
    """Eigendecompose every layer's ``C_in`` and ``C_out = W C_in W^T`` (fp64), one progress step per layer
    (the slow phase on wide layers: minutes for a 4608-wide conv covariance on a 2-core CPU)."""
    stats.check_model(model)
    modules = dict(model.named_modules())
    layers, skipped = {}, {}
    work = sorted(stats.layers.items(), key=lambda kv: -kv[1].in_features)  # widest first: an honest ETA
    bar = tqdm(work, desc="eigendecompositions", unit="layer", disable=not progress)
    for name, s in bar:
        bar.set_postfix_str(f"{name} ({s.in_features} wide)", refresh=False)
        module = modules[name]
        if s.tokens == 0:
            skipped[name] = "saw no tokens"
            continue
        sub = layer_subspaces(s, module.weight)
        if not (sub.eig_in > 0).any() or not (sub.eig_out > 0).any():
            skipped[name] = "its inputs or outputs are all zero on the data"
            continue
        layers[name] = sub
    order = [n for n in stats.layers if n in layers]  # back to module order
    return Subspaces({n: layers[n] for n in order}, skipped, dict(stats.meta))
