"""``utilrank compress``: factor every layer to its utilized rank (or a searched cut), fine-tune, save."""

from __future__ import annotations

import argparse
import copy
import time

from .._files import write_json
from ..analysis import Statistics, format_table, statistics_bytes
from ..bench import ENGINES, bench
from ..compress import CompressConfig, Plan, check_fits, compress_model, write_compressed
from ..compress.summary import LATENCY_BATCH, CompressSummary, EngineTiming, latency_notes, summarize
from ..data.datasets import example_inputs
from ..metrics import accuracy_problem, select_metric
from ..models.hf import KeywordInputs
from ..plots import plot_utilization
from ..timing import Timing, latency_ms
from ..train import TrainRecipe
from ._model import model_and_data
from ._options import UsageError, add_common_options, positive_int
from ._output import commit, output_folder
from ._runtime import init_distributed, resolve_device
from ._statistics import collect_statistics


def engine_list(text: str) -> list[str]:
    """argparse type: comma-separated engines of ``utilrank bench``."""
    engines = [e.strip() for e in text.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise argparse.ArgumentTypeError(f"expected engines from {', '.join(ENGINES)}, got {text!r}")
    return engines


def compress_config(args) -> CompressConfig:
    """The ``CompressConfig`` of the command's options (its errors name the option)."""
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
    config = compress_config(args)
    folder = output_folder(args, "compress")
    rank, world = init_distributed()
    device = resolve_device(args.device)
    started = time.perf_counter()
    plan, stats = _read_plan_and_stats(args, device)
    loaded = model_and_data(args, device)
    model, data = loaded.model, loaded.data
    metric_name, metric = _metric(args, config, model, data, device)
    _check_plan_and_stats(args, model, plan, stats)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder.require_space((0 if stats else 2 * statistics_bytes(model)) + model_bytes)
    if stats is None:
        stats = collect_statistics(args, model, data, device, folder, rank, world)
    if rank != 0:
        return 0
    try:  # accuracy: compress_model's own, whose search warnings speak of examples and classes
        result = compress_model(model, data, config, statistics=stats, plan=plan, arch=args.model, device=device,
                                metric=None if metric_name == "accuracy" else metric)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    summary = _summarize(args, config, model, data, result, metric_name, device)
    _save(folder, result, loaded.config, summary)
    print(format_table(result.report))
    print(f"factored {len(result.plan.layers)} layers; kept dense: "
          + (", ".join(f"{n} ({r})" for n, r in result.plan.dense.items()) or "none"))
    print(summary.format_table())
    out = commit(folder)
    print(f"wrote {out}/ (model.safetensors, plan.json, config.json, report.json, summary.json, utilization.png, "
          f"stats.safetensors, manifest.json) in {time.perf_counter() - started:.1f}s")
    return 0


def _read_plan_and_stats(args, device) -> tuple[Plan | None, Statistics | None]:
    """``--plan`` and ``--stats``, read first: a bad file fails before the model (maybe trained) and data load."""
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
    return plan, stats


def _check_plan_and_stats(args, model, plan: Plan | None, stats: Statistics | None) -> None:
    """The plan and the statistics given fit the model's layers."""
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


def _summarize(args, config, model, data, result, metric_name: str, device) -> CompressSummary:
    """The summary: the latencies of dense and compressed in each ``--engines``, then sizes and scores."""
    notes: list[str] = []
    engines = _time_engines(args.engines, model, result.model, example_inputs(data.test, LATENCY_BATCH, "cpu"), notes)
    if data.test_split != "test":
        notes.append(f"--data {args.data} has no test/ folder: 'test' accuracy is measured on val/, the split the "
                     "rank search tuned on (optimistic)")
    return summarize(result, model, data, model_name=args.model, metric=metric_name,
                     finetune_epochs=config.finetune.epochs, engines=engines, budget=config.budget, notes=notes,
                     device=device)


def _save(folder, result, config: dict, summary: CompressSummary) -> None:
    """The compressed model (model.safetensors, plan.json, config.json), report.json, its plot and summary.json."""
    write_compressed(result.model, result.plan, config, folder.partial)
    result.report.save(folder.path("report.json"))
    plot_utilization(result.report.to_dict(), folder.path("utilization.png"))
    write_json(folder.path("summary.json"), summary.to_json())


def _metric(args, config, model, data, device):
    """``--metric`` (default: accuracy where the model has a head and the data labels, else cosine to the dense
    model), and the refusal of fine-tuning without labels or a head: it trains on cross-entropy."""
    try:
        name, metric = select_metric(args.metric, model, data, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    problem = accuracy_problem(model, data)
    if config.finetune.epochs and problem:
        raise UsageError(f"--finetune-epochs {config.finetune.epochs}: fine-tuning trains on labels and {problem}; "
                         "pass --finetune-epochs 0")
    return name, metric


def _time_engines(requested: list[str], model, compressed, inputs, notes: list[str]) -> dict[str, EngineTiming]:
    """CPU latency of dense and compressed at ``LATENCY_BATCH`` in each engine, timed as ``utilrank bench``
    times them (interleaved within an engine; the same rows). An engine that fails is a note, never a silent
    gap; eager always runs."""
    if isinstance(inputs, dict):  # keyword inputs (text): only eager PyTorch takes them as they are
        times = latency_ms({"dense": KeywordInputs(copy.deepcopy(model).cpu()),
                            "compressed": KeywordInputs(copy.deepcopy(compressed).cpu())}, inputs, progress=True)
        if [e for e in requested if e != "eager"]:
            notes.append("engines other than eager are timed on tensor inputs only; text models: eager")
        return {"eager": EngineTiming(Timing(**times["dense"]), Timing(**times["compressed"]))}
    engines_timed = list(dict.fromkeys(["eager", *requested]))
    print(f"latency: dense and compressed at batch {inputs.shape[0]} on the CPU in {', '.join(engines_timed)} "
          "(interleaved; compile first compiles both)", flush=True)
    rows = bench(copy.deepcopy(model), copy.deepcopy(compressed), model_name="", input_shape=tuple(inputs.shape[1:]),
                 batch_sizes=(inputs.shape[0],), engines=engines_timed, device="cpu",
                 warmup=3, iters=40, max_seconds=6.0, log=lambda line: print(f"  {line}", flush=True))
    timed: dict[str, dict[str, Timing]] = {}
    for row in rows:
        if "error" in row:
            notes.append(f"latency: engine {row['engine']} failed ({row['error']}); not reported")
            continue
        timed.setdefault(row["engine"], {})[row["variant"]] = Timing(
            row["infer_step_time"], row["step_time_p20"], row["step_time_p80"])
    engines = {e: EngineTiming(t["dense"], t["compressed"]) for e, t in timed.items()
               if {"dense", "compressed"} <= t.keys()}
    if not engines:  # eager dense raises in bench(); this is the compressed model failing in every engine
        raise RuntimeError(f"latency: the compressed model ran in no engine ({'; '.join(notes)})")
    notes += latency_notes(engines, inputs.shape[0])
    return engines


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
                        "good or better on every model measured (docs/results.md, 'Factoring methods')")
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
