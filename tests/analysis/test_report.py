"""Energy thresholds and the utilization report."""

import pytest
import torch
from _models import TokenMLP

from utilrank_kernels.analysis import (
    Report,
    build_report,
    collect_stats,
    compute_subspaces,
    energy_rank,
    format_table,
    symmetric_eigh,
)
from utilrank_kernels.analysis.report import select_layers


def low_rank_tokens(n, d, k, generator=None):
    basis = torch.randn(k, d, generator=generator)
    return torch.randn(n, k, generator=generator) @ basis


def test_energy_one_gives_numerical_rank():
    x = low_rank_tokens(500, 24, 7).double()
    vals, _ = symmetric_eigh(x.T @ x)
    assert energy_rank(vals, 1.0) == 7  # rank of the construction


def test_energy_threshold_edges():
    vals = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert energy_rank(vals, 0.4) == 1  # 4/10 holds exactly 40%
    assert energy_rank(vals, 0.41) == 2
    assert energy_rank(vals, 0.9) == 3
    assert energy_rank(vals, 0.9001) == 4
    assert energy_rank(vals, 1.0) == 4
    assert energy_rank(torch.zeros(3, dtype=torch.float64), 0.5) == 0
    with pytest.raises(ValueError, match="energy must be in"):
        energy_rank(vals, 0.0)


def test_analyze_tiny_model_reports_utilized_rank():
    torch.manual_seed(0)
    model = TokenMLP(d=12, hidden=20)
    g = torch.Generator().manual_seed(1)
    tokens = low_rank_tokens(160, 12, 3, g)  # one 3-dimensional subspace for all batches
    batches = list(tokens.reshape(4, 5, 8, 12))
    stats = collect_stats(model, batches, progress=False, meta={"model": "tokenmlp", "dataset": "synthetic"})
    subspaces = compute_subspaces(model, stats, progress=False)
    report = build_report(model, stats, subspaces, energy=1.0)
    rows = {r.name: r for r in report.layers}
    assert rows["fc1"].k_in == 3 and rows["fc1"].rank == 3  # inputs live in 3 dimensions
    assert rows["fc1"].weight_rank == 12 and rows["fc1"].full_rank == 12
    assert rows["fc1"].utilization == pytest.approx(3 / 12)
    assert report.skipped["unused"] == "saw no tokens" and "unused" not in rows
    assert 0 < report.mlu < 1
    assert report.mlu == pytest.approx(sum(r.utilization for r in rows.values()) / len(rows))
    doc = report.to_dict()  # the contract's report.json, exactly
    assert set(doc) == {"format", "model", "dataset", "energy", "tokens", "mlu", "layers", "skipped"}
    assert {"name": "unused", "reason": "saw no tokens"} in doc["skipped"]
    assert set(doc["layers"][0]) == {"name", "kind", "in_features", "out_features", "kernel_size", "k_in", "k_out",
                                     "rank", "full_rank", "weight_rank", "utilization", "params_dense",
                                     "params_factored"}
    assert Report.from_dict(doc) == report
    # the projection keeps the layer's function on the data: W' x == W x for x in the subspace
    sub = subspaces["fc1"]
    w_proj = sub.projected_weight(*sub.ranks(1.0))
    x = batches[0].reshape(-1, 12).double()
    err = (x @ w_proj.T - x @ sub.weight.T).norm() / (x @ sub.weight.T).norm()
    assert err < 1e-5  # the tokens were rounded to fp32 off their subspace by ~1e-7
    assert torch.linalg.matrix_rank(w_proj).item() == 3


def test_table_shows_full_layer_names_and_a_selection_of_layers():
    """Layer names in full (they were cut to their last 28 characters), and ``select_layers``: a report of some
    layers from the same statistics, the others listed as skipped."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = list(low_rank_tokens(160, 12, 3, g).reshape(4, 5, 8, 12))
    wrapped = torch.nn.Sequential()
    wrapped.add_module("encoder_layer_0_intermediate_dense_block", TokenMLP(d=12, hidden=20))  # names over 28 chars
    stats = collect_stats(wrapped, batches, progress=False)
    report = build_report(wrapped, stats, compute_subspaces(wrapped, stats, progress=False), energy=1.0)
    table = format_table(report)
    for name in ("encoder_layer_0_intermediate_dense_block.fc1", "encoder_layer_0_intermediate_dense_block.unused"):
        assert any(line.startswith(name + " ") for line in table.splitlines()), table
    header, rule = table.splitlines()[:2]
    longest = "encoder_layer_0_intermediate_dense_block.unused"  # a skipped layer's name sets the width too
    assert len(header) == len(rule) and header.index("kind") == len(longest) + 1
    chosen = select_layers(stats, lambda name: name.endswith(".fc1"))
    assert list(chosen.layers) == ["encoder_layer_0_intermediate_dense_block.fc1"]
    assert {"name": "encoder_layer_0_intermediate_dense_block.head", "reason": "excluded by filter"} in chosen.skipped
    part = build_report(wrapped, chosen, compute_subspaces(wrapped, chosen, progress=False), energy=1.0)
    assert [r.name for r in part.layers] == list(chosen.layers) and part.layer(list(chosen.layers)[0]) == \
        report.layer(list(chosen.layers)[0])
