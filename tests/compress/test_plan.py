"""Plans: a frozen value with a JSON round trip, and the misfits that keep one from applying."""

import dataclasses
import json

import pytest
import torch
from _models import TokenMLP

from utilrank_kernels.compress import LayerPlan, Plan, apply_plan
from utilrank_kernels.compress.plan import PLAN_FORMAT


def test_mismatching_plan_lists_every_misfit():
    model = TokenMLP()
    plan = Plan("x", {
        "fc1": LayerPlan("linear", 4),
        "fc2": LayerPlan("conv2d", 2),
        "nope": LayerPlan("linear", 1),
        "head": LayerPlan("linear", 99),
    })
    with pytest.raises(ValueError) as info:
        apply_plan(model, plan)
    msg = str(info.value)
    assert "fc2 (plan says conv2d" in msg and "nope (no such layer)" in msg and "head (rank 99 exceeds" in msg
    assert "fc1" not in msg.replace("fc1 (", "")  # the fitting layer is not listed
    assert isinstance(model.fc1, torch.nn.Linear)  # nothing was replaced


def test_plan_round_trips_and_cannot_be_mutated(tmp_path):
    plan = Plan("arch", {"fc1": LayerPlan("linear", 4, 5, 4, 0.99, "energy 0.99")}, {"head": "excluded"},
                method="optimal", meta={"energy": 0.99})
    plan.save(tmp_path / "plan.json")
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["format"] == PLAN_FORMAT and doc["layers"]["fc1"] == {"kind": "linear", "rank": 4, "k_in": 5,
                                                                     "k_out": 4, "energy": 0.99,
                                                                     "reason": "energy 0.99"}
    assert Plan.load(tmp_path / "plan.json") == plan
    with pytest.raises(TypeError):
        plan.layers["fc2"] = LayerPlan("linear", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers["fc1"].rank = 2
    wider = plan.replace_layers({"fc1": plan.layers["fc1"].with_rank(6)})
    assert wider.layers["fc1"].rank == 6 and wider.layers["fc1"].k_in == 6 and plan.layers["fc1"].rank == 4


def test_bad_plan_files_are_one_line_errors(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "c.json").write_text(json.dumps({"format": PLAN_FORMAT, "arch": "x", "layers": {"fc1": {"rank": 2}}}))
    for name, words in (("a", "not JSON"), ("b", f"not a {PLAN_FORMAT} file"), ("c", "field layers.fc1.kind: missing")):
        with pytest.raises(ValueError, match=words) as info:
            Plan.load(tmp_path / f"{name}.json")
        assert "\n" not in str(info.value) and str(tmp_path / f"{name}.json") in str(info.value)
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.json")
