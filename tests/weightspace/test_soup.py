"""Weight averaging: uniform and greedy soups, SWA, soups of compressed models, input checks, the command."""

import copy
import json

import pytest
import torch
from _models import ConvNet
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from utilrank_kernels import Plan, build_report, collect_stats, compute_subspaces
from utilrank_kernels.compress import LayerPlan, expand
from utilrank_kernels.weightspace import (
    compressed_soup,
    greedy_compressed_soup,
    greedy_soup,
    load_soup,
    swa,
    uniform_soup,
)
from utilrank_kernels.weightspace.average import state_dict_of, swa_average
from utilrank_kernels.weightspace.compressed import dense_equivalent, planned_stats, refactor

pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(model, scale, seed):
    """A copy of ``model`` with Gaussian noise of ``scale`` times each parameter's std added."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    return out


def assert_states_equal(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


# -- uniform and greedy soups -------------------------------------------------------------------------


def test_soup_of_identical_models_is_the_model():
    torch.manual_seed(0)
    model = BNNet()
    model(torch.randn(4, 3, 5, 5))  # BatchNorm statistics and its counter move off their init
    soup = uniform_soup([model, copy.deepcopy(model), model.state_dict()])
    assert_states_equal(soup, model.state_dict(), atol=0)
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    g = greedy_soup([model, model, model], lambda state: 1.0, progress=False)
    assert_states_equal(g.state_dict, model.state_dict(), atol=0)
    assert g.selected == [0, 1, 2]  # equal scores never drop: all are added
    soup_model = load_soup(BNNet(), soup)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(soup_model.eval()(x), model.eval()(x))


def test_uniform_soup_is_the_mean_and_weights_are_normalized():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    soup = uniform_soup([a, b])
    assert torch.allclose(soup["weight"], (a.weight + b.weight) / 2)
    weighted = uniform_soup([a, b], weights=[3, 1])
    assert torch.allclose(weighted["weight"], 0.75 * a.weight + 0.25 * b.weight)
    with pytest.raises(ValueError, match="non-negative"):
        uniform_soup([a, b], weights=[1, -1])


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    return centers[y] + 0.9 * torch.randn(n, 2, generator=g), y


def test_greedy_soup_never_worse_than_its_best_ingredient_on_validation():
    from utilrank_kernels.train import train

    x, y = _blobs(300, 0)
    xv, yv = _blobs(200, 1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    base = train(mlp, TensorDataset(x, y), epochs=6, lr=0.05, weight_decay=0.0, batch_size=32)
    ingredients = [perturbed(base, s, i) for i, s in enumerate([0.05, 0.6, 0.1, 2.0, 0.02, 1.0])]

    def accuracy(model):
        with torch.no_grad():
            return (model(xv).argmax(-1) == yv).float().mean().item()

    scores = [accuracy(m) for m in ingredients]
    template = copy.deepcopy(base)
    g = greedy_soup(ingredients, accuracy, model=template, progress=False)
    assert g.scores == pytest.approx(scores)
    assert g.score >= max(scores)
    assert g.selected[0] == max(range(len(scores)), key=lambda i: scores[i])
    assert accuracy(load_soup(copy.deepcopy(base), g.state_dict)) == pytest.approx(g.score)
    assert accuracy(template) == pytest.approx(g.score)  # the model ends holding the soup
    assert 3 not in g.selected  # the heavily perturbed one would drag the soup down
    assert [h["index"] for h in g.history] == sorted(range(6), key=lambda i: -scores[i])
    # the same with a state-dict callback and the scores given
    g2 = greedy_soup(ingredients, lambda sd: accuracy(load_soup(copy.deepcopy(base), sd)), scores=scores,
                     progress=False)
    assert g2.selected == g.selected and g2.score == pytest.approx(g.score)


# -- inputs -------------------------------------------------------------------------------------------


def test_prefixes_stripped_and_files_read(tmp_path):
    from torch.optim.swa_utils import AveragedModel

    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    ddp_style = {f"module.{k}": v for k, v in model.state_dict().items()}
    compiled = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    ema = AveragedModel(model)  # keys module.*, plus n_averaged
    path = tmp_path / "ema.safetensors"
    save_file({f"ema.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    for source in (ddp_style, compiled, ema, path, str(path)):
        assert_states_equal(state_dict_of(source), model.state_dict(), atol=0)
    soup = uniform_soup([ddp_style, compiled, ema, path])
    assert_states_equal(soup, model.state_dict())
    wrapped = AveragedModel(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)))
    load_soup(wrapped, soup)  # into a wrapped model: its prefix is put back
    assert torch.equal(wrapped.module[0].weight, model[0].weight)


def test_mismatched_keys_and_shapes_name_the_tensors(tmp_path):
    a = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    extra = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.Linear(2, 2))
    wide = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"ingredient 1 has tensors ingredient 0 lacks: 3\.bias, 3\.weight"):
        uniform_soup([a, extra])
    with pytest.raises(ValueError, match=r"ingredient 1 lacks 3\.bias, 3\.weight"):
        uniform_soup([extra, a])
    with pytest.raises(ValueError, match=r"0\.weight \(6, 4\) vs \(5, 4\)"):
        uniform_soup([a, wide])
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=rf"{path.name} differs in shape: 0\.bias"):
        greedy_soup([a, path], lambda sd: 0.0, progress=False)
    with pytest.raises(ValueError, match=r"shapes differ: 0\.bias \(5,\) vs model \(6,\)"):
        load_soup(copy.deepcopy(wide), a.state_dict())
    with pytest.raises(ValueError, match="the soup lacks 3.bias"):
        load_soup(copy.deepcopy(extra), a.state_dict())
    with pytest.raises(ValueError, match="not tensors: meta"):
        uniform_soup([a, {**a.state_dict(), "meta": "x"}])
    with pytest.raises(FileNotFoundError):
        uniform_soup([a, tmp_path / "missing.safetensors"])
    with pytest.raises(ValueError, match="no ingredients"):
        uniform_soup([])
    with pytest.raises(ValueError, match="2 scores for 3 ingredients"):
        greedy_soup([a, a, a], lambda sd: 0.0, scores=[1.0, 2.0], progress=False)


def test_nan_or_inf_ingredients_are_named_with_the_tensor(tmp_path):
    a = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    bad = {k: v.clone() for k, v in a.state_dict().items()}
    bad["2.weight"][1, 3] = float("nan")
    bad["0.bias"][0] = float("inf")
    with pytest.raises(ValueError, match=r"ingredient 1: tensor 0\.bias holds 1 Inf of 5 values"):
        uniform_soup([a, bad])  # tensors in name order: 0.bias before 2.weight
    bad["0.bias"][0] = 0.0
    path = tmp_path / "nan.safetensors"
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=rf"{path.name}: tensor 2\.weight holds 1 NaN of 10 values"):
        greedy_soup([a, path], lambda sd: 0.0, progress=False)


def test_screened_files_name_the_file_the_tensor_and_the_copies(tmp_path, caplog):
    from utilrank_kernels.weightspace.inputs import WeightFileError, require_distinct, screen_files

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    paths = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        torch.manual_seed(seed)
        state = {k: v.contiguous() for k, v in nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5),
                                                             nn.Linear(5, 2)).state_dict().items()}
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(state, str(paths[name]))
    # a copy whose BatchNorm counter and wrapper prefix differ is the same model
    copy_state = {f"module.{k}": (v + 7 if k.endswith("num_batches_tracked") else v)
                  for k, v in state_dict_of(paths["a"]).items()}
    paths["a2"] = tmp_path / "a2.safetensors"
    save_file(copy_state, str(paths["a2"]))
    files = screen_files([paths[n] for n in ("a", "b", "a2")], "--from", model=model, model_name="mlp")
    assert files[0].digest == files[2].digest != files[1].digest
    with pytest.raises(WeightFileError, match=r"--from: the 3 files hold only 2 different models \(.*a\.safetensors = "
                                              r".*a2\.safetensors: the same weights\): a map needs at least 3"):
        require_distinct(files, 3, "--from", "a map")
    with caplog.at_level("WARNING", logger="utilrank_kernels"):
        require_distinct(files, 2, "--from", "a map")
    assert "a2.safetensors: the same weights, so that model counts 2 times" in caplog.text
    with pytest.raises(WeightFileError, match=r"--from: 1 file \(.*a\.safetensors\): a soup needs at least 2"):
        require_distinct(files[:1], 2, "--from", "a soup")

    nan = state_dict_of(paths["c"])
    nan["2.weight"][0, :] = float("nan")
    save_file(nan, str(paths["c"]))
    with pytest.raises(WeightFileError, match=r"--from .*c\.safetensors: tensor 2\.weight holds 5 NaN of 10 values"):
        screen_files([paths["a"], paths["c"]], "--from")
    wide = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in nn.Sequential(nn.Linear(4, 6)).state_dict().items()}, str(wide))
    with pytest.raises(WeightFileError, match=r"wide\.safetensors: not weights of mlp \(the file lacks .*shapes "
                                              r"differ: 0\.bias \(6,\) vs model \(5,\)"):
        screen_files([wide], "--from", model=model, model_name="mlp")
    with pytest.raises(WeightFileError, match="is a folder"):
        screen_files([tmp_path], "--from")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightFileError, match=r"^--checkpoint .*junk\.safetensors: not a readable safetensors"):
        screen_files([tmp_path / "junk.safetensors"], "--checkpoint")


# -- SWA ----------------------------------------------------------------------------------------------


def test_swa_average_is_the_mean_and_recomputes_batchnorm():
    torch.manual_seed(0)
    base = BNNet()
    snapshots = [perturbed(base, 0.1, i) for i in range(3)]
    images = torch.randn(32, 3, 5, 5) * 2 + 1
    loader = [(images[i : i + 8], torch.zeros(8)) for i in range(0, 32, 8)]
    with pytest.raises(ValueError, match="update_bn"):
        swa_average(base, snapshots)
    avg = swa_average(base, snapshots, bn_loader=loader)
    mean = uniform_soup(snapshots)
    for k, p in avg.named_parameters():
        assert torch.allclose(p, mean[k], atol=1e-6), k
    # update_bn: the running statistics are those of the averaged model's own activations
    with torch.no_grad():
        feats = avg.conv(images)
    assert torch.allclose(avg.bn.running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    # no BatchNorm: no loader needed
    lin = [nn.Linear(3, 2) for _ in range(2)]
    assert torch.allclose(swa_average(nn.Linear(3, 2), lin).weight, (lin[0].weight + lin[1].weight) / 2)


def test_swa_trains_cycles_on_the_one_training_loop():
    x, y = _blobs(64, 2)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    out = swa(model, TensorDataset(x, y), cycles=2, lr=0.05, batch_size=16, progress=False)
    assert_states_equal(model.state_dict(), before, atol=0)  # the input model is untouched
    assert not torch.equal(out[0].weight, model[0].weight) and not out.training
    assert out[1].num_batches_tracked > 0


# -- soups of compressed models -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compressed_setup():
    torch.manual_seed(0)
    base = ConvNet(c=3, classes=4).eval()
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(2, 3, 10, 10, generator=g)  # inputs on few directions: subspaces well below full
    batches = [torch.einsum("bk,kchw->bchw", torch.randn(6, 2, generator=g), basis)
               + 0.05 * torch.randn(6, 3, 10, 10, generator=g) for _ in range(4)]
    stats = collect_stats(base, batches, progress=False)
    report = build_report(base, stats, compute_subspaces(base, stats, progress=False), 0.9)
    # every analyzed layer at its utilized rank, whether or not that saves weights in a model this small
    # the paper's two-sided projection, which projected_by_hand writes out
    plan = Plan("convnet", {r.name: LayerPlan(r.kind, r.rank, r.k_in, r.k_out) for r in report.layers},
                method="data")
    assert set(plan.layers) == {"conv1", "conv2", "conv3", "head"}
    assert all(plan.layers[r.name].rank < r.full_rank for r in report.layers)
    # ingredients: perturbed models, each factored on its own statistics (different subspaces)
    ingredients = []
    for i in range(3):
        m = perturbed(base, 0.15, 10 + i)
        ingredients.append(refactor(m, plan, planned_stats(m, plan, batches)).eval())
    return base, plan, batches, ingredients


def projected_by_hand(model, plan, stats):
    """Each planned layer's ``P_out W P_in`` from first principles (fp64 eigh of the layer's ``C_in`` and of
    ``W C_in W^T``), independent of the package's subspace and factor code."""
    out = {}
    for name, entry in plan.layers.items():
        w = model.get_submodule(name).weight.detach().double().reshape(model.get_submodule(name).weight.shape[0], -1)
        c = stats.layers[name].cov.double()
        u_in = torch.linalg.eigh(c).eigenvectors.flip(1)[:, :entry.k_in]
        u_out = torch.linalg.eigh(w @ c @ w.T).eigenvectors.flip(1)[:, :entry.k_out]
        out[name] = u_out @ u_out.T @ w @ u_in @ u_in.T
    return out


def assert_factored_as(model, plan, expected, atol=1e-5):
    for name in plan.layers:
        layer = model.get_submodule(name)
        got = layer.weight.double().reshape(expected[name].shape)
        assert torch.allclose(got, expected[name], atol=atol), name


def test_compressed_soup_equals_the_factored_dense_soup(compressed_setup):
    base, plan, batches, ingredients = compressed_setup
    got = compressed_soup(ingredients, plan, base, batches=batches)
    # by hand: dense models holding each ingredient's B @ A, their uniform soup, factored on its own stats
    dense_models = []
    for ing in ingredients:
        d = copy.deepcopy(base)
        modules = dict(ing.named_modules())
        with torch.no_grad():
            for name, module in d.named_modules():
                if name in plan.layers:
                    module.weight.copy_(modules[name].weight)  # B @ A
                    if module.bias is not None:
                        module.bias.copy_(modules[name].bias)
                elif isinstance(module, (nn.Linear, nn.Conv2d)):
                    module.load_state_dict(modules[name].state_dict())
        dense_models.append(d)
    # the mean of the dense weights, by hand
    mean = {k: torch.stack([m.state_dict()[k].double() for m in dense_models]).mean(0) for k in base.state_dict()
            if base.state_dict()[k].is_floating_point()}
    dense_soup = copy.deepcopy(base)
    dense_soup.load_state_dict({k: mean.get(k, v).to(v.dtype) for k, v in base.state_dict().items()})
    assert_states_equal(got.dense.state_dict(), dense_soup.state_dict(), atol=1e-6)
    # ... factored on the soup's own statistics, by hand
    assert_factored_as(got.model, plan, projected_by_hand(dense_soup, plan, collect_stats(dense_soup, batches,
                                                                                          progress=False)))
    x = batches[0]
    with torch.no_grad():
        # the factors keep the plan's ranks: the same architecture as every ingredient
        assert {k: v.shape for k, v in got.model.state_dict().items()} == \
               {k: v.shape for k, v in ingredients[0].state_dict().items()}
        # averaging factor by factor is another (wrong) model: factors differ by r x r mixings
        naive = load_soup(copy.deepcopy(ingredients[0]), uniform_soup(ingredients))
        err_naive = (naive(x) - dense_soup(x)).norm() / dense_soup(x).norm()
        err_soup = (got.model(x) - dense_soup(x)).norm() / dense_soup(x).norm()
        assert err_soup < 0.5 * err_naive


def test_compressed_soup_on_merged_statistics_and_state_dict_inputs(compressed_setup):
    base, plan, batches, ingredients = compressed_setup
    # the compressed models' own layer inputs, through their dense equivalents (the same functions)
    merged = planned_stats(dense_equivalent(ingredients[0], plan, base), plan, batches)
    for ing in ingredients[1:]:
        merged = merged.merge(planned_stats(dense_equivalent(ing, plan, base), plan, batches))
    states = [ing.state_dict() for ing in ingredients]
    soup = compressed_soup(states, plan, base, stats=merged)
    assert soup.stats is merged
    assert_factored_as(soup.model, plan, projected_by_hand(soup.dense, plan, merged))
    assert {k: v.shape for k, v in soup.model.state_dict().items()} == \
           {k: v.shape for k, v in ingredients[0].state_dict().items()}
    with pytest.raises(ValueError, match="needs batches"):
        compressed_soup(states, plan, base)


def test_greedy_compressed_soup_never_worse_on_validation(compressed_setup):
    base, plan, batches, ingredients = compressed_setup
    x = batches[1]
    with torch.no_grad():
        target = base(x)

    def score(model):  # closeness to the base model's outputs, as a stand-in for accuracy
        with torch.no_grad():
            return -((model(x) - target).norm() / target.norm()).item()

    worse = refactor(perturbed(base, 1.5, 99), plan, planned_stats(perturbed(base, 1.5, 99), plan, batches))
    pool = ingredients + [worse]
    soup = greedy_compressed_soup(pool, plan, base, score, batches=batches, progress=False)
    scores = [score(m) for m in pool]
    assert score(soup.model) >= max(scores) - 1e-9
    assert soup.greedy.score == pytest.approx(score(soup.model))
    assert 3 not in soup.selected
    single = greedy_compressed_soup(pool[:1], plan, base, score, batches=batches, progress=False)
    assert single.selected == [0] and score(single.model) == pytest.approx(scores[0])


def test_compressed_ingredients_must_share_the_plan(compressed_setup):
    base, plan, batches, ingredients = compressed_setup
    name = next(iter(plan.layers))
    other = plan.replace_layers({**plan.layers, name: plan.layers[name].with_rank(plan.layers[name].rank + 1)})
    with pytest.raises(ValueError, match=rf"{name} has rank \d+ .* the plan says"):
        expand(ingredients[0].state_dict(), other)
    with pytest.raises(ValueError, match=f"planned layer {name} is not factored"):
        dense_equivalent(base, plan, base)
    with pytest.raises(ValueError, match="ingredients do not match"):
        uniform_soup([ingredients[0], base])


# -- the command --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_soup_command_on_random_builtin_weights(tmp_path, capsys):
    """``utilrank soup`` end to end on random ViT weights, no training (epochs 0), with --from files."""
    from utilrank_kernels.cli import main
    from utilrank_kernels.models import build_builtin

    files = []
    for i in range(3):
        torch.manual_seed(i)
        files.append(tmp_path / f"w{i}.safetensors")
        state = {k: v.contiguous() for k, v in build_builtin("vit-digits").state_dict().items()}
        save_file(state, str(files[-1]))
    out = tmp_path / "out"
    rc = main(["soup", "--checkpoint", str(files[0]), "--from", *map(str, files[1:]), "--swa-cycles", "0",
               "--compressed-epochs", "0", "--energy", "0.9", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "greedy soup" in printed and "factor-wise average (naive)" in printed
    doc = json.loads((out / "soup.json").read_text())
    assert doc["format"] == "utilrank.soup/1" and len(doc["ingredients"]) == 2
    assert doc["dense"]["greedy"]["val"] >= max(e["val"] for e in doc["ingredients"])
    assert doc["compressed"]["greedy"]["val"] >= max(e["compressed"]["val"] for e in doc["ingredients"])
    assert {"uniform", "greedy", "best_single"} <= doc["dense"].keys() and doc["rows"]
    assert main(["soup", "--checkpoint", str(files[0]), "--from", str(tmp_path / "missing.safetensors"),
                 "--out", str(out)]) == 2
