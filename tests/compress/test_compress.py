"""Decomposition, plans, save/load and `utilrank compress` (DESIGN §1 steps 5-8)."""

import json

import pytest
import torch
from _models import ConvNet, TokenMLP
from timm.models.vision_transformer import VisionTransformer

from utilrank_kernels import LowRankConv2d, LowRankLinear, apply_plan, decompose, load_compressed, save_compressed
from utilrank_kernels.analysis import analyze, collect_stats
from utilrank_kernels.compress import make_plan, svd_factors
from utilrank_kernels.measure import count_params

VIT_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def rel_err(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


def every_layer_plan(report, arch="test"):
    """All analyzed layers at the report's (k_in, k_out), whether or not factoring saves weights."""
    return make_plan(arch, {r["name"]: {"kind": r["kind"], "rank": r["rank"], "k_in": r["k_in"], "k_out": r["k_out"]}
                            for r in report["layers"]})


CASES = {
    "linear": (TokenMLP, lambda g: torch.randn(4, 6, 12, generator=g)),
    "conv": (ConvNet, lambda g: torch.randn(4, 3, 12, 10, generator=g)),
    "vit": (lambda: VisionTransformer(**VIT_KWARGS), lambda g: torch.randn(4, 1, 16, 16, generator=g)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_energy_one_reproduces_outputs(case):
    torch.manual_seed(0)
    make_model, make_batch = CASES[case]
    model = make_model().eval()
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(g) for _ in range(4)]
    stats = collect_stats(model, batches, progress=False)
    report, subspaces = analyze(model, stats, energy=1.0)
    compressed = decompose(model, subspaces, every_layer_plan(report))
    factored = [m for m in compressed.modules() if isinstance(m, (LowRankLinear, LowRankConv2d))]
    assert len(factored) == len(report["layers"]) > 0
    with torch.no_grad():
        for x in batches:
            assert rel_err(compressed(x), model(x)) <= 1e-4


def test_error_shrinks_as_energy_grows():
    torch.manual_seed(0)
    model = VisionTransformer(**VIT_KWARGS).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 1, 16, 16, generator=g) for _ in range(4)]
    stats = collect_stats(model, calib, progress=False)
    errors = []
    for energy in (0.5, 0.8, 0.95, 0.999, 1.0):
        report, subspaces = analyze(model, stats, energy=energy)
        compressed = decompose(model, subspaces, every_layer_plan(report))
        with torch.no_grad():
            errors.append(max(rel_err(compressed(x), model(x)) for x in calib))
    assert all(b <= a * 1.05 + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 10 * errors[-1]


def test_factor_shapes_parameters_and_weight_view():
    torch.manual_seed(0)
    model = ConvNet().eval()
    stats = collect_stats(model, [torch.randn(4, 3, 12, 10)], progress=False)
    report, subspaces = analyze(model, stats, energy=0.9)
    plan = every_layer_plan(report)
    compressed = decompose(model, subspaces, plan)
    conv = compressed.conv2
    r = plan["layers"]["conv2"]["rank"]
    assert isinstance(conv, LowRankConv2d) and conv.weight_a.shape == (r, 8, 3, 1)
    assert conv.weight_b.shape == (8, r, 1, 1)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 1), (1, 1), (2, 0), (2, 1))
    assert conv.weight.shape == model.conv2.weight.shape
    head = compressed.head
    assert head.weight_a.shape == (plan["layers"]["head"]["rank"], 6) and head.in_features == 6
    expected = count_params(model) - sum(
        (r_["in_features"] * r_["out_features"]) - r_["rank"] * (r_["in_features"] + r_["out_features"])
        for r_ in report["layers"])
    assert count_params(compressed) == expected
    with pytest.raises(AttributeError):
        head.weight = torch.zeros(5, 6)
    # B @ A is the projected weight: the read-only view materializes it
    sub = subspaces["head"]
    w_proj = sub.projected_weight(plan["layers"]["head"]["k_in"], plan["layers"]["head"]["k_out"])
    assert torch.allclose(head.weight.double(), w_proj, atol=1e-5)


def test_save_load_roundtrip_builtin_and_timm(tmp_path):
    torch.manual_seed(0)
    from utilrank_kernels.models import build_builtin
    from utilrank_kernels.models.builtin import VIT_DIGITS_KWARGS

    configs = {
        "builtin": (build_builtin("vit-digits"), {"arch": "vit-digits", "source": "builtin",
                                                  "model_kwargs": VIT_DIGITS_KWARGS}),
        "timm": (VisionTransformer(**VIT_KWARGS), None),
    }
    import timm

    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=7)
    configs["timm"] = (timm_model, {"arch": "vit_tiny_patch16_224", "source": "timm",
                                    "model_kwargs": {"img_size": 32, "num_classes": 7}})
    for key, (model, config) in configs.items():
        model.eval()
        chans, size = (1, 16) if key == "builtin" else (3, 32)
        x = torch.randn(3, chans, size, size)
        stats = collect_stats(model, [x], progress=False)
        report, subspaces = analyze(model, stats, energy=0.95)
        plan = every_layer_plan(report, config["arch"])
        compressed = decompose(model, subspaces, plan)
        save_compressed(compressed, plan, config, tmp_path / key)
        assert {p.name for p in (tmp_path / key).iterdir()} == {"model.safetensors", "plan.json", "config.json"}
        loaded = load_compressed(tmp_path / key)
        with torch.no_grad():
            assert torch.equal(loaded(x), compressed(x)), key


def test_mismatching_plan_lists_every_misfit():
    model = TokenMLP()
    plan = make_plan("x", {
        "fc1": {"kind": "linear", "rank": 4},
        "fc2": {"kind": "conv2d", "rank": 2},
        "nope": {"kind": "linear", "rank": 1},
        "head": {"kind": "linear", "rank": 99},
    })
    with pytest.raises(ValueError) as info:
        apply_plan(model, plan)
    msg = str(info.value)
    assert "fc2 (plan says conv2d" in msg and "nope (no such layer)" in msg and "head (rank 99 exceeds" in msg
    assert "fc1" not in msg.replace("fc1 (", "")  # the fitting layer is not listed
    assert isinstance(model.fc1, torch.nn.Linear)  # nothing was replaced


def test_svd_factors_are_best_weight_approximation():
    w = torch.randn(20, 12, dtype=torch.float64)
    a, b = svd_factors(w, 5)
    u, s, vh = torch.linalg.svd(w)
    assert torch.allclose((w - b @ a).norm() ** 2, (s[5:] ** 2).sum())


@pytest.mark.slow
def test_data_aware_beats_svd_on_builtin_vit():
    """At equal ranks, projecting on the data subspaces preserves held-out outputs better than a
    truncated SVD of the weights alone."""
    from torch.utils.data import DataLoader

    from utilrank_kernels.data import load_data
    from utilrank_kernels.models.loading import trained_builtin

    model = trained_builtin("vit-digits")
    data = load_data("digits")
    stats = collect_stats(model, DataLoader(data.train, batch_size=256), progress=False)
    report, subspaces = analyze(model, stats, energy=0.99)
    plan = every_layer_plan(report, "vit-digits")
    held_out = torch.stack([data.val[i][0] for i in range(len(data.val))])
    with torch.no_grad():
        ref = model(held_out)
        err_data = rel_err(decompose(model, subspaces, plan, method="data")(held_out), ref)
        err_svd = rel_err(decompose(model, subspaces, plan, method="svd")(held_out), ref)
    assert err_data < 0.5 * err_svd, (err_data, err_svd)


@pytest.mark.slow
def test_search_backs_off_until_the_cuts_together_fit():
    """Each cut alone within --tolerance can still cost much together: with a total budget, every layer
    backs off until all projections at once fit it (here "accuracy" is 1 - the relative output error)."""
    from utilrank_kernels.compress import plan_ranks

    torch.manual_seed(0)
    model = VisionTransformer(**VIT_KWARGS).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 1, 16, 16, generator=g) for _ in range(4)]
    report, subspaces = analyze(model, collect_stats(model, batches, progress=False), energy=0.99)
    with torch.no_grad():
        reference = model(batches[0])
        score = lambda m: 1.0 - rel_err(m(batches[0]), reference)  # noqa: E731
        per_layer = plan_ranks(model, report, subspaces, tolerance=5.0, total_tolerance=1e9, evaluate=score,
                               progress=False)[0]
        fitted = plan_ranks(model, report, subspaces, tolerance=5.0, total_tolerance=3.0, evaluate=score,
                            progress=False)[0]
    assert per_layer.keys() == fitted.keys() and len(fitted) > 2
    loose = 1.0 - rel_err(decompose(model, subspaces, make_plan("vit", per_layer))(batches[0]), reference)
    assert 100 * (1.0 - loose) > 3.0  # the per-layer cuts together exceed the budget ...
    together = 1.0 - rel_err(decompose(model, subspaces, make_plan("vit", fitted))(batches[0]), reference)
    assert 100 * (1.0 - together) <= 3.0  # ... and the backed-off ones fit it
    assert all(fitted[n]["energy"] > per_layer[n]["energy"] and "backed off" in fitted[n]["reason"] for n in fitted)


def test_cli_compress_roundtrip(tmp_path, capsys):
    from utilrank_kernels.cli import main
    from utilrank_kernels.data import load_data
    from utilrank_kernels.train import evaluate

    out = tmp_path / "c"
    assert main(["compress", "--finetune-epochs", "1", "--tolerance", "1", "--exclude", "head", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "utilrank.summary/1" and summary["method"] == "data"
    assert summary["compressed"]["params"] < summary["dense"]["params"]
    assert summary["compressed"]["flops"] < summary["dense"]["flops"]
    plan = json.loads((out / "plan.json").read_text())
    assert "head" not in plan["layers"] and plan["dense"]["head"] == "excluded by filter"
    report = json.loads((out / "report.json").read_text())
    assert {"name": "head", "reason": "excluded by filter"} in report["dense"]
    model = load_compressed(out)
    assert evaluate(model, load_data("digits").test) == pytest.approx(summary["compressed"]["accuracy"])
    assert "parameters" in capsys.readouterr().out
