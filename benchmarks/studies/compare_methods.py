"""The three factoring methods at equal parameters on the built-in ViT and CNN, and whole-model budgets
against the tolerance-driven plan of the same size (issue 16).

For each built-in: the rank search (tolerance 0.2 pp, method data: the paper's setting) and its size P; then
one budget plan at P and one at 0.5 of the dense parameters (``--target-params``), each factored by
``optimal``, ``data`` and ``svd`` (the same ranks: the plan is reused, only the factors change); test
accuracy before and after fine-tuning (20 epochs, the command's recipe). Statistics and eigendecompositions
are computed once per model.

    python benchmarks/run.py compare-methods              # writes benchmarks/results/<device>_methods-builtin.json
    python benchmarks/run.py compare-methods --table FILE # the README table from a results file
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from benchmarks.tools.rows import environment, result_path
from utilrank_kernels import CompressConfig, TrainRecipe, compress_model
from utilrank_kernels._files import write_json
from utilrank_kernels.compress import budget_plan
from utilrank_kernels.data import load_data
from utilrank_kernels.measure import count_params
from utilrank_kernels.models import build_model
from utilrank_kernels.train import evaluate

METHODS = ("optimal", "data", "svd")


def run_model(name: str, epochs: int, fractions: tuple[float, ...]) -> list[dict]:
    model, _ = build_model(name)
    data = load_data(None, model)
    recipe = TrainRecipe(epochs=epochs, augment=True)
    dense_acc = evaluate(model, data.test)
    rows = []

    def record(cut: str, result, plan_method: str, started: float) -> None:
        rows.append({"model": name, "cut": cut, "method": plan_method,
                     "params": count_params(result.model), "param_fraction": count_params(result.model)
                     / count_params(model), "dense": dense_acc, "projected": result.scores["projected"]["test"],
                     "finetuned": result.scores["compressed"]["test"],
                     "seconds": round(time.perf_counter() - started, 1)})
        print(f"{name:<11} {cut:<28} {plan_method:<8} params {rows[-1]['param_fraction']:.4f}  "
              f"projected {rows[-1]['projected']:.2%}  fine-tuned {rows[-1]['finetuned']:.2%}", flush=True)

    started = time.perf_counter()
    # the paper's setting, and this command's default until the methods were compared here
    searched = compress_model(model, data, CompressConfig(method="data", tolerance=0.2, finetune=recipe), arch=name,
                              progress=False)
    record("rank search (tolerance 0.2)", searched, "data", started)
    stats, subspaces = searched.statistics, searched.subspaces
    val_accuracy = lambda m: evaluate(m, data.val)  # noqa: E731
    for fraction in (rows[0]["param_fraction"], *fractions):
        plan = budget_plan(model, subspaces, fraction, arch=name, method="optimal", evaluate=val_accuracy)
        for method in METHODS:
            started = time.perf_counter()
            config = CompressConfig(method=method, finetune=recipe)
            result = compress_model(model, data, config, statistics=stats, subspaces=subspaces,
                                    plan=dataclasses.replace(plan, method=method), arch=name, progress=False)
            record(f"--target-params {fraction:.4g}", result, method, started)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | cut | method | params (of dense) | dense | before fine-tuning | after fine-tuning |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['cut']} | {r['method']} | {r['param_fraction']:.3f} | {r['dense']:.2%} "
                     f"| {r['projected']:.2%} | {r['finetuned']:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit-digits,vgg-digits")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default: the command's 20)")
    p.add_argument("--fractions", default="0.5", help="budgets besides the rank search's size (default: 0.5)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_methods-builtin.json")
    p.add_argument("--table", default=None, metavar="FILE", help="print the README table of a results file")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["rows"]))
        return 0
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.epochs, tuple(float(f) for f in args.fractions.split(",")))
    command = "python benchmarks/run.py compare-methods " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"format": "utilrank.methods/1", **environment("cpu"), "rows": rows, "command": command}
    write_json(result_path("methods-builtin", "cpu", args.out), doc)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
