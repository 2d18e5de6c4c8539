"""``compress_model``: the pipeline in one call, re-entered from a saved plan."""

import dataclasses

import pytest
import timm
import torch
from torch.utils.data import TensorDataset

from utilrank_kernels import CompressConfig, Plan, TrainRecipe, compress_model
from utilrank_kernels.nn import LowRankLinear


@dataclasses.dataclass
class Splits:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    name: str = "random"


def _timm_and_data(classes=3, n=24):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=classes).eval()
    g = torch.Generator().manual_seed(0)
    split = lambda k: TensorDataset(torch.randn(k, 3, 32, 32, generator=g),  # noqa: E731
                                    torch.randint(0, classes, (k,), generator=g))
    return model, Splits(split(n), split(n // 2), split(n // 2))


def test_one_call_compresses_a_timm_model_and_a_saved_plan_reenters(tmp_path):
    model, data = _timm_and_data()
    config = CompressConfig(method="optimal", tolerance=None, energy=0.9, exclude=("head",),
                            finetune=TrainRecipe(epochs=1, batch_size=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compress_model(model, data, config, arch="vit_tiny_patch16_224", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is not modified
    assert "head" not in result.plan.layers and result.plan.dense["head"] == "excluded by filter"
    assert all(isinstance(result.model.get_submodule(n), LowRankLinear)
               for n, e in result.plan.layers.items() if e.kind == "linear")
    assert set(result.scores) == {"dense", "projected", "compressed"}
    assert all(0 <= v <= 1 for s in result.scores.values() for v in s.values())
    saved = {r.name: r.saved_rank for r in result.report.layers}
    assert saved == {r.name: result.plan.layers[r.name].rank if r.name in result.plan.layers else None
                     for r in result.report.layers}
    # plan -> factors again, from the saved plan and the same statistics: the same model
    result.plan.save(tmp_path / "plan.json")
    again = compress_model(model, data, config, plan=Plan.load(tmp_path / "plan.json"), statistics=result.statistics,
                           progress=False)
    assert again.plan == result.plan
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 result.model.state_dict().values(), strict=True))


def test_inputs_are_checked_before_any_compute():
    model, data = _timm_and_data()
    with pytest.raises(ValueError, match="validation split"):
        compress_model(model, dataclasses.replace(data, val=None), CompressConfig(), progress=False)
    with pytest.raises(ValueError, match="method 'bogus'"):
        CompressConfig(method="bogus")
    with pytest.raises(ValueError, match="energy"):
        CompressConfig(energy=1.5)
    with pytest.raises(ValueError, match="fine-tuning recipe"):
        TrainRecipe(epochs=-1)


def test_uniform_fraction_needs_no_data():
    model, _ = _timm_and_data()
    result = compress_model(model, None, CompressConfig(method="svd", param_fraction=0.5, rank_multiple=1,
                                                        finetune=TrainRecipe(epochs=0)), score=False, progress=False)
    for name, entry in result.plan.layers.items():
        m = result.model.get_submodule(name)
        n_in, n_out = m.weight_a[0].numel(), m.weight_b.shape[0]
        assert entry.rank * (n_in + n_out) <= 0.5 * n_in * n_out


def test_svd_factors_at_the_data_ranks_with_a_report():
    """``method="svd"``: ranks from the data (an energy cut, the search or a budget), factors from the weights alone;
    statistics given or collected give the report (``compress --method svd`` crashed building it)."""
    from torch.utils.data import DataLoader

    from utilrank_kernels import collect_stats

    model, data = _timm_and_data()
    config = CompressConfig(method="svd", tolerance=None, energy=0.9, finetune=TrainRecipe(epochs=0))
    stats = collect_stats(model, DataLoader(data.train, batch_size=8), progress=False)
    for given in (stats, None):
        result = compress_model(model, data, config, statistics=given, score=False, progress=False)
        assert result.report is not None and result.plan.method == "svd" and result.plan.layers
        for name, entry in result.plan.layers.items():
            weight = model.get_submodule(name).weight.detach().double().flatten(1)
            factored = result.model.get_submodule(name)
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            product = factored.weight_b.double().flatten(1) @ factored.weight_a.double().flatten(1)
            assert torch.allclose(product, (u[:, :entry.rank] * s[:entry.rank]) @ vh[:entry.rank], atol=1e-5)
    # svd factors of a given plan need neither data nor statistics: no report then
    bare = compress_model(model, None, config, plan=result.plan, score=False, progress=False)
    assert bare.report is None and bare.plan.ranks == result.plan.ranks


def test_conflicts_and_unreachable_targets_are_refused_before_any_statistics(monkeypatch):
    """A plan with a target, globs that match no layer, and a target the architecture cannot reach: refused before
    the statistics pass (which here would fail loudly)."""
    from utilrank_kernels.compress import pipeline

    model, data = _timm_and_data()
    monkeypatch.setattr(pipeline, "collect_stats", lambda *a, **k: pytest.fail("statistics collected"))
    plan = Plan("vit", {}, method="optimal")
    with pytest.raises(ValueError, match="a plan fixes every rank: give target_params or a plan"):
        compress_model(model, data, CompressConfig(target_params=0.5), plan=plan, progress=False)
    with pytest.raises(ValueError, match="--exclude 'blocks.7.\\*': matches no Linear"):
        compress_model(model, data, CompressConfig(exclude=("blocks.7.*",)), progress=False)
    with pytest.raises(ValueError, match="together they leave no layer"):
        compress_model(model, data, CompressConfig(include=("head",), exclude=("head",)), progress=False)
    with pytest.raises(ValueError, match=r"--target-params 0.01: out of reach .* LayerNorm x5.* smallest reachable"):
        compress_model(model, data, CompressConfig(target_params=0.01), progress=False)


def test_a_plan_of_another_method_is_refactored_and_said(caplog):
    """In Python the config's method factors a given plan's ranks (a study compares methods at equal ranks), and the
    log says so; the command line refuses the mismatch instead."""
    model, data = _timm_and_data()
    config = CompressConfig(method="optimal", tolerance=None, energy=0.9, finetune=TrainRecipe(epochs=0))
    planned = compress_model(model, data, dataclasses.replace(config, method="data"), score=False, progress=False)
    with caplog.at_level("INFO", logger="utilrank_kernels"):
        again = compress_model(model, data, config, plan=planned.plan, statistics=planned.statistics, score=False,
                               progress=False)
    assert again.plan.method == "optimal" and "made with method 'data', factored by config.method 'optimal'" in \
        caplog.text


def test_scoring_says_what_it_scores(capsys):
    """Scoring a split can take tens of seconds (a text encoder's cosine): a ticking line while each runs."""
    model, data = _timm_and_data()
    config = CompressConfig(tolerance=None, energy=0.9, finetune=TrainRecipe(epochs=0))
    compress_model(model, data, config, progress=True)
    err = capsys.readouterr().err
    for line in ("scoring the dense model: accuracy on val (12 examples)", "scoring the projected model: accuracy on "
                 "test (12 examples)"):
        assert line in err
