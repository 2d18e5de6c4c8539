"""A population of models of one architecture: trained from the built-in model by a recipe (and cached), or
read from checkpoint files. ``utilrank regions`` maps where its members live in weight space; ``utilrank
predict`` asks how well weight-only metrics predict their accuracy. Both read the same cached population.

The default recipe, from the trained built-in model (the ``base``), on the built-in digits:

- ``finetune``: fine-tuned on all classes, seeds 1-4, learning rates 3e-4 and 1e-3, 2 epochs each;
- ``classes 0-4`` / ``classes 5-9``: fine-tuned on the training images of half the classes only (seeds
  1-3, 3 epochs, lr 1e-3): the same task data, another task;
- ``swa``: cyclical SWA from the base (5 cycles of 1 epoch at lr 1e-3), every cycle's end-point snapshot
  and their average (``swa-average``, by ``swa_average``);
- ``scratch``: 4 runs from their own random initializations (seeds, learning rates, weight decays and
  batch sizes differ), each a chain of warm restarts (1, 1, 2, 4 and 8 epochs, each a full warm-up and
  cosine decay of ``train``) with a snapshot after every stage: 1 to 16 epochs of training, under-trained
  to converged, so accuracy varies.

That is 37 models (the base included) for about 125 epochs of the built-in ViT. Every member is saved
as it is trained (``cache_dir()/populations/<model>-<hash>/``, the hash over the recipe, the data split and
the base model's weights), so an interrupted run resumes and a second run loads them all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .._files import atomic_path, cache_dir, write_json
from ..data import load_data
from ..data.datasets import SPLIT_SEED
from ..models import BUILTIN_MODELS, build_builtin
from ..models.loading import trained_builtin
from ..train import evaluate, train
from .average import has_batchnorm, load_soup, state_dict_of, swa_average

logger = logging.getLogger(__name__)

POPULATION_FORMAT = "utilrank.population/1"
SCRATCH_STAGES = (1, 1, 2, 4, 8)  # warm restarts: snapshots after 1, 2, 4, 8 and 16 epochs
DEFAULT_RECIPE = {
    "finetune": {"seeds": [1, 2, 3, 4], "lrs": [3e-4, 1e-3], "epochs": 2, "weight_decay": 0.01},
    "subsets": {"classes": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "seeds": [1, 2, 3], "epochs": 3, "lr": 1e-3,
                "weight_decay": 0.01},
    "swa": {"cycles": 5, "lr": 1e-3, "weight_decay": 0.01, "seed": 100},
    "scratch": {"stages": list(SCRATCH_STAGES), "runs": [
        {"seed": 11, "lr": 2e-3, "weight_decay": 0.05, "batch_size": 64},
        {"seed": 12, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 32},
        {"seed": 13, "lr": 4e-3, "weight_decay": 0.1, "batch_size": 128},
        {"seed": 14, "lr": 5e-4, "weight_decay": 0.05, "batch_size": 64},
    ]},
}


@dataclass
class Member:
    """One model of the population: its weights (on the CPU), group, how it was made, and its accuracies
    (fractions in [0, 1]) on the validation and test splits."""

    name: str
    group: str
    state: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    val: float | None = None
    test: float | None = None

    def row(self) -> dict:
        return {"name": self.name, "group": self.group, "val": self.val, "test": self.test, **self.meta}


@dataclass
class Population:
    """Members of one architecture; ``template`` is a model of that architecture (the base, when trained
    here) into which a member's weights load."""

    model: str
    dataset: str
    template: nn.Module
    members: list[Member]
    recipe: dict | None = None
    path: Path | None = None

    def groups(self) -> list[str]:
        return list(dict.fromkeys(m.group for m in self.members))

    def load(self, member: Member) -> nn.Module:
        """A copy of the template holding ``member``'s weights, in eval mode."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(member.state)
        return model.eval()

    def describe(self) -> dict:
        return {"model": self.model, "dataset": self.dataset, "recipe": self.recipe,
                "cache": str(self.path) if self.path else None, "members": [m.row() for m in self.members]}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, shapes, dtypes and values."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")  # 0-d: BN counters
    return h.hexdigest()


def population_dir(model_name: str, recipe: dict, base_state: Mapping[str, torch.Tensor]) -> Path:
    key = json.dumps({"format": POPULATION_FORMAT, "model": model_name, "recipe": recipe, "split": SPLIT_SEED,
                      "base": weights_digest(base_state)}, sort_keys=True)
    return cache_dir() / "populations" / f"{model_name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _labels(dataset) -> torch.Tensor:
    return torch.cat([labels for _, labels in DataLoader(dataset, batch_size=1024)]).long()


def _plan(recipe: dict) -> list[dict]:
    """Every member the recipe makes, in training order, as ``{name, group, kind, ...}``."""
    out = [{"name": "base", "group": "base", "kind": "base"}]
    ft = recipe.get("finetune")
    if ft:
        for i, seed in enumerate(ft["seeds"]):
            lr = float(ft["lrs"][i % len(ft["lrs"])])
            out.append({"name": f"finetune-s{seed}-lr{lr:g}", "group": "finetune", "kind": "finetune", "seed": seed,
                        "lr": lr, "epochs": ft["epochs"], "weight_decay": ft["weight_decay"]})
    sub = recipe.get("subsets")
    if sub:
        for classes in sub["classes"]:
            label = f"classes {min(classes)}-{max(classes)}" if classes == list(range(min(classes), max(classes) + 1)) \
                else "classes " + ",".join(map(str, classes))
            for seed in sub["seeds"]:
                out.append({"name": f"{label.replace(' ', '')}-s{seed}", "group": label, "kind": "subset",
                            "classes": list(classes), "seed": seed, "lr": sub["lr"], "epochs": sub["epochs"],
                            "weight_decay": sub["weight_decay"]})
    swa = recipe.get("swa")
    if swa:
        for c in range(swa["cycles"]):
            out.append({"name": f"swa-cycle{c + 1}", "group": "swa", "kind": "swa-snapshot", "run": "swa",
                        "cycle": c + 1, "seed": swa["seed"] + c, "lr": swa["lr"], "epochs": c + 1,
                        "weight_decay": swa["weight_decay"]})
        out.append({"name": "swa-average", "group": "swa", "kind": "swa-average", "cycles": swa["cycles"]})
    scratch = recipe.get("scratch")
    if scratch:
        for run in scratch["runs"]:
            total = 0
            for stage, epochs in enumerate(scratch["stages"]):
                total += epochs
                out.append({"name": f"scratch-s{run['seed']}-e{total}", "group": "scratch", "kind": "scratch",
                            "run": f"s{run['seed']}", "stage": stage, "epochs": total, "stage_epochs": epochs,
                            **run})
    return out


def train_population(
    model_name: str = "vit-digits",
    *,
    recipe: dict | None = None,
    base: nn.Module | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Population:
    """The population ``recipe`` (default ``DEFAULT_RECIPE``) makes from the trained built-in ``model_name``
    (or from ``base``, a model of that architecture), from the cache or trained now (each member cached as
    soon as it exists)."""
    if model_name not in BUILTIN_MODELS:
        raise ValueError(f"a trained population needs a built-in model ({', '.join(BUILTIN_MODELS)}), got "
                         f"{model_name!r}; pass checkpoint files for other models")
    recipe = json.loads(json.dumps(recipe or DEFAULT_RECIPE))  # a plain-JSON copy: what the hash covers
    data = load_data("digits")
    base = (trained_builtin(model_name, device=device) if base is None else copy.deepcopy(base)).cpu().eval()
    base_state = _cpu_state(base)
    root = population_dir(model_name, recipe, base_state)
    index_path = root / "population.json"
    index = json.loads(index_path.read_text())["members"] if index_path.is_file() else {}
    plan = _plan(recipe)
    todo = [spec for spec in plan if spec["name"] not in index or not (root / f"{spec['name']}.safetensors").is_file()]
    if todo:
        logger.info(f"population of {model_name}: training {len(todo)} of {len(plan)} models into {root}")
    else:
        logger.info(f"population of {model_name}: {len(plan)} models from {root}")
    trainer = _Trainer(model_name, recipe, plan, base, data, root, index, device,
                       labels=_labels(data.train) if recipe.get("subsets") else None,
                       bn_loader=DataLoader(data.train, batch_size=256) if has_batchnorm(base) else None)
    pending = {spec["name"] for spec in todo}
    bar = tqdm(plan, desc=f"population ({len(todo)} to train)", unit="model", disable=not progress or not todo)
    for spec in bar:
        bar.set_postfix_str(spec["name"], refresh=False)
        if spec["name"] in pending:
            trainer.save(spec, base if spec["kind"] == "base" else trainer.trained(spec))
    members = []
    for spec in plan:
        entry = index[spec["name"]]
        meta = {k: v for k, v in entry.items() if k not in ("name", "group", "val", "test")}
        members.append(Member(spec["name"], spec["group"], trainer.state(spec["name"]), meta, entry["val"],
                              entry["test"]))
    return Population(model_name, data.name, base, members, recipe, root)


@dataclass
class _Trainer:
    """One population's members as they are trained: each saved to the cache folder as soon as it exists, with
    its accuracies in the folder's index."""

    model_name: str
    recipe: dict
    plan: list[dict]
    base: nn.Module
    data: object
    root: Path
    index: dict
    device: torch.device | str
    labels: torch.Tensor | None = None  # the training labels, for the class subsets
    bn_loader: DataLoader | None = None
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    chains: dict[str, nn.Module] = field(default_factory=dict)  # scratch run -> its model after the last stage

    def state(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.states:
            self.states[name] = load_file(str(self.root / f"{name}.safetensors"))
        return self.states[name]

    def save(self, spec: dict, model: nn.Module) -> None:
        state = _cpu_state(model)
        with atomic_path(self.root / f"{spec['name']}.safetensors") as tmp:
            save_file(state, str(tmp))
        self.states[spec["name"]] = state
        model = model.to(self.device).eval()
        self.index[spec["name"]] = {**spec, "val": evaluate(model, self.data.val, device=self.device),
                                    "test": evaluate(model, self.data.test, device=self.device)}
        write_json(self.root / "population.json", {"format": POPULATION_FORMAT, "model": self.model_name,
                                                   "recipe": self.recipe, "members": self.index})

    def trained(self, spec: dict) -> nn.Module:
        """The member ``spec`` describes (any kind but the base), trained now."""
        kind, data, base = spec["kind"], self.data, self.base
        if kind in ("finetune", "subset"):
            dataset = data.train
            if kind == "subset":
                keep = torch.isin(self.labels, torch.tensor(spec["classes"])).nonzero().flatten().tolist()
                dataset = Subset(data.train, keep)
            return train(copy.deepcopy(base), dataset, epochs=spec["epochs"], lr=spec["lr"],
                         weight_decay=spec["weight_decay"], seed=spec["seed"], augment=data.augment,
                         device=self.device, desc=spec["name"])
        if kind == "swa-snapshot":
            start = base if spec["cycle"] == 1 else _loaded(base, self.state(f"swa-cycle{spec['cycle'] - 1}"))
            return train(copy.deepcopy(start), data.train, epochs=1, lr=spec["lr"], weight_decay=spec["weight_decay"],
                         seed=spec["seed"], augment=data.augment, device=self.device, desc=spec["name"])
        if kind == "swa-average":
            snapshots = [self.state(f"swa-cycle{c + 1}") for c in range(spec["cycles"])]
            return swa_average(base, snapshots, bn_loader=self.bn_loader, device=self.device)
        return self._scratch(spec)

    def _scratch(self, spec: dict) -> nn.Module:
        """A scratch stage: the previous stage of the same run trained on, or a fresh random initialization."""
        if spec["stage"] == 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec["seed"])
                start = build_builtin(self.model_name)
        else:
            previous = next(p for p in self.plan if p.get("run") == spec["run"] and p["stage"] == spec["stage"] - 1)
            start = self.chains[spec["run"]] if spec["run"] in self.chains else \
                _loaded(build_builtin(self.model_name), self.state(previous["name"]))
        model = train(start, self.data.train, epochs=spec["stage_epochs"], lr=spec["lr"],
                      weight_decay=spec["weight_decay"], batch_size=spec["batch_size"],
                      seed=spec["seed"] * 100 + spec["stage"], augment=self.data.augment, device=self.device,
                      desc=spec["name"])
        self.chains[spec["run"]] = model
        return model


def _loaded(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def population_from_files(
    template: nn.Module,
    files: Sequence[str | Path],
    data,
    *,
    model_name: str,
    groups: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Population:
    """A population of checkpoint files (safetensors, or torch files read with ``weights_only=True``) that
    load into ``template``; each member's group is ``groups[i]``, or else the name of the file's folder.
    Accuracies are measured on ``data``'s validation and test splits."""
    if groups is not None and len(groups) != len(files):
        raise ValueError(f"{len(groups)} group labels for {len(files)} files")
    members, names = [], set()
    for i, f in enumerate(tqdm(files, desc="checkpoints", unit="file", disable=not progress)):
        path = Path(f)
        model = copy.deepcopy(template)
        try:
            load_soup(model, state_dict_of(path, i))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        name = path.stem if path.stem not in names else f"{path.parent.name}/{path.stem}"
        names.add(name)
        model = model.to(device).eval()
        members.append(Member(name, groups[i] if groups else path.parent.name or ".", _cpu_state(model),
                              {"file": str(path)}, evaluate(model, data.val, device=device),
                              evaluate(model, data.test, device=device)))
    return Population(model_name, data.name, template.cpu().eval(), members)
