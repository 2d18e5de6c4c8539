"""Subspaces: the one rule for a numerical zero, and a saved file that loads back exactly."""

import pytest
import torch
from _models import TokenMLP

from utilrank_kernels import Subspaces, collect_stats, compute_subspaces
from utilrank_kernels.analysis.subspace import NOISE_RTOL, numerical_rank, restricted_weight


def test_numerical_rank_counts_what_is_above_the_noise_floor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 20, generator=g, dtype=torch.float64)
    assert numerical_rank(w) == 4
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s[3] = s[0] * (NOISE_RTOL ** 0.5) * 0.5  # a squared singular value below the floor is a zero
    assert numerical_rank(u @ torch.diag(s) @ vh) == 3


def test_subspaces_save_load_and_refuse_another_model(tmp_path):
    torch.manual_seed(0)
    model = TokenMLP().eval()
    stats = collect_stats(model, [torch.randn(3, 5, 12) for _ in range(2)], progress=False)
    subspaces = compute_subspaces(model, stats, progress=False)
    assert subspaces.skipped == {"unused": "saw no tokens"}
    subspaces.save(tmp_path / "s.safetensors")
    loaded = Subspaces.load(tmp_path / "s.safetensors")
    assert list(loaded) == list(subspaces) and loaded.skipped == subspaces.skipped
    for name in subspaces:
        for field in ("weight", "eig_in", "vec_in", "eig_out", "vec_out"):
            assert torch.equal(getattr(loaded[name], field), getattr(subspaces[name], field))
    loaded.check_model(model)
    other = TokenMLP().eval()
    with pytest.raises(ValueError, match="layer fc1: its weight differs"):
        loaded.check_model(other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        Subspaces.load(tmp_path / "bad.safetensors")


def test_restricted_matrix_has_the_projected_weights_spectrum():
    """``M = U_out^T W U_in`` is ``W' = P_out W P_in`` at its small size: the same non-zero singular values."""
    torch.manual_seed(0)
    model = TokenMLP().eval()
    stats = collect_stats(model, [torch.randn(3, 5, 12) for _ in range(2)], progress=False)
    sub = compute_subspaces(model, stats, progress=False)["fc1"]
    u_in, u_out = sub.bases(4, 6)
    assert u_in.shape == (12, 4) and u_out.shape == (20, 6)
    m = sub.restricted(4, 6)
    assert m.shape == (6, 4) and torch.equal(m, restricted_weight(u_out, sub.weight, u_in))
    projected = torch.linalg.svdvals(u_out @ u_out.T @ sub.weight @ u_in @ u_in.T)[:4]
    assert torch.allclose(torch.linalg.svdvals(m), projected, rtol=1e-10, atol=1e-12)
