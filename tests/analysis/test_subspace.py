"""Subspaces: the one rule for a numerical zero, and a saved file that loads back exactly."""

import pytest
import torch
from _models import TokenMLP

from utilrank_kernels import Subspaces, collect_stats, compute_subspaces
from utilrank_kernels.analysis.subspace import NOISE_RTOL, numerical_rank


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
