"""``utilrank regions``: where models live in weight space: a population embedded in 2-D (PCA, t-SNE), its
pairwise distances, and the accuracy along straight lines between pairs (barrier heights)."""

from __future__ import annotations

import argparse
import time

from .._files import write_json
from ..data import load_data
from ..models import BUILTIN_MODELS, build_builtin
from ..plots import plot_barriers, plot_distances, plot_regions
from ..weightspace.inputs import WeightFileError, require_distinct, screen_files
from ..weightspace.population import population_from_files, train_population
from ..weightspace.regions import barrier_table, check_layer, regions_experiment
from ._model import model_and_data
from ._options import UsageError
from ._output import commit, output_folder
from ._runtime import limit_threads, resolve_device


def run(args) -> int:
    with limit_threads(args.threads):
        return _regions(args)


def add_population_options(p: argparse.ArgumentParser) -> None:
    """The population ``regions`` and ``predict`` share: trained on the built-in (cached), or files."""
    g = p.add_argument_group("population (default: trained from the built-in model and cached, shared by "
                             "regions and predict)")
    g.add_argument("--model", default="vit-digits",
                   help="built-in vit-digits | vgg-digits (a trained population), or with --from any timm model "
                        "name (default: %(default)s)")
    g.add_argument("--from", dest="from_files", nargs="+", metavar="FILE", default=None,
                   help="checkpoint files (safetensors, or weights-only torch) instead of the trained population")
    g.add_argument("--groups", nargs="+", metavar="LABEL", default=None,
                   help="with --from: a group label per file (default: the name of each file's folder)")
    g.add_argument("--data", default=None,
                   help="with --from: 'digits' (default) or an ImageFolder directory, for the accuracies")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    # one thread by default: the built-ins are 64 wide, so a second thread adds barriers, not speed; on a busy
    # 2-core machine an epoch of vit-digits took 1.2-2.3 s with 1 thread and 8-30 s with 2
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for PyTorch and BLAS (default: %(default)s; 0: the libraries' defaults)")
    p.set_defaults(checkpoint=None)


def check_population(args, device, *, least: int, purpose: str):
    """The population's options and ``--from`` files checked before any work (each file readable, finite, of the
    model's architecture; at least ``least`` different models): ``(template, data)`` of the files, or None for
    the trained population."""
    if not args.from_files:
        if args.model not in BUILTIN_MODELS:
            raise UsageError(f"--model {args.model}: a trained population needs a built-in model "
                             f"({', '.join(BUILTIN_MODELS)}); pass --from FILE... for others")
        if args.groups or args.data not in (None, "digits"):
            raise UsageError("--groups and --data apply to --from files only")
        return None
    if args.groups is not None and len(args.groups) != len(args.from_files):
        raise UsageError(f"--groups: {len(args.groups)} labels for {len(args.from_files)} files")
    if args.model in BUILTIN_MODELS and args.data not in (None, "digits"):
        raise UsageError(f"--model {args.model} is built for the digits data; use a timm model name")
    # the built-in's architecture is built in a moment; another model is loaded with its data (no training)
    loaded = None if args.model in BUILTIN_MODELS else model_and_data(args, device)
    template = build_builtin(args.model) if loaded is None else loaded.model
    try:
        files = screen_files(args.from_files, "--from", model=template, model_name=args.model)
        require_distinct(files, least, "--from", purpose)
    except WeightFileError as exc:
        raise UsageError(str(exc)) from exc
    return template, (load_data("digits") if loaded is None else loaded.data)


def load_population(args, device, checked):
    """The population the options name (``checked``: ``check_population``'s result), with the data its accuracies
    are measured on."""
    if checked is None:
        return train_population(args.model, device=device), load_data("digits")
    template, data = checked
    try:
        return population_from_files(template, args.from_files, data, model_name=args.model, groups=args.groups,
                                     device=device), data
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _regions(args) -> int:
    if args.points < 2:
        raise UsageError(f"--points {args.points}: a path needs at least 2 points")
    device = resolve_device(args.device)
    checked = check_population(args, device, least=2, purpose="a map of weight space")
    if args.layer is not None:
        try:
            check_layer(checked[0] if checked is not None else build_builtin(args.model), args.layer)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    folder = output_folder(args, "regions")
    started = time.perf_counter()
    population, data = load_population(args, device, checked)
    if len(population.members) < 2:
        raise UsageError("a map of weight space needs at least 2 models")
    try:
        doc = regions_experiment(population, data, layer=args.layer, project=args.project, energy=args.energy,
                                 pairs=args.pairs, points=args.points, seed=args.seed, device=device)
    except ValueError as exc:  # --layer without data subspaces (--project)
        raise UsageError(str(exc)) from exc
    write_json(folder.path("regions.json"), doc)
    plot_regions(doc, folder.path("regions.png"))
    plot_distances(doc, folder.path("distances.png"))
    plot_barriers(doc, folder.path("barriers.png"))
    print(format_regions(doc))
    out = commit(folder)
    print(f"wrote {out}/regions.json, regions.png, distances.png, barriers.png in "
          f"{time.perf_counter() - started:.1f}s (population: {doc['population']['cache'] or 'files'})")
    return 0


def format_regions(doc: dict) -> str:
    lines = [f"{doc['model']} on {doc['dataset']}: {len(doc['members'])} models, "
             f"{doc['space']['dims']:,} weights each", "",
             f"{'group':<14} {'models':>6} {'val':>7} {'test':>7} {'mean distance within':>21}"]
    for g in doc["groups"]:
        ms = [m for m in doc["members"] if m["group"] == g]
        within = doc["distances"]["within"][g]
        within = "-" if within is None else f"{within:.3g}"
        lines.append(f"{g:<14} {len(ms):>6} {sum(m['val'] for m in ms) / len(ms):>7.2%} "
                     f"{sum(m['test'] for m in ms) / len(ms):>7.2%} {within:>21}")
    lines += ["", "mean distance between groups: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                                               doc["distances"]["between"].items()), ""]
    b = doc["barriers"]
    lines.append(f"barrier heights, validation accuracy, {b['points']} points per path "
                 "(largest drop below the line between the endpoints):")
    lines.append(f"{'pair':<44} {'kind':<14} {'distance':>8} {'acc A':>7} {'acc B':>7} {'mid':>7} {'barrier':>8}")
    for r in barrier_table(doc):
        pair = f"{r['a']} - {r['b']}"
        lines.append(f"{pair[:44]:<44} {r['kind']:<14} {r['distance']:>8.3g} {r['endpoints'][0]:>7.2%} "
                     f"{r['endpoints'][1]:>7.2%} {r['midpoint']:>7.2%} {r['barrier_pp']:>6.1f}pp")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("regions", help="where models live in weight space: PCA / t-SNE map, distances, barrier "
                                       "heights between pairs",
                       description="Where models live in weight space: a population (trained from the built-in and "
                                   "cached, or checkpoint files) embedded in 2-D by PCA and t-SNE, coloured by group, "
                                   "its pairwise distances, and validation accuracy along straight lines between "
                                   "pairs (the barrier that tells whether two models can be souped); writes "
                                   "regions.json and its plots.")
    add_population_options(p)
    p.add_argument("--layer", default=None,
                   help="embed one layer's weight (a module name, e.g. blocks.0.attn.qkv) instead of all "
                        "parameters")
    p.add_argument("--project", action="store_true",
                   help="embed each layer's U_out^T W U_in: its weight restricted to the data subspaces of the "
                        "first model (the base) at --energy")
    p.add_argument("--energy", type=float, default=0.99,
                   help="with --project: energy of the data subspaces (default: %(default)s)")
    p.add_argument("--pairs", choices=("representative", "all"), default="representative",
                   help="paths measured: each group's best model with every other group's, and the two best of "
                        "each group; or every pair (default: %(default)s)")
    p.add_argument("--points", type=int, default=11,
                   help="points per path, endpoints included (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of PCA / t-SNE (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: utilrank-out/regions-MODEL)")
    p.add_argument("--force", action="store_true", help="replace an --out folder that already holds results")
    p.set_defaults(func=run)
