"""``utilrank compress``: factor every layer to its utilized rank (or a searched cut), fine-tune, save."""

from __future__ import annotations

import time

from ..models.hf import KeywordInputs
from ._common import (
    UsageError,
    add_common_options,
    collect_statistics,
    commit,
    init_distributed,
    load_model_and_data,
    output_folder,
    positive_int,
    resolve_device,
    statistics_bytes,
)


def _summary_table(summary: dict) -> str:
    d, p, c = summary["dense"], summary["projected"], summary["compressed"]
    score = summary["metric"]  # "accuracy" or "cosine" (--metric): the key of each variant's score
    test = "test" if summary["test_split"] == "test" else "test (= val!)"
    lines = [
        f"{'':<20}{'dense':>14}{'compressed':>14}{'ratio':>9}",
        f"{'parameters':<20}{d['params']:>14,}{c['params']:>14,}{c['params'] / d['params']:>9.3f}",
        f"{'FLOPs / image':<20}{d['flops']:>14,}{c['flops']:>14,}{c['flops'] / d['flops']:>9.3f}",
        *_latency_lines(summary),
        f"{test + ' ' + score:<20}{d[score]:>14.2%}{c[score]:>14.2%}{100 * (c[score] - d[score]):>+8.2f}pp",
        f"projected ({summary['method']}, before fine-tuning): {p[score]:.2%}; "
        f"fine-tuned {summary['finetune_epochs']} epochs: {c[score]:.2%}; MLU {summary['mlu']:.3f}",
    ]
    if "dense_finetuned" in summary:
        lines.append(f"control: the dense model fine-tuned the same {summary['finetune_epochs']} epochs: "
                     f"{summary['dense_finetuned'][score]:.2%} (compressed "
                     f"{100 * (c[score] - summary['dense_finetuned'][score]):+.2f} pp against it)")
    lines += [f"note: {n}" for n in summary["notes"]]
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)


def _latency_lines(summary: dict) -> list[str]:
    """One line per engine (median, p20-p80, and the ratio compressed / dense), at the latency batch."""
    ms = lambda v: f"{v:.2f}" if v < 100 else f"{v:.0f}"  # noqa: E731  (a spread cell stays 14 wide)
    spread = lambda t, v: f"[{ms(t[v + '_p20_ms'])}-{ms(t[v + '_p80_ms'])}]"  # noqa: E731
    lines = []
    for engine, t in summary["engines"].items():
        label = f"CPU ms b{summary['latency_batch']} {engine}"
        lines.append(f"{label:<20}{t['dense_ms']:>14.2f}{t['compressed_ms']:>14.2f}"
                     f"{t['compressed_ms'] / t['dense_ms']:>9.3f}  (speedup {t['speedup']:.2f}x)")
        lines.append(f"{'  p20-p80':<20}{spread(t, 'dense'):>14}{spread(t, 'compressed'):>14}")
    return lines


def engine_list(text: str) -> list[str]:
    """argparse type: comma-separated engines of ``utilrank bench``."""
    import argparse

    from ..bench.timing import ENGINES

    engines = [e.strip() for e in text.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise argparse.ArgumentTypeError(f"expected engines from {', '.join(ENGINES)}, got {text!r}")
    return engines


def compress_config(args):
    """The ``CompressConfig`` of the command's options (its errors name the option)."""
    from ..compress import CompressConfig
    from ..train import TrainRecipe

    if args.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs {args.finetune_epochs}: must be >= 0")
    if args.lr <= 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    for option, value in (("--tolerance", args.tolerance), ("--total-tolerance", args.total_tolerance)):
        if value is not None and value < 0:
            raise UsageError(f"{option} {value}: must be >= 0 percentage points")
    try:
        recipe = TrainRecipe(epochs=args.finetune_epochs, lr=args.lr, weight_decay=args.weight_decay,
                             batch_size=args.finetune_batch_size, augment=args.data in (None, "digits"))
        if args.finetune_dense and not args.finetune_epochs:
            raise ValueError("--finetune-dense needs --finetune-epochs >= 1")
        return CompressConfig(method=args.method, energy=args.energy, tolerance=args.tolerance,
                              total_tolerance=args.total_tolerance, target_params=args.target_params,
                              target_flops=args.target_flops, refine=not args.no_refine, include=tuple(args.include),
                              exclude=tuple(args.exclude), finetune=recipe, finetune_dense=args.finetune_dense,
                              target_device=args.target_device, target_batch=args.target_batch)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(args) -> int:

    from .._cache import write_json
    from ..analysis import Statistics, format_table, write_report
    from ..compress import Plan, check_fits, compress_model, write_compressed
    from ..measure import count_flops, count_params

    config = compress_config(args)
    folder = output_folder(args, "compress")
    rank, world = init_distributed()
    device = resolve_device(args.device)
    started = time.perf_counter()
    # the files given are read first: a bad --plan or --stats fails before the model (maybe trained) and data load
    plan = stats = None
    if args.plan:  # re-enter at the factors: the plan is the one saved, not planned again
        try:
            plan = Plan.load(args.plan)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--plan {args.plan}: {exc}") from exc
    if args.stats:
        try:
            stats = Statistics.load(args.stats, device=device)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--stats {args.stats}: {exc}") from exc
        if stats.meta.get("model") not in (None, args.model):
            raise UsageError(f"--stats {args.stats}: collected on --model {stats.meta['model']}, not {args.model}")
    model, model_config, data = load_model_and_data(args, device)
    metric_name, metric = _metric(args, config, model, data, device)
    if metric_name == "accuracy":
        metric = None  # compress_model's own: accuracy, whose search warnings speak of examples and classes
    try:
        if plan is not None:
            check_fits(model, plan)
    except ValueError as exc:
        raise UsageError(f"--plan {args.plan}: {exc}") from exc
    try:
        if stats is not None:
            stats.check_model(model)
    except ValueError as exc:
        raise UsageError(f"--stats {args.stats}: {exc}") from exc
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder.require_space((0 if stats else 2 * statistics_bytes(model)) + model_bytes)
    if stats is None:
        stats = collect_statistics(args, model, data, device, folder, rank, world)
    if rank != 0:
        return 0
    try:
        result = compress_model(model, data, config, statistics=stats, plan=plan, arch=args.model, device=device,
                                metric=metric)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    compressed, plan, scores = result.model, result.plan, result.scores
    example, bench_input = _test_inputs(data.test, 1, device), _test_inputs(data.test, LATENCY_BATCH, "cpu")
    # a model called with **batch (a Hugging Face model on text) is measured through a wrapper that unpacks it
    measured = KeywordInputs if isinstance(example, dict) else (lambda m: m)
    notes = []
    engines = _engine_latency(args.engines, model, compressed, bench_input, notes)
    latency = engines.get("eager") or next(iter(engines.values()))
    if data.test_split != "test":
        notes.append(f"--data {args.data} has no test/ folder: 'test' accuracy is measured on val/, the split the "
                     "rank search tuned on (optimistic)")
    # projected and fine-tuned share the compressed architecture: one count of each
    size = {"params": count_params(compressed), "flops": count_flops(measured(compressed), example)}
    summary = {
        "format": "utilrank.summary/1", "model": args.model, "dataset": data.name, "method": plan.method,
        "metric": metric_name, "engines": {e: _engine_row(t) for e, t in engines.items()},
        "dense": {"params": count_params(model), "flops": count_flops(measured(model), example),
                  metric_name: scores["dense"]["test"], **_latency(latency["dense"])},
        "projected": {**size, metric_name: scores["projected"]["test"]},
        "compressed": {**size, metric_name: scores["compressed"]["test"], **_latency(latency["compressed"])},
        "mlu": result.report.mlu, "finetune_epochs": config.finetune.epochs, "test_split": data.test_split,
        "latency_batch": LATENCY_BATCH, "notes": notes, "warnings": result.warnings,
    }
    if "dense_finetuned" in scores:
        summary["dense_finetuned"] = {metric_name: scores["dense_finetuned"]["test"]}
    if config.budget is not None:
        measure, target = config.budget
        achieved = summary["compressed"][measure] / summary["dense"][measure]
        summary["target"] = {"measure": measure, "fraction": target, "achieved": achieved}
        notes.append(f"target {measure} {target:g} of dense: the saved model has {achieved:.4f}")
    write_compressed(compressed, plan, model_config, folder.partial)
    write_report(result.report, folder.partial)
    write_json(folder.path("summary.json"), summary)
    print(format_table(result.report))
    print(f"factored {len(plan.layers)} layers; kept dense: "
          + (", ".join(f"{n} ({r})" for n, r in plan.dense.items()) or "none"))
    print(_summary_table(summary))
    out = commit(folder)
    print(f"wrote {out}/ (model.safetensors, plan.json, config.json, report.json, summary.json, utilization.png, "
          f"stats.safetensors, manifest.json) in {time.perf_counter() - started:.1f}s")
    return 0


def _metric(args, config, model, data, device):
    """``--metric`` (default: accuracy where the model has a head and the data labels, else cosine to the dense
    model), and the refusal of fine-tuning without labels or a head: it trains on cross-entropy."""
    from ..metrics import accuracy_problem, select_metric

    try:
        name, metric = select_metric(args.metric, model, data, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    problem = accuracy_problem(model, data)
    if config.finetune.epochs and problem:
        raise UsageError(f"--finetune-epochs {config.finetune.epochs}: fine-tuning trains on labels and {problem}; "
                         "pass --finetune-epochs 0")
    return name, metric


def _test_inputs(dataset, n: int, device):
    """The model input of the first ``n`` examples (cycling), as a DataLoader would batch them."""
    from torch.utils.data import default_collate

    from ..analysis.stats import model_input

    return model_input(default_collate([dataset[i % len(dataset)] for i in range(n)]), device)[0]


LATENCY_BATCH = 32


def _engine_latency(requested: list[str], model, compressed, inputs, notes: list[str]) -> dict:
    """CPU latency of dense and compressed at ``LATENCY_BATCH`` in each engine, timed as ``utilrank bench``
    times them (interleaved within an engine; the same rows): ``{engine: {"dense": {median, p20, p80},
    "compressed": {...}}}``. An engine that fails is a note, never a silent gap; eager always runs."""
    import copy

    from ..timing import latency_ms

    if isinstance(inputs, dict):  # keyword inputs (text): only eager PyTorch takes them as they are
        from ..models.hf import KeywordInputs

        times = latency_ms({"dense": KeywordInputs(copy.deepcopy(model).cpu()),
                            "compressed": KeywordInputs(copy.deepcopy(compressed).cpu())}, inputs, progress=True)
        if [e for e in requested if e != "eager"]:
            notes.append("engines other than eager are timed on tensor inputs only; text models: eager")
        return {"eager": times}
    from ..bench import bench

    engines_timed = list(dict.fromkeys(["eager", *requested]))
    print(f"latency: dense and compressed at batch {inputs.shape[0]} on the CPU in {', '.join(engines_timed)} "
          "(interleaved; compile first compiles both)", flush=True)
    rows = bench(copy.deepcopy(model), copy.deepcopy(compressed), model_name="", input_shape=tuple(inputs.shape[1:]),
                 batch_sizes=(inputs.shape[0],), engines=engines_timed, device="cpu",
                 warmup=3, iters=40, max_seconds=6.0, log=lambda line: print(f"  {line}", flush=True))
    engines: dict[str, dict] = {}
    for row in rows:
        if "error" in row:
            notes.append(f"latency: engine {row['engine']} failed ({row['error']}); not reported")
            continue
        engines.setdefault(row["engine"], {})[row["variant"]] = {
            "median": row["infer_step_time"], "p20": row["step_time_p20"], "p80": row["step_time_p80"]}
    engines = {e: t for e, t in engines.items() if {"dense", "compressed"} <= t.keys()}
    if not engines:  # eager dense raises in bench(); this is the compressed model failing in every engine
        raise RuntimeError(f"latency: the compressed model ran in no engine ({'; '.join(notes)})")
    spread = max(t[v]["p80"] / t[v]["p20"] for t in engines.values() for v in t)
    if spread > 1.25:
        notes.append("latency p80/p20 above 1.25: a busy or throttling machine; compare with `utilrank bench`")
    best = max(engines, key=lambda e: engines[e]["dense"]["median"] / engines[e]["compressed"]["median"])
    speedup = engines[best]["dense"]["median"] / engines[best]["compressed"]["median"]
    if speedup <= 1:
        notes.append(f"not faster than dense at batch {inputs.shape[0]} in any engine timed (best: {best}, "
                     f"{speedup:.2f}x): this model is bound by per-call overhead and the layers factoring leaves "
                     "alone (attention, norms); try --target-device cpu, which keeps dense the layers whose factored "
                     "form is not faster, or a larger batch in `utilrank bench`")
    return engines


def _engine_row(t: dict) -> dict:
    return {"dense_ms": t["dense"]["median"], "dense_p20_ms": t["dense"]["p20"], "dense_p80_ms": t["dense"]["p80"],
            "compressed_ms": t["compressed"]["median"], "compressed_p20_ms": t["compressed"]["p20"],
            "compressed_p80_ms": t["compressed"]["p80"],
            "speedup": t["dense"]["median"] / t["compressed"]["median"]}


def _latency(ms: dict[str, float]) -> dict[str, float]:
    return {"latency_ms": ms["median"], "latency_p20_ms": ms["p20"], "latency_p80_ms": ms["p80"]}


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="factor every layer to its utilized rank, fine-tune, save",
                       description="Factor every Linear/Conv2d to its utilized rank (or the deepest cut the rank "
                                   "search keeps within --tolerance), fine-tune, and save a folder that "
                                   "load_compressed() rebuilds: model.safetensors, plan.json, config.json, "
                                   "report.json, summary.json, utilization.png, stats.safetensors, manifest.json.")
    add_common_options(p, "compress")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="rank search: per layer, the deepest cut whose projection alone costs at most PP "
                        "percentage points of validation accuracy (default: %(default)s); --tolerance -1 is "
                        "refused, use --no-search for the fixed --energy cut")
    p.add_argument("--total-tolerance", type=float, default=None, metavar="PP",
                   help="rank search: all cuts together may cost at most PP percentage points of validation "
                        "accuracy, else every layer backs off one candidate at a time (default: --tolerance "
                        "times the number of searched layers)")
    p.add_argument("--no-search", dest="tolerance", action="store_const", const=None,
                   help="no rank search: cut every layer at --energy")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-params", type=float, default=None, metavar="R",
                        help="size the whole model to R (a fraction, e.g. 0.5) of the dense parameters: ranks go "
                             "where they cost the least output energy per parameter saved (from the "
                             "eigendecompositions), refined on the validation split (replaces the rank search)")
    budget.add_argument("--target-flops", type=float, default=None, metavar="R",
                        help="as --target-params, for FLOPs per example (FlopCounterMode's, attention counted)")
    p.add_argument("--no-refine", action="store_true",
                   help="with a target: allocate by output energy alone, no validation refinement")
    p.add_argument("--finetune-epochs", type=int, default=20,
                   help="epochs of fine-tuning the factored model on the train split (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="fine-tuning AdamW weight decay (default: %(default)s)")
    p.add_argument("--finetune-batch-size", type=positive_int, default=64,
                   help="fine-tuning batch size (default: %(default)s)")
    p.add_argument("--finetune-dense", action="store_true",
                   help="also fine-tune a copy of the dense model with the same recipe and report it: the "
                        "like-for-like control (the compressed model's fine-tuning is otherwise extra training "
                        "the dense model never got)")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="factor to this plan.json (from an earlier compress) instead of planning: re-runs only the "
                        "factors and fine-tuning; with --stats FILE no statistics pass either")
    p.add_argument("--metric", choices=("accuracy", "cosine"), default=None,
                   help="what the rank search and the summary score (default: accuracy where the model has a "
                        "classification head and the data labels, else cosine): cosine is the mean cosine "
                        "similarity of the output embedding (last_hidden_state averaged over the attention mask, "
                        "else pooler_output, else the logits) to the dense model's on the same split; --tolerance "
                        "PP then allows a drop of PP/100 in it. Fine-tuning needs labels and a head: without them pass "
                        "--finetune-epochs 0")
    p.add_argument("--method", choices=("optimal", "data", "svd"), default="optimal",
                   help="optimal (default): the rank-r map closest to W on the data (U_r U_r^T W, U_r the top "
                        "eigenvectors of C_out); data: the paper's projection on the data subspaces (P_out W P_in); "
                        "svd: truncated SVD of W at the same ranks (the baseline). At equal ranks optimal was as "
                        "good or better on every model measured (README, 'Factoring methods')")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="factor only layers whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep layers whose name matches dense (repeatable), e.g. --exclude head")
    p.add_argument("--stats", default=None,
                   help="reuse a stats.safetensors from an earlier analyze instead of a new pass")
    p.add_argument("--target-device", choices=("cpu", "cuda"), default=None,
                   help="keep a layer dense where factoring is not faster on this device, and round ranks up "
                        "to tile multiples where that costs no time (measured; timings cached per device)")
    p.add_argument("--engines", type=engine_list, default=["eager", "compile"],
                   help="where the summary times dense and compressed at batch 32 on the CPU, as `utilrank bench` "
                        "does: comma-separated eager,compile,onnxruntime (default: eager,compile; onnxruntime needs "
                        "pip install -e '.[deploy]'); the table shows each, and the speedup of the best")
    p.add_argument("--target-batch", type=positive_int, default=32,
                   help="with --target-device: the batch size to be fast at (default: %(default)s)")
    p.set_defaults(func=run)
