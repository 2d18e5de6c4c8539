"""``utilrank compress``: factor every layer to its utilized rank (or a searched cut), fine-tune, save."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time

from .._distributed import process
from .._files import write_json
from ..analysis import format_table, statistics_bytes
from ..bench import ENGINES, bench
from ..bench.fastest import SUMMARY_MODES, fastest_mode
from ..compress import CompressConfig, Plan, check_fits, compress_model, write_compressed
from ..compress.pipeline import check_config
from ..compress.summary import LATENCY_BATCH, CompressSummary, EngineTiming, latency_notes, summarize
from ..data.datasets import example_inputs
from ..data.text import is_text_data
from ..metrics import METRICS, finetune_loss, select_metric
from ..models.hf import KeywordInputs
from ..plots import plot_utilization
from ..timing import Timing, latency_ms
from ..train import TrainRecipe
from ._model import model_and_data
from ._options import UsageError, add_common_options, add_layer_options, files_written, positive_int
from ._output import commit, output_folder
from ._runtime import init_distributed, resolve_device
from ._statistics import check_statistics, collect_statistics, read_statistics, same_model

SUMMARY_ENGINES = (*ENGINES, "fastest")  # fastest: the fastest CPU mode (engine and dtype) found here


def engine_list(text: str) -> list[str]:
    """argparse type: comma-separated engines of ``utilrank bench``, or ``fastest``."""
    engines = [e.strip() for e in text.split(",") if e.strip()]
    if not engines or any(e not in SUMMARY_ENGINES for e in engines):
        raise argparse.ArgumentTypeError(f"expected engines from {', '.join(SUMMARY_ENGINES)}, got {text!r}")
    return engines


DEFAULT_TOLERANCE = 0.5  # --tolerance when neither a target nor --no-search nor --plan is given
DEFAULT_METHOD = "optimal"
FINETUNE_DEFAULTS = {"lr": 1e-3, "weight_decay": 0.01, "finetune_batch_size": 64}
# distilling a pretrained model: 1e-3 undid it (EfficientNet-Lite0 logit cosine 0.13 at 2e-3, 0.80 at 5e-4; MiniLM
# embedding cosine 0.78 at 2e-3 against 0.90 at 1e-4: benchmarks/studies/real_pretrained.py, docs/results.md)
DISTILL_LR = 1e-4
DISTILL = ("auto", "off", "logits", "embedding", "hidden")  # off: train on labels (the library's loss "labels")
DEFAULT_TEMPERATURE = 1.0
TARGET_BATCH = 32


def _target(args) -> str | None:
    """``--target-params 0.5`` (as the option reads), or None."""
    for measure in ("params", "flops"):
        value = getattr(args, f"target_{measure}")
        if value is not None:
            return f"--target-{measure} {value:g}"
    return None


def check_options(args) -> None:
    """Options that contradict each other or would be ignored, refused in one line before any file is read: each
    is a run that would otherwise do something else than the command line says."""
    target, plan, stats = _target(args), args.plan and f"--plan {args.plan}", args.stats and f"--stats {args.stats}"
    search = [f"--{o.replace('_', '-')} {getattr(args, o):g}" for o in ("tolerance", "total_tolerance")
              if getattr(args, o) is not None]
    pass_options = [o for o in ("--resume" if args.resume else "",
                                f"--checkpoint-every {args.checkpoint_every}" if args.checkpoint_every else "",
                                f"--max-batches {args.max_batches}" if args.max_batches else "") if o]
    finetune = [f"--{k.replace('_', '-')} {getattr(args, k):g}" for k in FINETUNE_DEFAULTS
                if getattr(args, k) is not None]
    conflicts = [
        (target and plan, f"{target} with {plan}: the plan fixes every rank, a target would size them again; drop one"),
        *((target and s, f"{s} with {target}: a target sizes the model instead of the rank search, which is what "
                         "the tolerances bound; drop one") for s in search),
        (target and args.no_search, f"--no-search with {target}: a target never searches; drop --no-search"),
        *((args.no_search and s, f"{s} with --no-search: no rank search runs to use it; drop one") for s in search),
        *((plan and s, f"{s} with {plan}: the plan fixes every rank, no search runs; drop one") for s in search),
        (plan and args.no_search, f"--no-search with {plan}: the plan fixes every rank; drop --no-search"),
        (plan and (args.include or args.exclude), f"--include/--exclude with {plan}: the plan names the layers it "
                                                  "factors; drop them, or drop --plan to plan again"),
        (plan and args.target_device, f"--target-device with {plan}: the latency-aware pass makes a plan, and "
                                      "this one is fixed; drop one"),
        (args.no_refine and not target, "--no-refine: only a --target-params / --target-flops allocation is refined "
                                        "on validation; give a target or drop --no-refine"),
        (args.target_batch is not None and not args.target_device,
         f"--target-batch {args.target_batch}: the batch --target-device times layers at; give --target-device or "
         "drop it"),
        *((stats and o, f"{o} with {stats}: no statistics pass runs; drop {o.split()[0]}") for o in pass_options),
        *((args.finetune_epochs == 0 and f, f"{f} with --finetune-epochs 0: no fine-tuning runs to use it; drop it")
          for f in finetune),
        (args.finetune_dense and not args.finetune_epochs, "--finetune-dense needs --finetune-epochs >= 1"),
        *_distill_conflicts(args),
        *_error_aware_conflicts(args),
        *((is_text_data(args.data) and value is not None,
           f"{option} with --data {args.data}: FLOPs and layer timings are measured on tensor inputs, and text "
           "batches are dicts of tensors; use --target-params, without a latency pass")
          for option, value in (("--target-flops", args.target_flops), ("--target-device", args.target_device))),
    ]
    problem = next((message for conflict, message in conflicts if conflict), None)
    if problem:
        raise UsageError(problem)


def _error_aware_conflicts(args) -> list[tuple[bool, str]]:
    """``--error-aware`` where its statistics cannot be gathered: from a file, from a checkpoint, by the resumable
    pass's options, or for ``--method svd`` (which reads no statistics)."""
    if not args.error_aware:
        return []
    why = "error-aware statistics are gathered block by block with the earlier blocks factored"
    return [
        (args.stats, f"--error-aware with --stats {args.stats}: {why}, not read from a file; drop one"),
        (args.resume, f"--error-aware with --resume: {why}, a pass that has no checkpoint to resume; drop one"),
        *((value, f"--error-aware with {option}: {why}, a pass without checkpoints or a batch limit; drop one")
          for option, value in ((f"--checkpoint-every {args.checkpoint_every}", args.checkpoint_every),
                                (f"--max-batches {args.max_batches}", args.max_batches))),
        (args.method == "svd", "--error-aware with --method svd: svd factors the weights alone and reads no "
                               "statistics; use --method optimal or data, or drop --error-aware"),
    ]


def _distill_conflicts(args) -> list[tuple[bool, str]]:
    """``--distill`` and ``--distill-temperature`` where no fine-tuning, or no distillation on logits, runs to use
    them; the dense control with distillation (distilled from itself, the dense model would not change)."""
    temperature = args.distill_temperature is not None and f"--distill-temperature {args.distill_temperature:g}"
    distills = args.distill in ("logits", "embedding", "hidden")
    return [
        (args.distill != "auto" and not args.finetune_epochs,
         f"--distill {args.distill} with --finetune-epochs 0: no fine-tuning runs to use it; drop one"),
        (temperature and not args.finetune_epochs,
         f"{temperature} with --finetune-epochs 0: no fine-tuning runs to use it; drop it"),
        (temperature and args.distill in ("off", "embedding", "hidden"),
         f"{temperature} with --distill {args.distill}: only distillation on logits (--distill logits, or auto on "
         "a classifier without labels) has a temperature; drop it"),
        (args.finetune_dense and distills,
         f"--finetune-dense with --distill {args.distill}: the dense control distilled from itself would not change;"
         " the control trains on labels (--distill off or auto on labelled data), or drop --finetune-dense"),
    ]


def _check_values(args) -> None:
    """Numbers in their ranges (NaN and infinity refused: they compare false with every bound)."""
    if args.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs {args.finetune_epochs}: must be >= 0")
    for option, value in (("--tolerance", args.tolerance), ("--total-tolerance", args.total_tolerance)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{option} {value}: must be a number >= 0 (percentage points)")
    for option, value in (("--target-params", args.target_params), ("--target-flops", args.target_flops)):
        if value is not None and not 0 < value < 1:
            raise UsageError(f"{option} {value}: must be a fraction of the dense model in (0, 1), e.g. 0.5")
    if args.distill_temperature is not None and not (math.isfinite(args.distill_temperature)
                                                     and args.distill_temperature > 0):
        raise UsageError(f"--distill-temperature {args.distill_temperature}: must be a finite number > 0")
    for option, value in (("--lr", args.lr), ("--weight-decay", args.weight_decay)):
        if value is not None and not (math.isfinite(value) and value >= (0 if option == "--weight-decay" else 1e-300)):
            raise UsageError(f"{option} {value}: must be a finite number " + (">= 0" if option == "--weight-decay"
                                                                               else "> 0"))


def compress_config(args, plan: Plan | None = None) -> CompressConfig:
    """The ``CompressConfig`` of the command's options (its errors name the option); with ``--plan`` its method
    (``check_plan`` refused a ``--method`` that differs)."""
    _check_values(args)
    tolerance = None if (args.no_search or plan is not None or _target(args)) else (
        DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance)
    finetune = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in FINETUNE_DEFAULTS.items()}
    try:
        recipe = TrainRecipe(epochs=args.finetune_epochs, lr=finetune["lr"], weight_decay=finetune["weight_decay"],
                             batch_size=finetune["finetune_batch_size"], augment=args.data in (None, "digits"),
                             loss="labels" if args.distill == "off" else args.distill,
                             temperature=args.distill_temperature or DEFAULT_TEMPERATURE)
        return CompressConfig(method=plan.method if plan is not None else args.method or DEFAULT_METHOD,
                              energy=args.energy, tolerance=tolerance, total_tolerance=args.total_tolerance,
                              target_params=args.target_params, target_flops=args.target_flops,
                              refine=not args.no_refine, include=tuple(args.include), exclude=tuple(args.exclude),
                              finetune=recipe, finetune_dense=args.finetune_dense, target_device=args.target_device,
                              target_batch=args.target_batch or TARGET_BATCH, error_aware=args.error_aware,
                              stats_batch_size=args.batch_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(args) -> int:
    started = time.perf_counter()
    check_options(args)  # before any file is read
    device = resolve_device(args.device)
    plan, stats = read_plan(args), read_statistics(args, device)
    config = compress_config(args, plan)
    folder = output_folder(args, "compress")
    rank, world = init_distributed()
    loaded = model_and_data(args, device)
    model, data = loaded.model, loaded.data
    metric_name, metric = _metric(args, config, model, data, device)
    config = _distill_lr(args, config, model, data)
    check_statistics(args, model, data, stats)
    _check_against_model(args, config, model, data, plan)  # an unreachable target: before the statistics pass
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder.require_space((0 if stats else 2 * statistics_bytes(model)) + model_bytes)
    if stats is None and not args.error_aware:  # the error-aware pass runs inside compress_model
        stats = collect_statistics(args, model, data, device, folder, rank, world)
    if plan is not None and rank == 0:
        print(f"--plan {args.plan}: {len(plan.layers)} layers factored by its method, {plan.method}", flush=True)
    try:  # every process: under torchrun the search's scores are sharded and fine-tuning is data-parallel
        result = compress_model(model, data, config, statistics=stats, plan=plan, arch=args.model, device=device,
                                metric=None if metric_name == "accuracy" else metric)  # accuracy: compress_model's own
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if rank != 0:  # rank 0 times, writes and prints
        return 0
    if args.error_aware:  # what the plain pass writes; its meta says the statistics are error-aware
        result.statistics.save(folder.path("stats.safetensors"))
    summary = _summarize(args, config, model, data, result, metric_name, device)
    _save(folder, result, loaded.config, summary)
    if result.report is not None:
        print(format_table(result.report))
    print(f"factored {len(result.plan.layers)} layers; kept dense: "
          + (", ".join(f"{n} ({r})" for n, r in result.plan.dense.items()) or "none"))
    print(summary.format_table())
    out = commit(folder)
    print(f"wrote {out}/ ({files_written(out)}) in {time.perf_counter() - started:.1f}s")
    return 0


def read_plan(args) -> Plan | None:
    """``--plan``, read first (a bad file fails before the model, maybe trained, and the data load), and checked
    against ``--method``: a plan is factored by the method it was made with."""
    if not args.plan:
        return None
    try:  # re-enter at the factors: the plan is the one saved, not planned again
        plan = Plan.load(args.plan)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--plan {args.plan}: {str(exc).removeprefix(f'plan {args.plan}: ')}") from exc
    if args.method is not None and args.method != plan.method:
        raise UsageError(f"--method {args.method} with --plan {args.plan}: the plan was made with --method "
                         f"{plan.method}; drop --method to factor by the plan's, or drop --plan to plan again")
    return plan


def _check_against_model(args, config: CompressConfig, model, data, plan: Plan | None) -> None:
    """The plan was made for this model and fits its layers; ``--include`` / ``--exclude`` match layers; the target
    is reachable from the architecture alone (naming what cannot be cut); FLOPs and latency need tensor inputs."""
    if plan is not None:
        # the arch a command recorded (--model's value), or the class name a plan made in Python records
        if plan.arch and not same_model(plan.arch, args.model) and plan.arch != type(model).__name__:
            raise UsageError(f"--plan {args.plan}: made for --model {plan.arch}, this run has --model {args.model}; a "
                             "plan fits the model it was made for")
        try:
            check_fits(model, plan)
        except ValueError as exc:
            raise UsageError(f"--plan {args.plan}: {exc}") from exc
    try:
        check_config(model, data, config, plan=plan)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _summarize(args, config, model, data, result, metric_name: str, device) -> CompressSummary:
    """The summary: the latencies of dense and compressed in each ``--engines``, then sizes and scores."""
    notes: list[str] = []
    engines = _time_engines(args.engines, model, result.model, example_inputs(data.test, LATENCY_BATCH, "cpu"), notes)
    if data.test_split != "test":
        notes.append(f"--data {args.data} has no test/ folder: 'test' accuracy is measured on val/, the split the "
                     "rank search tuned on (optimistic)")
    return summarize(result, model, data, model_name=args.model, metric=metric_name,
                     finetune_epochs=config.finetune.epochs, engines=engines, budget=config.budget, notes=notes,
                     device=device, distill_temperature=config.finetune.temperature)


def _save(folder, result, config: dict, summary: CompressSummary) -> None:
    """The compressed model (model.safetensors, plan.json, config.json), report.json, its plot and summary.json."""
    write_compressed(result.model, result.plan, config, folder.partial)
    if result.report is not None:
        result.report.save(folder.path("report.json"))
        plot_utilization(result.report.to_dict(), folder.path("utilization.png"))
    write_json(folder.path("summary.json"), summary.to_json())


def _distill_lr(args, config: CompressConfig, model, data) -> CompressConfig:
    """Distillation's learning rate where ``--lr`` is not given: ``DISTILL_LR``, not the labels' default."""
    if args.lr is not None or not config.finetune.epochs:
        return config
    if finetune_loss(config.finetune.loss, model, data) == "labels":
        return config
    return dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, lr=DISTILL_LR))


def _metric(args, config, model, data, device):
    """``--metric`` (default: accuracy where the model has a head and the data labels, else cosine to the dense
    model), and the fine-tuning loss ``--distill`` names (auto: labels where the model has a head and the data
    labels, else distillation from the dense model), refused where the model or data cannot give it."""
    try:
        name, metric = select_metric(args.metric, model, data, device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not config.finetune.epochs:
        return name, metric
    try:
        loss = finetune_loss(config.finetune.loss, model, data)
    except ValueError as exc:
        raise UsageError(f"--distill {args.distill}: {exc}") from exc
    if args.distill_temperature is not None and loss != "logits":
        what = ("trains on the labels (the data has them and the model a head)" if loss == "labels" else
                "distils the output embedding")
        raise UsageError(f"--distill-temperature {args.distill_temperature:g} with --distill {args.distill}: "
                         f"fine-tuning {what}, which has no temperature; drop it")
    if args.finetune_dense and loss != "labels":
        raise UsageError(f"--finetune-dense with --distill {args.distill} ({loss} here): the dense control distilled "
                         "from itself would not change; drop --finetune-dense")
    if args.distill == "auto" and process()[0] == 0:
        why = {"labels": "the data has labels and the model a head",
               "logits": "the data has no labels: distilling from the dense model's logits",
               "embedding": "the model has no classification head: distilling from the dense model's output "
                            "embedding"}[loss]
        print(f"fine-tuning loss (--distill auto): {loss} ({why})", flush=True)
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
        engines = {"eager": EngineTiming(Timing(**times["dense"]), Timing(**times["compressed"]))}
        notes += latency_notes(engines, next(iter(inputs.values())).shape[0])  # the spread warning for text too
        return engines
    engines_timed = list(dict.fromkeys(["eager", *(e for e in requested if e != "fastest")]))
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
    if "fastest" in requested:
        fastest = _time_fastest(model, compressed, inputs, notes, timed=dict(engines))
        if fastest is not None:
            engines["fastest"] = fastest
    notes += latency_notes(engines, inputs.shape[0])
    return engines


def _time_fastest(model, compressed, inputs, notes: list[str],
                  timed: dict[str, EngineTiming]) -> EngineTiming | None:
    """Dense and compressed in the CPU mode (engine and dtype) where the compressed model ran fastest here: the
    best of ``bench.fastest_mode`` over ``SUMMARY_MODES`` and of the fp32 engines already ``timed`` (a compile
    engine, which the modes leave out, may be faster); and a note naming it, the modes tried and why any could not
    run."""
    tried = ", ".join([*(f"{e} {d}" for e, d in SUMMARY_MODES), *(f"{e} fp32" for e in timed if e != "eager")])
    print(f"latency: the fastest CPU mode, of {tried}", flush=True)
    try:
        best = fastest_mode(copy.deepcopy(model), copy.deepcopy(compressed), tuple(inputs.shape[1:]),
                            batch=inputs.shape[0], modes=SUMMARY_MODES, iters=10, max_seconds=6.0,
                            log=lambda line: print(f"  {line}", flush=True))
    except ValueError as exc:
        notes.append(f"latency: fastest mode: {exc}; not reported")
        return None
    skipped = sorted({f"{r['engine']} {r['dtype']} ({r['error']})" for r in best.rows if "error" in r})
    found = EngineTiming(best.dense_timing, best.compressed_timing, best.name)
    engine, other = min(timed.items(), key=lambda item: item[1].compressed.median)
    if other.compressed.median < found.compressed.median:  # an fp32 engine timed above, in its own run
        found = EngineTiming(other.dense, other.compressed, f"{engine} fp32")
    cosine = (f"; the compressed model's logit cosine there against its own eager fp32 outputs "
              f"{best.logit_cosine:.4f}" if found.mode == best.name else "")
    notes.append(f"fastest CPU mode here (the 'fastest' row): {found.mode}, of {tried}{cosine}"
                 + (f"; not run: {'; '.join(skipped)}" if skipped else ""))
    return found


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="factor every layer to its utilized rank, fine-tune, save",
                       description="Factor every Linear/Conv2d to its utilized rank (or the deepest cut the rank "
                                   "search keeps within --tolerance, or a whole-model --target-params), fine-tune, "
                                   "and save a folder that load_compressed() rebuilds: model.safetensors, plan.json, "
                                   "config.json, report.json, summary.json, utilization.png, stats.safetensors "
                                   "(unless --stats), manifest.json. Options that contradict each other are refused.")
    add_common_options(p, "compress")
    add_layer_options(p, "compress")
    p.add_argument("--tolerance", type=float, default=None, metavar="PP",
                   help=f"rank search: per layer, the deepest cut whose factors alone cost at most PP percentage "
                        f"points of validation accuracy (default: {DEFAULT_TOLERANCE}); refused with a target, "
                        "--no-search or --plan, which do not search")
    p.add_argument("--total-tolerance", type=float, default=None, metavar="PP",
                   help="rank search: all cuts together may cost at most PP percentage points of validation "
                        "accuracy, else every layer backs off one candidate at a time (default: --tolerance "
                        "times the number of searched layers)")
    p.add_argument("--no-search", action="store_true", help="no rank search: cut every layer at --energy")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-params", type=float, default=None, metavar="R",
                        help="size the whole model to R (a fraction, e.g. 0.5) of the dense parameters: ranks go "
                             "where they cost the least output energy per parameter saved (from the "
                             "eigendecompositions), refined on the validation split (replaces the rank search). A "
                             "target the architecture cannot reach (embeddings, norms) is refused before the "
                             "statistics pass, with the smallest reachable one")
    budget.add_argument("--target-flops", type=float, default=None, metavar="R",
                        help="as --target-params, for FLOPs per example (FlopCounterMode's, attention counted)")
    p.add_argument("--no-refine", action="store_true",
                   help="with a target: allocate by output energy alone, no validation refinement")
    p.add_argument("--finetune-epochs", type=int, default=20,
                   help="epochs of fine-tuning the factored model on the train split (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"fine-tuning learning rate (default: {FINETUNE_DEFAULTS['lr']:g} on labels, {DISTILL_LR:g} "
                        "when distilling: higher rates undid the pretrained models measured)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"fine-tuning AdamW weight decay (default: {FINETUNE_DEFAULTS['weight_decay']:g})")
    p.add_argument("--finetune-batch-size", type=positive_int, default=None,
                   help=f"fine-tuning batch size (default: {FINETUNE_DEFAULTS['finetune_batch_size']})")
    p.add_argument("--finetune-dense", action="store_true",
                   help="also fine-tune a copy of the dense model with the same recipe and report it: the "
                        "like-for-like control (the compressed model's fine-tuning is otherwise extra training "
                        "the dense model never got)")
    p.add_argument("--distill", choices=DISTILL, default="auto",
                   help="what fine-tuning minimises: off (cross-entropy on the labels), logits (distillation from "
                        "the dense model: KL divergence of the class distributions at --distill-temperature; labels "
                        "are not read, so unlabelled images work), embedding (distillation: 1 - cosine of the output "
                        "embedding, for encoders without a head), hidden (embedding plus the relative squared "
                        "error of every layer's hidden states, Hugging Face models); auto (default): off where the "
                        "model has a classification head and the data labels, else logits where it has a head, else "
                        "embedding")
    p.add_argument("--distill-temperature", type=float, default=None, metavar="T",
                   help=f"with distillation on logits: the softmax temperature (default: {DEFAULT_TEMPERATURE:g}; "
                        "T > 1 softens both distributions, the loss is scaled by T^2)")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="factor to this plan.json (from an earlier compress) instead of planning, by the method it "
                        "was made with: re-runs only the factors and fine-tuning; with --stats FILE no statistics "
                        "pass either")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="what the rank search and the summary score (default: accuracy where the model has a "
                        "classification head and the data labels, else cosine): agreement is the fraction of "
                        "examples whose top-1 class is the dense model's (no labels needed); cosine is the mean "
                        "cosine similarity of the output embedding (last_hidden_state averaged over the attention "
                        "mask, else pooler_output, else the logits) to the dense model's on the same split; "
                        "--tolerance PP then allows a drop of PP/100 in either")
    p.add_argument("--method", choices=("optimal", "data", "svd"), default=None,
                   help=f"{DEFAULT_METHOD} (default): the rank-r map closest to W on the data (U_r U_r^T W, U_r the "
                        "top eigenvectors of C_out); data: the paper's projection on the data subspaces (P_out W "
                        "P_in); svd: truncated SVD of W at the same ranks (the baseline). At equal ranks optimal was "
                        "as good or better on every model measured (docs/results.md, 'Factoring methods'). With "
                        "--plan: the plan's method (another --method is refused)")
    p.add_argument("--error-aware", action="store_true",
                   help="each layer's statistics on the inputs the already-factored blocks before it produce "
                        "(block by block, the earlier blocks factored at --plan's ranks; with a target at the "
                        "budget allocated on a plain pass first; else at --energy), for --method optimal and data; "
                        "costs one pass over the training split per block instead of one (and one more with a "
                        "target). Off by default: it lost to the plain pass on EfficientNet-Lite0 and MiniLM "
                        "(docs/results.md). Refused with --stats, --resume, --checkpoint-every, --max-batches and "
                        "--method svd")
    p.add_argument("--target-device", choices=("cpu", "cuda"), default=None,
                   help="keep a layer dense where factoring is not faster on this device, and round ranks up "
                        "to tile multiples where that costs no time (measured; timings cached per device)")
    p.add_argument("--engines", type=engine_list, default=["eager", "compile", "fastest"],
                   help="where the summary times dense and compressed at batch 32 on the CPU, as `utilrank bench` "
                        f"does: comma-separated {','.join(SUMMARY_ENGINES)} (default: eager,compile,fastest; the "
                        "onnxruntime engines need pip install -e '.[deploy]'). fastest: the CPU mode (engine and "
                        "dtype: eager fp32/bf16/int8, onnxruntime fp32/int8) in which the compressed model ran "
                        "fastest here, named in a note, among those whose outputs agree with its eager fp32 ones "
                        "(logit cosine >= 0.99), or a compile engine timed before it where that was faster. The "
                        "table shows each, and a speedup only where the p20-p80 ranges do not overlap")
    p.add_argument("--target-batch", type=positive_int, default=None,
                   help=f"with --target-device: the batch size to be fast at (default: {TARGET_BATCH})")
    p.set_defaults(func=run)
