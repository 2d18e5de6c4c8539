"""The map of weight space: weight vectors (whole, one layer, projected on data subspaces), PCA of identical
groups, distances, interpolation paths and barrier heights, the experiment, its plots and the command."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from utilrank_kernels.plots import plot_barriers, plot_distances, plot_regions
from utilrank_kernels.weightspace.population import Member, Population
from utilrank_kernels.weightspace.regions import (
    barrier_height,
    data_projection,
    distance_summary,
    embed,
    interpolate,
    pairwise_distances,
    path_accuracy,
    regions_experiment,
    representative_pairs,
    weight_vectors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Classifier(nn.Module):
    def __init__(self, d=6, hidden=10, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def splits(n=90, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1)).long()  # a task a linear model can learn
    ds = TensorDataset(x, y)
    return SimpleNamespace(name="synthetic", train=ds, val=ds, test=ds, num_classes=classes)


def perturbed_population(groups=("a", "b"), per_group=3, scale=0.05, seed=0):
    torch.manual_seed(seed)
    template = Classifier().eval()
    base = {k: v.clone() for k, v in template.state_dict().items()}
    members = []
    for gi, g in enumerate(groups):
        center = {k: v + (0.5 * gi * torch.randn_like(v) if v.is_floating_point() else 0) for k, v in base.items()}
        for i in range(per_group):
            state = {k: v + (scale * torch.randn_like(v) if v.is_floating_point() else 0) for k, v in center.items()}
            members.append(Member(f"{g}{i}", g, state, {}, 0.5, 0.5))
    return Population("classifier", "synthetic", template, members)


def test_barrier_height_is_the_largest_drop_below_the_line():
    assert barrier_height([0.9, 0.9, 0.9]) == 0.0
    assert barrier_height([0.9, 0.5, 0.8]) == pytest.approx(0.85 - 0.5)
    assert barrier_height([0.6, 0.9, 0.95, 0.7]) == 0.0  # above the line everywhere: the endpoints give 0
    t = np.linspace(0, 1, 5)
    acc = np.array([0.8, 0.7, 0.2, 0.6, 0.4])
    assert barrier_height(acc) == pytest.approx(np.max((1 - t) * 0.8 + t * 0.4 - acc))


def test_barrier_of_a_model_with_itself_is_zero_and_paths_end_at_the_endpoints():
    data = splits()
    population = perturbed_population()
    a, b = population.members[0].state, population.members[4].state
    for k in a:
        assert torch.equal(interpolate(a, b, 0.0)[k], a[k]) and torch.equal(interpolate(a, b, 1.0)[k], b[k])
    from utilrank_kernels.train import evaluate

    def acc(m):
        return evaluate(m, data.val)

    self_path = path_accuracy(population.template, a, a, acc, points=7)
    assert barrier_height(self_path) == 0.0 and len(set(self_path)) == 1
    path = path_accuracy(population.template, a, b, acc, points=5)
    assert path[0] == acc(population.load(population.members[0]))
    assert path[-1] == acc(population.load(population.members[4]))


def test_pca_of_two_identical_groups_coincides():
    population = perturbed_population(groups=("a",), per_group=4)
    copies = [Member(f"copy-{m.name}", "copies", {k: v.clone() for k, v in m.state.items()}) for m in
              population.members]
    population.members += copies
    x, parts = weight_vectors(population)
    assert parts == [n for n, _ in population.template.named_parameters()]  # BatchNorm running stats left out
    emb = embed(x)
    coords = np.asarray(emb["pca"])
    assert np.allclose(coords[:4], coords[4:], atol=1e-9)
    assert np.ptp(coords[:4], axis=0).min() > 0  # the members themselves are spread
    dist = pairwise_distances(x)
    assert np.all(np.diag(dist[:4, 4:]) == 0) and np.all(np.diag(dist) == 0)
    summary = distance_summary(dist, [m.group for m in population.members])
    assert summary["within"]["a"] == pytest.approx(summary["within"]["copies"])
    # between a group and its copy: the within-group distances, plus the zeros of each member with itself
    assert summary["between"]["a | copies"] == pytest.approx(summary["within"]["a"] * 12 / 16)


def test_distances_match_the_flattened_weights_and_one_layer():
    population = perturbed_population()
    x, _ = weight_vectors(population)
    ref = torch.cat([p.flatten() for n, p in population.members[1].state.items()
                     if n in dict(population.template.named_parameters())]).double()
    assert np.allclose(x[1], ref.numpy())
    layer, parts = weight_vectors(population, layer="fc1")
    assert parts == ["fc1.weight"] and layer.shape == (6, 60)
    d = pairwise_distances(layer)
    w0, w3 = population.members[0].state["fc1.weight"].double(), population.members[3].state["fc1.weight"].double()
    assert d[0, 3] == pytest.approx(torch.linalg.norm(w0 - w3).item(), rel=1e-12)
    with pytest.raises(ValueError, match="--layer nope: the model has no such layer"):
        weight_vectors(population, layer="nope")


def test_projected_distances_are_those_of_the_projected_weights():
    """U_out^T W U_in keeps the Frobenius distances of P_out W P_in (U orthonormal)."""
    population = perturbed_population()
    g = torch.Generator().manual_seed(3)
    proj = {}
    for name, (out, inp) in {"fc1": (10, 6), "fc2": (3, 10)}.items():
        u_out = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))[0][:, : out - 1]
        u_in = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))[0][:, : inp - 2]
        proj[name] = (u_out, u_in)
    x, parts = weight_vectors(population, projection=proj)
    assert parts == ["fc1", "fc2"] and x.shape[1] == 9 * 4 + 2 * 8
    d = pairwise_distances(x)
    ref = 0.0
    for name, (u_out, u_in) in proj.items():
        a, b = (population.members[i].state[f"{name}.weight"].double() for i in (0, 5))
        diff = a - b
        ref += torch.linalg.norm((u_out @ u_out.T) @ diff @ (u_in @ u_in.T)).item() ** 2
    assert d[0, 5] == pytest.approx(ref**0.5, rel=1e-10)


def test_data_projection_bases_are_orthonormal_at_the_report_ranks():
    from torch.utils.data import DataLoader

    from utilrank_kernels.analysis import build_report, collect_stats, compute_subspaces

    data = splits()
    model = perturbed_population().load(perturbed_population().members[0])
    bases = data_projection(model, data, energy=0.9)
    stats = collect_stats(model, DataLoader(data.train, batch_size=256), progress=False)
    report = build_report(model, stats, compute_subspaces(model, stats, progress=False), 0.9)
    assert set(bases) == {r.name for r in report.layers} == {"fc1", "fc2"}
    for r in report.layers:
        u_out, u_in = bases[r.name]
        assert u_out.shape[1] == r.k_out and u_in.shape[1] == r.k_in
        assert torch.allclose(u_in.T @ u_in, torch.eye(r.k_in, dtype=u_in.dtype), atol=1e-10)


def test_representative_pairs_cover_every_group():
    population = perturbed_population(groups=("a", "b", "c"))
    for i, m in enumerate(population.members):
        m.val = 0.1 * (i % 3)  # the best of each group: its third member
    pairs = representative_pairs(population)
    across = [(population.members[i].name, population.members[j].name) for i, j, k in pairs if k == "across groups"]
    within = [(population.members[i].name, population.members[j].name) for i, j, k in pairs if k == "same group"]
    assert across == [("a2", "b2"), ("a2", "c2"), ("b2", "c2")]
    assert within == [("a2", "a1"), ("b2", "b1"), ("c2", "c1")]


def test_regions_experiment_and_plots(tmp_path):
    population = perturbed_population(groups=("a", "b", "c"), per_group=3)
    doc = regions_experiment(population, splits(), points=5, progress=False)
    json.dumps(doc)
    assert doc["format"] == "utilrank.regions/1" and len(doc["members"]) == 9
    assert all(len(m["pca"]) == 2 and len(m["tsne"]) == 2 for m in doc["members"])
    assert len(doc["barriers"]["pairs"]) == 3 + 3
    assert all(p["barrier"] >= 0 and len(p["accuracy"]) == 5 for p in doc["barriers"]["pairs"])
    assert np.allclose(np.asarray(doc["distances"]["matrix"]), np.asarray(doc["distances"]["matrix"]).T)
    for plot, name in ((plot_regions, "regions.png"), (plot_distances, "distances.png"),
                       (plot_barriers, "barriers.png")):
        plot(doc, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_regions_and_predict_commands_on_checkpoint_files(tmp_path, capsys):
    """Both commands end to end on random built-in weights given as files (no training): two groups by
    folder, the tables printed, the files written."""
    from utilrank_kernels.cli import main
    from utilrank_kernels.models import build_builtin

    files = []
    for group, seeds in (("one", (1, 2, 3)), ("two", (4, 5))):
        for s in seeds:
            torch.manual_seed(s)
            path = tmp_path / group / f"m{s}.safetensors"
            path.parent.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in build_builtin("vit-digits").state_dict().items()}, str(path))
            files.append(str(path))
    out = tmp_path / "regions"
    assert main(["regions", "--from", *files, "--points", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "barrier heights" in printed and "same group" in printed and "across groups" in printed
    doc = json.loads((out / "regions.json").read_text())
    assert len(doc["barriers"]["pairs"]) == 1 + 2 and all(len(p["accuracy"]) == 3 for p in doc["barriers"]["pairs"])
    assert doc["groups"] == ["one", "two"] and {p.name for p in out.iterdir()} == {
        "regions.json", "regions.png", "distances.png", "barriers.png", "manifest.json"}
    out = tmp_path / "predict"
    assert main(["predict", "--from", *files, "--out", str(out)]) == 0
    assert "Spearman rho" in capsys.readouterr().out
    doc = json.loads((out / "predict.json").read_text())
    assert len(doc["members"]) == 5 and set(doc["spearman"]) == set(doc["metrics"])
    assert (out / "predict.png").stat().st_size > 10_000
    assert main(["regions", "--from", files[0], str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert main(["regions", "--from", *files, "--layer", "nope", "--out", str(out)]) == 2
    bad = copy.deepcopy(files)
    assert main(["regions", "--from", *bad, "--groups", "x", "--out", str(out)]) == 2
