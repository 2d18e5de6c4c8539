"""Error-aware statistics (``compress.sequential``): each layer's ``C_in`` on the outputs of the already-factored
layers before it, against an fp64 reference computed by hand; at full rank, the plain one-pass statistics."""

import json
from types import SimpleNamespace

import pytest
import torch
from _cases import Case
from _data import make_imagefolder
from torch import nn

from utilrank_kernels import CompressConfig, Statistics, TrainRecipe, collect_stats, compress_model
from utilrank_kernels.cli import main
from utilrank_kernels.compress import collect_stats_sequential
from utilrank_kernels.compress.plan import LayerPlan, Plan
from utilrank_kernels.compress.sequential import block_of, energy_rule, steps


def _two_layers() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(7, 6, generator=g) for _ in range(3)]


def _top(c: torch.Tensor, k: int) -> torch.Tensor:
    """The top ``k`` eigenvectors of a symmetric ``c`` (fp64), as columns."""
    vals, vecs = torch.linalg.eigh(c)
    return vecs[:, vals.argsort(descending=True)[:k]]


@pytest.mark.parametrize("method", ["optimal", "data"])
def test_second_layer_statistics_are_those_of_the_factored_first_layer(method):
    model, batches = _two_layers()
    rank = 2
    stats = collect_stats_sequential(model, batches, lambda name, sub: rank, method=method, progress=False)
    # the fp64 reference, by hand: layer 1 factored at rank 2 from its own C_in, then C_in of layer 2 on its output
    x = torch.cat(batches).double()
    w1, b1 = model[0].weight.double(), model[0].bias.double()
    c1 = x.T @ x
    if method == "optimal":
        u = _top(w1 @ c1 @ w1.T, rank)
        w1_factored = u @ u.T @ w1
    else:  # P_out W P_in with the top eigenvectors of C_in and C_out
        u_in, u_out = _top(c1, rank), _top(w1 @ c1 @ w1.T, rank)
        w1_factored = u_out @ u_out.T @ w1 @ u_in @ u_in.T
    h = torch.tanh(x @ w1_factored.T + b1)
    reference = h.T @ h
    got = stats.layers["2"].cov
    assert torch.allclose(stats.layers["0"].cov, c1, rtol=1e-5, atol=1e-5)
    assert ((got - reference).norm() / reference.norm()).item() < 1e-5
    plain = collect_stats(model, batches, progress=False).layers["2"].cov
    assert ((plain - reference).norm() / reference.norm()).item() > 1e-3  # the test can tell the two apart
    assert stats.layers["2"].tokens == stats.layers["0"].tokens == 21 and stats.batches == 3


@pytest.mark.parametrize("method", ["optimal", "data"])
def test_full_rank_gives_the_plain_statistics(vit_case, method):
    def full(name, sub):
        out_features, in_features = sub.weight.shape
        return LayerPlan("linear", min(in_features, out_features), in_features, out_features)

    stats = collect_stats_sequential(vit_case.model, vit_case.batches, full, method=method, progress=False)
    assert list(stats.layers) == list(vit_case.stats.layers)
    for name, s in stats.layers.items():
        ref = vit_case.stats.layers[name]
        assert s.tokens == ref.tokens
        assert ((s.cov.cpu() - ref.cov.cpu()).norm() / ref.cov.norm()).item() < 1e-4, name


def test_steps_are_blocks_and_the_layers_outside_them(vit_case):
    names = list(vit_case.stats.layers)
    grouped = steps(names)
    assert [block_of(g[0]) for g in grouped] == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    assert grouped[1] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert block_of("encoder.layer.11.attention.self.query") == "encoder.layer.11"
    assert block_of("layer1.0.conv1") == "layer1.0"


def test_energy_rule_keeps_a_layer_dense_where_factors_do_not_pay(vit_case):
    sub = vit_case.subspaces["blocks.0.attn.qkv"]
    assert energy_rule(1.0)("blocks.0.attn.qkv", sub) is None
    entry = energy_rule(0.5)("blocks.0.attn.qkv", sub)
    assert entry.rank == min(sub.ranks(0.5)) and (entry.k_in, entry.k_out) == sub.ranks(0.5)


def test_bad_arguments_are_refused():
    model, batches = _two_layers()
    with pytest.raises(ValueError, match="svd"):
        collect_stats_sequential(model, batches, lambda n, s: 1, method="svd", progress=False)
    with pytest.raises(ValueError, match="iterator"):
        collect_stats_sequential(model, iter(batches), lambda n, s: 1, progress=False)
    with pytest.raises(ValueError, match="svd"):
        CompressConfig(method="svd", error_aware=True)


def _token_data(case) -> SimpleNamespace:
    """The case's batches as train/val/test splits (one dataset, labels unused)."""
    xs = torch.cat(case.batches)
    ds = torch.utils.data.TensorDataset(xs, torch.zeros(len(xs), dtype=torch.long))
    return SimpleNamespace(train=ds, val=ds, test=ds, name="tokens")


def test_pipeline_runs_error_aware_and_records_it():
    case = Case("linear", batches=2)
    data = _token_data(case)
    config = CompressConfig(tolerance=None, energy=0.9, error_aware=True, stats_batch_size=4,
                            finetune=TrainRecipe(epochs=0))
    result = compress_model(case.model, data, config, progress=False, score=False)
    assert result.statistics.meta["error_aware"]["method"] == "optimal"
    assert set(result.statistics.layers) == set(case.stats.layers)
    with pytest.raises(ValueError, match="not both"):
        compress_model(case.model, data, config, statistics=case.stats, progress=False, score=False)


def test_pipeline_at_energy_one_gives_the_plain_statistics(tmp_path):
    """Energy 1.0 keeps every layer at its full rank (dense in the pass, where factors would not pay): the
    error-aware statistics are the plain pass's; they save and load with their ``error_aware`` meta."""
    case = Case("linear", batches=2)
    data = _token_data(case)
    config = CompressConfig(tolerance=None, energy=1.0, error_aware=True, stats_batch_size=4,
                            finetune=TrainRecipe(epochs=0))
    stats = compress_model(case.model, data, config, progress=False, score=False).statistics
    for name, s in stats.layers.items():
        assert torch.allclose(s.cov, case.stats.layers[name].cov, rtol=1e-6, atol=1e-6), name
    stats.save(tmp_path / "stats.safetensors")
    again = Statistics.load(tmp_path / "stats.safetensors")
    assert again.meta["error_aware"]["steps"] == 4 and set(again.layers) == set(stats.layers)


def test_cli_error_aware_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "o"
    images = make_imagefolder(tmp_path / "img", per_class=4, size=16)
    assert main(["compress", "--model", "test_vit", "--data", str(images), "--energy", "0.9", "--batch-size", "8",
                 "--engines", "eager", "--no-search", "--finetune-epochs", "0", "--error-aware",
                 "--out", str(out)]) == 0
    stats = Statistics.load(out / "stats.safetensors")
    assert stats.meta["error_aware"]["method"] == "optimal"
    assert json.loads((out / "plan.json").read_text())["layers"]


def test_a_given_plan_sets_the_ranks_the_pass_factors_at():
    """With a plan, the pass factors each earlier layer at the plan's rank: fc2's statistics are taken on the
    outputs of fc1 factored at rank 3, the fc1 the compressed model holds (no fine-tuning)."""
    case = Case("linear", batches=2)
    data = _token_data(case)
    plan = Plan("TokenMLP", {"fc1": LayerPlan("linear", 3), "fc2": LayerPlan("linear", 2)}, method="optimal")
    config = CompressConfig(tolerance=None, error_aware=True, stats_batch_size=4,
                            finetune=TrainRecipe(epochs=0))
    result = compress_model(case.model, data, config, plan=plan, progress=False, score=False)
    assert result.model.fc1.rank == 3
    recorded = []
    hook = result.model.fc2.register_forward_pre_hook(lambda m, inputs: recorded.append(inputs[0].double()))
    with torch.no_grad():
        result.model(torch.cat(case.batches))
    hook.remove()
    h = recorded[0].reshape(-1, recorded[0].shape[-1])
    reference = h.T @ h
    assert ((result.statistics.layers["fc2"].cov - reference).norm() / reference.norm()).item() < 1e-5
    plain = case.stats.layers["fc2"].cov
    assert ((plain - reference).norm() / reference.norm()).item() > 1e-3
