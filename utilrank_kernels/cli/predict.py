"""``utilrank predict``: how well weight-only metrics (alpha, alpha_weighted, stable rank, MP soft rank,
norms, MLU) rank and predict the test accuracy of a population of models."""

from __future__ import annotations

import time

from .._files import write_json
from ..plots import plot_predict
from ..weightspace.predict import METRICS, MIN_MODELS, predict_experiment
from ._options import UsageError
from ._output import commit, output_folder
from ._runtime import limit_threads, resolve_device
from .regions import add_population_options, check_population, load_population
from .spectrum import add_esd_options, esd_options


def run(args) -> int:
    with limit_threads(args.threads):
        return _predict(args)


def _predict(args) -> int:
    metrics = args.metrics or list(METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"--metrics {unknown[0]}: choose from {', '.join(METRICS)}")
    options = esd_options(args)
    device = resolve_device(args.device)
    checked = check_population(args, device, least=MIN_MODELS, purpose="leave-one-out regression")
    folder = output_folder(args, "predict")
    started = time.perf_counter()
    population, data = load_population(args, device, checked)
    if len(population.members) < MIN_MODELS:
        raise UsageError(f"leave-one-out regression needs at least {MIN_MODELS} models, got "
                         f"{len(population.members)}")
    try:
        doc = predict_experiment(population, data, target=args.target, energy=args.energy, options=options,
                                 metrics=metrics, device=device)
    except ValueError as exc:  # a member's weights the spectra cannot take
        raise UsageError(str(exc)) from exc
    write_json(folder.path("predict.json"), doc)
    plot_predict(doc, folder.path("predict.png"))
    print(format_predict(doc))
    out = commit(folder)
    print(f"wrote {out}/predict.json, predict.png in {time.perf_counter() - started:.1f}s "
          f"(population: {doc['population']['cache'] or 'files'})")
    return 0


def format_predict(doc: dict) -> str:
    target = doc["target"]
    accs = [m[target] for m in doc["members"]]
    lines = [f"{doc['model']} on {doc['dataset']}: {len(accs)} models, {target} accuracy "
             f"{min(accs):.1%} to {max(accs):.1%}", ""]
    groups = sorted({g for c in doc["spearman"].values() for g in c["by_group"]})
    head = f"{'metric':<18} {'Spearman rho':>12} {'p':>9}" + "".join(f" {('rho ' + g)[:16]:>16}" for g in groups)
    lines += [head, "-" * len(head)]
    for name, c in doc["spearman"].items():
        line = f"{name:<18} {c['rho']:>+12.3f} {c['p']:>9.2g}"
        for g in groups:
            r = c["by_group"].get(g)
            line += f" {r['rho']:>+16.3f}" if r else f" {'-':>16}"
        lines.append(line)
    r = doc["regression"]
    lines += ["", f"ridge regression on all {len(r['features'])} metrics, leave-one-out over the models:",
              f"  MAE {100 * r['loo_mae']:.2f} pp, RMSE {100 * r['loo_rmse']:.2f} pp; trivial (mean) predictor: "
              f"MAE {100 * r['trivial_loo_mae']:.2f} pp, RMSE {100 * r['trivial_loo_rmse']:.2f} pp; "
              f"R^2 (LOO) {r['r2_loo']:.3f}"]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="accuracy from weights: Spearman correlations of weight metrics with test "
                                       "accuracy, and a leave-one-out regression, over a population",
                       description="How well weight-only metrics (alpha, alpha_weighted, stable rank, MP soft rank, "
                                   "norms) and the MLU predict test accuracy over a population of models: Spearman "
                                   "correlations and a leave-one-out ridge regression against the mean predictor; "
                                   "writes predict.json and a scatter plot.")
    add_population_options(p)
    p.add_argument("--target", choices=("test", "val"), default="test",
                   help="the accuracy predicted (default: %(default)s)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help="metrics used (default: alpha alpha_weighted stable_rank mp_softrank log_norm "
                        "log_spectral_norm mlu)")
    p.add_argument("--energy", type=float, default=0.99, help="energy of the MLU (default: %(default)s)")
    add_esd_options(p)
    p.add_argument("--out", default=None, help="output folder (default: utilrank-out/predict-MODEL)")
    p.add_argument("--force", action="store_true", help="replace an --out folder that already holds results")
    p.set_defaults(func=run)
