"""Energy thresholds and the utilization report."""

import json

import pytest
import torch
import torch.nn.functional as F
from _models import TokenMLP
from torch import nn

from utilrank_kernels.analysis import (
    Report,
    build_report,
    collect_stats,
    compute_subspaces,
    energy_rank,
    format_table,
    symmetric_eigh,
)
from utilrank_kernels.analysis.report import sample_bounded, select_layers
from utilrank_kernels.plots import plot_utilization


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
    assert set(doc) == {"format", "model", "dataset", "energy", "tokens", "mlu", "mlu_unbounded", "layers",
                        "skipped"}  # the contract's keys, and the MLU over the layers the samples do not bound
    assert {"name": "unused", "reason": "saw no tokens"} in doc["skipped"]
    assert set(doc["layers"][0]) == {"name", "kind", "in_features", "out_features", "kernel_size", "k_in", "k_out",
                                     "rank", "full_rank", "weight_rank", "utilization", "params_dense",
                                     "params_factored", "samples", "sample_bounded"}
    assert rows["fc1"].samples == 160 and not rows["fc1"].sample_bounded and rows["head"].samples == 20
    assert report.mlu_unbounded == report.mlu and not report.bounded  # every layer saw more samples than its rank
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


class SampleSides(nn.Module):
    """Three layers that see different numbers of samples: ``tokens`` (64 -> 16, a rank-6 weight) and ``fc``
    (16 -> 24) every token, ``pooled`` (64 -> 32) one row per example."""

    def __init__(self):
        super().__init__()
        self.tokens, self.fc, self.pooled = nn.Linear(64, 16), nn.Linear(16, 24), nn.Linear(64, 32)
        with torch.no_grad():
            self.tokens.weight.copy_(torch.randn(16, 6) @ torch.randn(6, 64) / 8)

    def forward(self, x):  # [B, T, 64]
        return self.pooled(x.mean(1)).sum(-1) + self.fc(self.tokens(x)).sum((1, 2))


def reference_rows(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, dict]:
    """Per layer, from its stacked inputs in fp64 (captured by hooks, independent of the statistics): the sample
    count, the ranks of the inputs and of the pre-bias outputs (singular values above 1e-5 of the largest: fp32
    rounding sits near 1e-7), whether the samples are fewer than min(in, out), and the utilization."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    rows = {}
    for name, xs in inputs.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        w = dict(model.named_modules())[name].weight.double()
        k_in = int(torch.linalg.matrix_rank(x, rtol=1e-5))
        k_out = int(torch.linalg.matrix_rank(x @ w.T, rtol=1e-5))
        full = min(w.shape)
        rows[name] = {"samples": x.shape[0], "k_in": k_in, "k_out": k_out, "bounded": x.shape[0] < full,
                      "utilization": min(k_in, k_out) / full}
    return rows


def test_sample_bound_flags_layers_that_saw_fewer_samples_than_their_rank(tmp_path):
    """``pooled`` (64 -> 32) sees 10 rows: flagged, and its input rank is the 10 of its stacked inputs; ``tokens``
    (64 -> 16) sees 40 tokens, fewer than its 64 inputs (its input side is capped: ``k_in`` = 40) but not fewer than
    its full rank 16: not flagged; the MLU over the unflagged layers is the mean of their reference utilizations."""
    torch.manual_seed(0)
    model = SampleSides()
    batches = list(torch.randn(2, 5, 4, 64))  # 2 batches of 5 examples x 4 tokens: 40 tokens, 10 examples
    stats = collect_stats(model, batches, progress=False, meta={"model": "sample-sides", "dataset": "synthetic"})
    report = build_report(model, stats, compute_subspaces(model, stats, progress=False), energy=1.0)
    ref, rows = reference_rows(model, batches), {r.name: r for r in report.layers}
    assert set(rows) == set(ref) == {"tokens", "fc", "pooled"}
    for name, r in rows.items():
        want = ref[name]
        assert (r.samples, r.sample_bounded, r.k_in, r.k_out) == (want["samples"], want["bounded"], want["k_in"],
                                                                  want["k_out"]), name
        assert r.utilization == pytest.approx(want["utilization"]), name
    assert rows["pooled"].samples == 10 and rows["pooled"].sample_bounded and rows["pooled"].k_in == 10
    assert rows["pooled"].rank <= rows["pooled"].samples
    assert rows["tokens"].samples == 40 and rows["tokens"].k_in == 40 < 64 and not rows["tokens"].sample_bounded
    assert (rows["tokens"].k_out, rows["fc"].k_in) == (6, 7)  # the rank-6 weight; its outputs plus the bias
    free = [v["utilization"] for v in ref.values() if not v["bounded"]]
    assert report.mlu_unbounded == pytest.approx(sum(free) / len(free))
    assert report.mlu == pytest.approx(sum(v["utilization"] for v in ref.values()) / 3)
    assert report.mlu_unbounded > report.mlu  # 10 samples held pooled's utilization at 10/32
    assert [r.name for r in report.bounded] == ["pooled"]

    # the file: per-layer samples and the flag, the MLU without the flagged layers; read back through its schema
    report.save(tmp_path / "report.json")
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["mlu_unbounded"] == pytest.approx(report.mlu_unbounded)
    pooled = next(row for row in doc["layers"] if row["name"] == "pooled")
    assert (pooled["samples"], pooled["sample_bounded"]) == (10, True)
    assert Report.load(tmp_path / "report.json") == report

    # the table: the flagged row's count marked, the MLU without it, a warning naming the layer
    table = format_table(report)
    marked = [line for line in table.splitlines() if line.rstrip().endswith("10!")]
    assert len(marked) == 1 and marked[0].startswith("pooled "), table
    assert f"MLU {report.mlu:.3f} ({report.mlu_unbounded:.3f} over the 2 not bounded by their samples)" in table
    warning = next(line for line in table.splitlines() if line.startswith("warning:"))
    assert "1 of 3 layers (marked !)" in warning and "pooled, 10 samples, full rank 32" in warning
    assert f"{report.mlu_unbounded:.3f} over the other 2" in report.sample_notes()[0]

    plot_utilization(doc, tmp_path / "utilization.png")
    assert (tmp_path / "utilization.png").stat().st_size > 5_000


def test_conv_samples_are_output_pixels():
    """A conv's samples are its output pixels (the rows of its im2col input): 2 images of 6 x 6 through a 3 x 3
    conv give 2 * 4 * 4 = 32 rows for a 27 -> 8 layer (not bounded); 4 x 4 images give 2 * 2 * 2 = 8 rows, still
    not fewer than min(27, 8); a 1-image 4 x 4 batch gives 4 < 8: bounded, its input rank that of the unfolded
    patches."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    for images, want, bounded in ((torch.randn(2, 3, 6, 6), 32, False), (torch.randn(2, 3, 4, 4), 8, False),
                                  (torch.randn(1, 3, 4, 4), 4, True)):
        stats = collect_stats(conv, [images], progress=False)
        row = build_report(conv, stats, compute_subspaces(conv, stats, progress=False), energy=1.0).layer("0")
        patches = F.unfold(images.double(), 3).transpose(1, 2).reshape(-1, 27)  # [pixels, C * kh * kw]
        assert (row.samples, row.sample_bounded) == (patches.shape[0], bounded) and row.samples == want
        assert row.k_in == int(torch.linalg.matrix_rank(patches, rtol=1e-5)) <= want


def test_sample_bound_rule_and_older_reports():
    """The rule at its edges (samples against min(in, out), not against in), and a report written before sample
    counts: it loads, its MLU over unbounded layers is unknown (None), and its table shows '-'."""
    assert sample_bounded(10, 64, 32) and sample_bounded(31, 64, 32)
    assert not sample_bounded(32, 64, 32) and not sample_bounded(686, 960, 160)  # the wide projection: in > samples
    old = {"format": "utilrank.report/1", "model": "m", "dataset": "d", "energy": 0.99, "tokens": 5, "mlu": 0.5,
           "layers": [{"name": "fc", "kind": "linear", "in_features": 4, "out_features": 4, "kernel_size": None,
                       "k_in": 2, "k_out": 2, "rank": 2, "full_rank": 4, "weight_rank": 4, "utilization": 0.5,
                       "params_dense": 16, "params_factored": 16}], "skipped": []}
    report = Report.from_dict(old)
    assert report.layers[0].samples is None and report.mlu_unbounded is None and not report.bounded
    table = format_table(report)
    assert not report.sample_notes() and "warning" not in table and "bounded" not in table
    assert table.splitlines()[2].rstrip().endswith("-")
