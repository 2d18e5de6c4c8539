"""Latency-aware plans: decisions from measured (or recorded) timings, ranks rounded up only where free."""

import json

import pytest
import torch
from torch import nn

from utilrank_kernels import Plan, collect_stats, compute_subspaces, factor_model
from utilrank_kernels.compress import LayerPlan, latency
from utilrank_kernels.compress.latency import LatencyTable, latency_aware, round_up_candidates


class Tiny(nn.Module):
    """A layer factoring clearly pays on (wide, low rank), one it cannot (near break-even rank), and one too
    small for two calls to beat one."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(256, 1024)
        self.even = nn.Linear(1024, 128)
        self.small = nn.Linear(128, 8)

    def forward(self, x):
        return self.small(self.even(torch.relu(self.wide(x))))


TINY_PLAN = Plan("tiny", {"wide": LayerPlan("linear", 14, 14, 20, reason="energy 0.9"),
                          "even": LayerPlan("linear", 110, 110, 110, reason="energy 0.99"),
                          "small": LayerPlan("linear", 5, 5, 6, reason="energy 0.99")},
                 {"other": "excluded by filter"})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_latency_aware_plan_follows_its_measurements_and_reuses_them(tmp_path):
    """Every factored layer was measured faster than dense by the margin, every dense one not, and a second
    plan on the same device takes every decision from the recorded table (no wall-clock assertion here:
    benchmarks/ time whole models)."""
    model = Tiny().eval()
    example, batch = torch.randn(1, 16, 256), 16
    table = LatencyTable(torch.device("cpu"), tmp_path / "cpu.json")
    plan = latency_aware(model, TINY_PLAN, example, "cpu", batch, table=table)
    assert set(plan.layers) | (set(plan.dense) - {"other"}) == set(TINY_PLAN.layers)
    assert "wide" in plan.layers  # a 256x1024 layer at rank <= 16 is several times cheaper
    for name, entry in plan.layers.items():
        t = entry.latency
        assert t["factored_ms"] <= (1 - latency.MIN_GAIN) * t["dense_ms"] and t["batch"] == batch, name
    for name in set(TINY_PLAN.layers) - set(plan.layers):
        assert plan.dense[name].startswith("latency:") and "batch 16" in plan.dense[name]
    assert plan.meta["target"] == {"device": "cpu", "batch": 16}

    again = LatencyTable(torch.device("cpu"), tmp_path / "cpu.json")
    assert latency_aware(model, TINY_PLAN, example, "cpu", batch, table=again).layers.keys() == plan.layers.keys()
    assert again.measured == 0  # every decision came from the recorded table
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert data["format"] == "utilrank.latency/1" and len(data["entries"]) == 3


def _fake_measure(times_by_rank):
    def measure(module, shape, ranks, device, dtype, backend):
        return {"dense": 1.0, "ranks": {str(r): times_by_rank(module, r) for r in ranks}}

    return measure


def test_rounding_goes_up_only_where_it_costs_nothing(monkeypatch, tmp_path):
    model = Tiny()
    plan = Plan("tiny", {"wide": LayerPlan("linear", 27, 27, 40, reason="energy 0.9"),
                         "even": LayerPlan("linear", 100, 100, 120, reason="energy 0.99")})
    # wide: 32 is as fast as 27 (rounded); even: any rounding costs 10% (kept at 100)
    slow_up = lambda m, r: 0.5 if m is model.wide else (0.5 if r == 100 else 0.55)  # noqa: E731
    monkeypatch.setattr(latency, "_measure", _fake_measure(slow_up))
    out = latency_aware(model, plan, torch.randn(1, 4, 256), "cpu", 2,
                        table=LatencyTable(torch.device("cpu"), tmp_path / "t.json"))
    assert dict(out.dense) == {}
    wide, even = out.layers["wide"], out.layers["even"]
    assert (wide.rank, wide.k_in, wide.k_out) == (32, 32, 40)
    assert "rank rounded up 27 -> 32 (multiple of 32)" in wide.reason
    assert even.rank == 100 and "rounded" not in even.reason
    for name, entry in out.layers.items():
        before = plan.layers[name]
        assert entry.rank >= before.rank and entry.k_in >= before.k_in and entry.k_out >= before.k_out
    assert plan.layers["wide"].rank == 27  # the input plan is not modified


def test_slower_factored_layers_stay_dense_with_their_reason(monkeypatch, tmp_path):
    model = Tiny()
    monkeypatch.setattr(latency, "_measure", _fake_measure(lambda m, r: 0.99 if m is model.even else 0.4))
    out = latency_aware(model, TINY_PLAN, torch.randn(1, 4, 256), "cpu", 8,
                        table=LatencyTable(torch.device("cpu"), tmp_path / "t.json"))
    assert set(out.layers) == {"wide", "small"}
    assert out.dense["other"] == "excluded by filter"
    assert out.dense["even"] == ("latency: factored at rank 110 takes 0.99 ms, dense 1 ms on cpu at batch 8 "
                                 "(kept factored only if <= 0.97x dense)")
    assert out.layers["wide"].latency == {"device": "cpu", "batch": 8, "dense_ms": 1.0, "factored_ms": 0.4}


def test_rounded_data_factors_decompose_at_the_new_rank(monkeypatch, tmp_path):
    model = nn.Sequential(nn.Linear(64, 128)).eval()
    stats = collect_stats(model, [torch.randn(256, 64) for _ in range(2)], progress=False)
    subspaces = compute_subspaces(model, stats, progress=False)
    plan = Plan("seq", {"0": LayerPlan("linear", 27, 27, 27, reason="test")})
    monkeypatch.setattr(latency, "_measure", _fake_measure(lambda m, r: 0.3))
    out = latency_aware(model, plan, torch.randn(1, 64), "cpu", 4,
                        table=LatencyTable(torch.device("cpu"), tmp_path / "t.json"))
    assert out.layers["0"].rank == 32
    compressed, used = factor_model(model, out, subspaces)
    assert compressed[0].rank == used.layers["0"].rank == 32


def test_round_up_candidates():
    assert round_up_candidates(307, 768, 3072, (8, 16, 32, 64)) == [312, 320]
    assert round_up_candidates(5, 128, 8, (8, 16)) == []  # 8 would add 60% to the rank
    assert round_up_candidates(60, 64, 128, (16, 32, 64)) == []  # rank 64 saves no parameters
    assert round_up_candidates(256, 768, 768, (16, 64)) == []  # already a multiple


def test_latency_aware_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="choose cpu or cuda"):
        latency_aware(Tiny(), TINY_PLAN, torch.randn(1, 4, 256), "mps", 8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            latency_aware(Tiny(), TINY_PLAN, torch.randn(1, 4, 256), "cuda", 8)
    with pytest.raises(ValueError, match="target-batch"):
        latency_aware(Tiny(), TINY_PLAN, torch.randn(1, 4, 256), "cpu", 0)
