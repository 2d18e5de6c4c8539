"""Factors of a layer by each method, and factoring a model to a plan (DESIGN §1 step 5)."""

import pytest
import torch
from _cases import Case, rel_err

from utilrank_kernels import LowRankConv2d, LowRankLinear, Plan, factor_model
from utilrank_kernels.analysis.subspace import NOISE_RTOL
from utilrank_kernels.compress import LayerPlan
from utilrank_kernels.compress.factor import layer_factors, svd_factors
from utilrank_kernels.measure import count_params


def every_layer_plan(report, method="data", arch="test") -> Plan:
    """All analyzed layers at the report's (k_in, k_out), whether or not factoring saves weights."""
    return Plan(arch, {r.name: LayerPlan(r.kind, r.rank, r.k_in, r.k_out) for r in report.layers}, method=method)


@pytest.mark.parametrize("method", ["data", "optimal"])
def test_energy_one_reproduces_outputs(case, method):
    """At energy 1 every layer keeps the directions whose eigenvalues are not numerical zeros (above
    ``NOISE_RTOL`` of the top): on its data, each layer's output error is below that noise floor times the
    dimension (fp64, from the statistics), and where the inputs are well conditioned (the MLP and the
    convnet) the factored model computes what the dense one does to fp32 round-off (measured: 1.6e-7)."""
    report = case.report(1.0)
    compressed, plan = factor_model(case.model, every_layer_plan(report, method), case.subspaces)
    factored = [m for m in compressed.modules() if isinstance(m, (LowRankLinear, LowRankConv2d))]
    assert len(factored) == len(report.layers) > 0
    for row in report.layers:
        sub, layer = case.subspaces[row.name], compressed.get_submodule(row.name)
        a, b = layer.weight_a.reshape(layer.rank, -1).double(), layer.weight_b.reshape(-1, layer.rank).double()
        assert sub.relative_output_error(a, b) <= (row.in_features + row.out_features) * NOISE_RTOL, row.name
    if case.name != "vit":  # the random ViT's attention outputs span 1e7 in eigenvalue: the floor bites there
        with torch.no_grad():
            for x in case.batches:
                assert rel_err(compressed(x), case.model(x)) <= 2e-6


def test_error_shrinks_as_energy_grows(vit_case):
    errors = []
    for energy in (0.5, 0.8, 0.95, 0.999, 1.0):
        compressed, _ = factor_model(vit_case.model, every_layer_plan(vit_case.report(energy)), vit_case.subspaces)
        with torch.no_grad():
            errors.append(max(rel_err(compressed(x), vit_case.model(x)) for x in vit_case.batches))
    assert all(b <= a * 1.05 + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 10 * errors[-1]


def test_output_optimal_factors_minimize_the_output_error(vit_case):
    """On the statistics' own data, ``U_r U_r^T W`` has the least output error of all rank-r maps: less than
    the paper's two-sided projection and than the weights' SVD at the same rank, and its error is the
    discarded eigenvalues of ``C_out`` (the known answer)."""
    for name, sub in vit_case.subspaces.items():
        k_in, k_out = sub.ranks(0.9)
        r = min(k_in, k_out)
        entry = LayerPlan("linear", r, k_in, k_out)
        module = vit_case.model.get_submodule(name)
        errs = {m: sub.relative_output_error(*layer_factors(module, sub, entry, m)) for m in ("optimal", "data", "svd")}
        expected = float(sub.eig_out[r:].sum() / sub.eig_out.sum())
        # rel 1e-5: C_in as rebuilt from its eigenvalues lacks the ones zeroed below the noise floor
        assert errs["optimal"] == pytest.approx(expected, rel=1e-5, abs=1e-12), name
        assert errs["optimal"] <= errs["data"] * (1 + 1e-9) + 1e-12 and errs["optimal"] <= errs["svd"] + 1e-12, name


def test_relative_output_error_matches_the_data(vit_case):
    """``relative_output_error`` (from ``C_in``) equals the error measured on the layer's real inputs."""
    name = "blocks.0.mlp.fc1"
    sub, module = vit_case.subspaces[name], vit_case.model.get_submodule(name)
    a, b = layer_factors(module, sub, LayerPlan("linear", 5, 5, 5), "data")
    inputs = []
    hook = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for x in vit_case.batches:
            vit_case.model(x)
    hook.remove()
    x = torch.cat(inputs).double()
    w = sub.weight
    measured = ((x @ (w - b @ a).T).square().sum() / (x @ w.T).square().sum()).item()
    assert sub.relative_output_error(a, b) == pytest.approx(measured, rel=1e-6)


def test_factor_shapes_parameters_and_weight_view():
    case = Case("conv", batches=1)
    report = case.report(0.9)
    compressed, plan = factor_model(case.model, every_layer_plan(report), case.subspaces)
    conv = compressed.conv2
    r = plan.layers["conv2"].rank
    assert isinstance(conv, LowRankConv2d) and conv.weight_a.shape == (r, 8, 3, 1)
    assert conv.weight_b.shape == (8, r, 1, 1)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 1), (1, 1), (2, 0), (2, 1))
    assert conv.weight.shape == case.model.conv2.weight.shape
    head = compressed.head
    assert head.weight_a.shape == (plan.layers["head"].rank, 6) and head.in_features == 6
    saved = sum(r_.params_dense - r_.rank * (r_.in_features + r_.out_features)
                - (r_.out_features if case.model.get_submodule(r_.name).bias is not None else 0)
                for r_ in report.layers)
    assert count_params(compressed) == count_params(case.model) - saved
    with pytest.raises(AttributeError):
        head.weight = torch.zeros(5, 6)
    # B @ A is the projected weight: the read-only view materializes it
    entry = plan.layers["head"]
    w_proj = case.subspaces["head"].projected_weight(entry.k_in, entry.k_out)
    assert torch.allclose(head.weight.double(), w_proj, atol=1e-5)


def test_rank_deficient_layers_shrink_or_pad_and_say_so():
    """A layer whose outputs live in fewer dimensions than planned is factored at its numerical rank and the
    returned plan says so; with ``keep_ranks`` the factors are zero-padded to the plan (same outputs)."""
    case = Case("linear", batches=2)
    with torch.no_grad():  # fc1's outputs span 3 dimensions
        case.model.fc1.weight.copy_(torch.randn(20, 3) @ torch.randn(3, 12))
    from utilrank_kernels import compute_subspaces

    subspaces = compute_subspaces(case.model, case.stats, progress=False)
    plan = Plan("t", {"fc1": LayerPlan("linear", 8, 8, 8)})
    shrunk, used = factor_model(case.model, plan, subspaces)
    padded, kept = factor_model(case.model, plan, subspaces, keep_ranks=True)
    assert used.layers["fc1"].rank == shrunk.fc1.rank == 3 and "numerical rank" in used.layers["fc1"].reason
    assert kept.layers["fc1"].rank == padded.fc1.rank == 8 and plan.layers["fc1"].rank == 8  # input untouched
    with torch.no_grad():
        x = case.batches[0]
        assert rel_err(padded(x), shrunk(x)) < 1e-6


def test_svd_factors_are_best_weight_approximation():
    w = torch.randn(20, 12, dtype=torch.float64)
    a, b = svd_factors(w, 5)
    _, s, _ = torch.linalg.svd(w)
    assert torch.allclose((w - b @ a).norm() ** 2, (s[5:] ** 2).sum())


@pytest.mark.slow
def test_data_aware_beats_svd_on_builtin_vit():
    """At equal ranks, both data-aware methods preserve held-out outputs better than a truncated SVD of the
    weights alone."""
    from torch.utils.data import DataLoader

    from utilrank_kernels import collect_stats, compute_subspaces
    from utilrank_kernels.analysis import build_report
    from utilrank_kernels.data import load_data
    from utilrank_kernels.models.loading import trained_builtin

    model = trained_builtin("vit-digits")
    data = load_data("digits")
    stats = collect_stats(model, DataLoader(data.train, batch_size=256), progress=False)
    subspaces = compute_subspaces(model, stats, progress=False)
    report = build_report(model, stats, subspaces, 0.99)
    held_out = torch.stack([data.val[i][0] for i in range(len(data.val))])
    with torch.no_grad():
        ref = model(held_out)
        err = {m: rel_err(factor_model(model, every_layer_plan(report, m), subspaces)[0](held_out), ref)
               for m in ("data", "optimal", "svd")}
    assert err["data"] < 0.5 * err["svd"] and err["optimal"] < 0.5 * err["svd"], err
