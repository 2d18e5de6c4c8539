"""Plans sized to a parameter budget."""

import pytest

from utilrank_kernels.compress import uniform_plan
from utilrank_kernels.layers import layer_shape
from utilrank_kernels.models import build_builtin


def test_uniform_plan_keeps_at_most_the_fraction_of_every_layer():
    dense = build_builtin("vit-digits")
    plan = uniform_plan(dense, 0.5, multiple=16)
    kept = total = 0
    for name, entry in plan.layers.items():
        shape = layer_shape(dense.get_submodule(name))
        n_in, n_out = shape.in_features, shape.out_features
        exact = int(0.5 * n_in * n_out / (n_in + n_out))
        assert entry.rank == (exact // 16 * 16 if exact // 16 * 16 >= 0.9 * exact else exact)
        assert entry.rank * (n_in + n_out) <= 0.5 * n_in * n_out
        kept, total = kept + entry.rank * (n_in + n_out), total + n_in * n_out
    assert 0.45 < kept / total <= 0.5
    with pytest.raises(ValueError, match="fraction 1.5"):
        uniform_plan(dense, 1.5)
