"""``compress_model``: the whole pipeline in one call, statistics -> subspaces -> report -> plan -> factors
-> fine-tuning, each stage a function of the previous stage's artefact (and each artefact may be passed
in to start later: ``statistics=``, ``subspaces=``, ``plan=``).

    from utilrank_kernels import CompressConfig, compress_model
    result = compress_model(model, data, CompressConfig(tolerance=0.5))
    result.save("out/", config)                # model.safetensors, plan.json, config.json

``utilrank compress``, ``utilrank bench`` and ``utilrank soup`` all run through it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._distributed import ShardedMetric, process, shard
from .._progress import ticking
from ..analysis import Report, Statistics, Subspaces, build_report, collect_stats, compute_subspaces
from ..layers import FilterFn, find_layers, name_filter
from ..measure import count_params
from ..metrics import TopOneAgreement, accuracy, finetune_loss
from ..train import TrainRecipe
from .budget import budget_plan, check_reachable, plan_fraction, uniform_plan
from .factor import factor_model
from .io import save_compressed
from .latency import TILE_MULTIPLES, latency_aware
from .plan import METHODS, Plan
from .search import plan_ranks
from .sequential import RankRule, collect_stats_sequential, energy_rule, plan_rule

logger = logging.getLogger(__name__)
Metric = Callable[[nn.Module, Dataset], float]


@dataclass(frozen=True)
class CompressConfig:
    """What ``compress_model`` does; the defaults are ``utilrank compress``'s.

    - ``method``: ``"optimal"`` (the output-optimal ``U_r U_r^T W``, the default: as good or better than the
      paper's projection at equal ranks on every model measured), ``"data"`` (the paper's ``P_out W P_in``)
      or ``"svd"`` (weights only).
    - ranks: ``tolerance`` (percentage points of validation accuracy per layer, with ``total_tolerance``
      for all cuts together) runs the paper's search; ``tolerance=None`` cuts every layer at ``energy``;
      ``target_params`` / ``target_flops`` size the whole model to that fraction of its dense parameters or
      FLOPs (rank where it costs the least output energy, refined on validation unless ``refine=False``);
      ``param_fraction`` keeps that fraction of every layer's weights (no data needed with ``"svd"``).
    - ``include`` / ``exclude`` (globs on layer names) or ``filter_fn(module, name)``: which layers.
    - ``finetune``: the recipe for the factored model (``epochs=0``: none); its ``loss``: ``labels``
      (cross-entropy), ``logits`` / ``embedding`` (distillation from the dense model, no labels read) or ``auto``
      (labels where the model has a head and the data labels, else distillation: ``metrics.finetune_loss``).
      ``finetune_dense`` fine-tunes a copy of the dense model with the same recipe, the like-for-like control (on
      labels only: distilled from itself, the dense model would not change).
    - ``target_device`` / ``target_batch``: the latency-aware pass (layers stay dense where factoring is
      not faster there; ranks rounded up to tile multiples where that costs nothing).
    - ``keep_ranks``: factors of a rank-deficient layer are zero-padded to the planned rank instead of
      shrinking it (compressed models that must share one architecture, e.g. soup ingredients).
    - ``error_aware``: each layer's statistics on the inputs the already-factored blocks before it produce
      (``sequential.collect_stats_sequential``; the pass factors each block at the given plan's ranks, for a
      target at the budget a plain pass allocates, else at ``energy``), for ``optimal`` and ``data``. Off by
      default: it lost to the plain pass on EfficientNet-Lite0 and all-MiniLM-L6-v2 at 0.7 and 0.5 of the
      parameters (docs/results.md). Costs one forward pass over the training split per block instead of one.
    """

    method: str = "optimal"
    energy: float = 0.99
    tolerance: float | None = 0.5
    total_tolerance: float | None = None
    target_params: float | None = None
    target_flops: float | None = None
    refine: bool = True
    param_fraction: float | None = None
    rank_multiple: int = 16
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    filter_fn: FilterFn | None = None
    finetune: TrainRecipe = field(default_factory=TrainRecipe)
    finetune_dense: bool = False
    target_device: str | None = None
    target_batch: int = 32
    keep_ranks: bool = False
    stats_batch_size: int = 128
    error_aware: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy {self.energy}: must be in (0, 1]")
        if self.tolerance is not None and self.tolerance < 0:
            raise ValueError(f"tolerance {self.tolerance}: must be >= 0 percentage points")
        if self.total_tolerance is not None and self.total_tolerance < 0:
            raise ValueError(f"total tolerance {self.total_tolerance}: must be >= 0 percentage points")
        if self.param_fraction is not None and not 0 < self.param_fraction < 1:
            raise ValueError(f"parameter fraction {self.param_fraction}: must be in (0, 1)")
        for name in ("target_params", "target_flops"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name.replace('_', '-')} {value}: must be a fraction of the dense model in (0, 1)")
        if sum(v is not None for v in (self.target_params, self.target_flops, self.param_fraction)) > 1:
            raise ValueError("give one of target_params, target_flops and param_fraction")
        if self.error_aware and self.method == "svd":
            raise ValueError("error-aware statistics with method 'svd': svd factors the weights alone and reads no "
                             "statistics; use method optimal or data, or drop error_aware")
        if self.target_batch < 1 or self.stats_batch_size < 1 or self.rank_multiple < 1:
            raise ValueError("target_batch, stats_batch_size and rank_multiple must be >= 1")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def layer_filter(self) -> FilterFn | None:
        if self.filter_fn is None and not (self.include or self.exclude):
            return None
        by_name = name_filter(self.include, self.exclude)
        if self.filter_fn is None:
            return by_name
        return lambda m, name: by_name(m, name) and self.filter_fn(m, name)

    @property
    def needs_data(self) -> bool:
        """Whether planning needs statistics: every plan but a uniform fraction comes from the data (``svd`` too:
        its ranks are the data's, only its factors ignore it)."""
        return self.method != "svd" or self.param_fraction is None

    @property
    def budget(self) -> tuple[str, float] | None:
        """``("params" | "flops", fraction)`` for a whole-model target, else None."""
        if self.target_params is not None:
            return "params", self.target_params
        if self.target_flops is not None:
            return "flops", self.target_flops
        return None

    @property
    def searches(self) -> bool:
        return self.param_fraction is None and self.budget is None and self.tolerance is not None


@dataclass
class CompressedModel:
    """What ``compress_model`` made: the factored ``model`` (as trained, ``LowRankLinear`` /
    ``LowRankConv2d`` in place of the planned layers), the ``plan`` it holds, and the artefacts of every
    stage it ran (``None`` where a stage was skipped). ``scores``: ``{"dense" | "projected" | "compressed" |
    "dense_finetuned": {"val": x, "test": y}}`` (the metric, accuracy by default, in [0, 1])."""

    model: nn.Module
    plan: Plan
    report: Report | None = None
    statistics: Statistics | None = None
    subspaces: Subspaces | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    dense_finetuned: nn.Module | None = None
    warnings: list[str] = field(default_factory=list)  # what makes the result less meaningful than it looks
    finetune_loss: str = ""  # the loss fine-tuning ran (train.LOSSES; "" where none ran)

    def save(self, out_dir: str | Path, config: Mapping) -> None:
        """``model.safetensors``, ``plan.json`` and ``config.json`` (the architecture, see ``load_compressed``)."""
        save_compressed(self.model, self.plan, config, out_dir)


def _split(data, name: str) -> Dataset | None:
    return getattr(data, name, None) if data is not None else None


@dataclass
class _Job:
    """One ``compress_model`` call: what every stage reads, and the scores the stages add."""

    model: nn.Module
    data: object
    config: CompressConfig
    device: torch.device
    metric: Metric
    metric_is_accuracy: bool
    arch: str
    score: bool
    progress: bool
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def train(self) -> Dataset | None:
        return _split(self.data, "train")

    @property
    def val(self) -> Dataset | None:
        return _split(self.data, "val")

    @property
    def test(self) -> Dataset | None:
        return _split(self.data, "test")

    def scored(self, key: str, model: nn.Module, *, needed: bool = False) -> None:
        """``scores[key]``: the metric of ``model`` on val and test (with ``score`` off, only where ``needed``). With
        ``progress``, a ticking line while each split is scored: a text encoder's cosine takes tens of seconds."""
        if not (self.score or needed):
            return
        what = "accuracy" if self.metric_is_accuracy else "score"
        self.scores[key] = {}
        for split, ds in (("val", self.val), ("test", self.test)):
            if ds is not None:
                with ticking(f"scoring the {key} model: {what} on {split} ({len(ds):,} examples)",
                             disable=not self.progress):
                    self.scores[key][split] = self.metric(model, ds)


def compress_model(
    model: nn.Module,
    data=None,
    config: CompressConfig | None = None,
    *,
    statistics: Statistics | None = None,
    subspaces: Subspaces | None = None,
    plan: Plan | None = None,
    metric: Metric | None = None,
    arch: str | None = None,
    device: torch.device | str | None = None,
    score: bool = True,
    progress: bool = True,
) -> CompressedModel:
    """Compress ``model`` (not modified) on ``data`` (``utilrank_kernels.data.DataSplits`` or any object with
    ``train`` / ``val`` / ``test`` datasets yielding ``(input, label)``; ``val`` drives the rank search,
    ``test`` is only reported) as ``config`` says.

    Stages already done elsewhere are passed in: ``statistics`` (of ``model`` on its training data),
    ``subspaces`` (``compute_subspaces``'s), ``plan`` (then no planning: only factors, fine-tuning and
    scores; its ranks are factored by ``config.method``, and the log says so where the plan was made with
    another). Every problem ``check_config`` finds is raised first, before any compute. ``metric(model,
    dataset)`` replaces top-1 accuracy (higher is better, in [0, 1]). ``score``: evaluate dense, projected and
    compressed on val/test (off: only what the search needs)."""
    config = config or CompressConfig()
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    is_accuracy, metric = metric is None, metric or accuracy(device)
    rank, world = process()
    if world > 1:  # under torchrun every process scores its shard of a split; each score is the whole split's
        metric = ShardedMetric(metric, counts=is_accuracy or isinstance(metric, TopOneAgreement))
    job = _Job(model.eval(), data, config, device, metric, is_accuracy,
               arch or (plan.arch if plan is not None else type(model).__name__), score, progress and rank == 0)
    searches = plan is None and config.searches
    check_config(model, data, config, plan=plan, statistics=statistics, subspaces=subspaces)
    if config.finetune.epochs:  # "auto" becomes the loss that runs
        config = job.config = replace(config, finetune=replace(
            config.finetune, loss=finetune_loss(config.finetune.loss, model, data)))
    if plan is not None and plan.method != config.method:  # the same ranks, factored by another method
        logger.info(f"plan: made with method {plan.method!r}, factored by config.method {config.method!r}")
        plan = replace(plan, method=config.method)
    statistics, subspaces = _statistics_and_subspaces(job, statistics, subspaces, plan)
    report = build_report(job.model, statistics, subspaces, config.energy) if subspaces is not None else None
    warnings: list[str] = []
    if plan is None:
        plan, warnings = _plan(job, report, subspaces, searches)
    else:
        job.scored("dense", job.model)
    compressed, plan, dense_finetuned = _factor_and_finetune(job, plan, subspaces)
    if report is not None:
        report = report.with_saved_ranks(plan.ranks, {"dense": count_params(job.model),
                                                      "compressed": count_params(compressed)})
    return CompressedModel(compressed.eval(), plan, report, statistics, subspaces, job.scores, dense_finetuned,
                           warnings, config.finetune.loss if config.finetune.epochs else "")


def check_config(model: nn.Module, data, config: CompressConfig, *, plan: Plan | None = None,
                 statistics: Statistics | None = None, subspaces: Subspaces | None = None) -> None:
    """Every problem ``compress_model`` would meet that shows without compute, as one ``ValueError``: a split a
    stage needs and the data lacks, a plan given with a target that would re-size it, ``include`` / ``exclude``
    patterns that match no layer, FLOPs or latency on inputs that are not tensors, and a target that the
    architecture cannot reach (``budget.check_reachable``: every factorable layer at rank 1 is not small enough).
    ``utilrank compress`` calls it before its statistics pass; ``compress_model`` calls it first."""
    searches = plan is None and config.searches
    if searches and _split(data, "val") is None:
        raise ValueError("the rank search (tolerance) needs a validation split: data.val")
    if config.finetune.epochs:
        _check_finetune(model, data, config)
    needs_statistics = config.needs_data if plan is None else config.method != "svd"
    if needs_statistics and subspaces is None and statistics is None and _split(data, "train") is None:
        raise ValueError(f"method {config.method!r} needs statistics: pass data with a train split, statistics= "
                         "or subspaces=")
    if plan is not None and (config.budget is not None or config.param_fraction is not None):
        what = f"target_{config.budget[0]}" if config.budget else "param_fraction"
        raise ValueError(f"a plan fixes every rank: give {what} or a plan, not both")
    if config.error_aware and (statistics is not None or subspaces is not None):
        raise ValueError("error-aware statistics are gathered with the model factored block by block: give "
                         "statistics= / subspaces= or error_aware, not both")
    check_patterns(model, config.include, config.exclude)
    if plan is not None:
        return
    measure, target = config.budget or (None, None)
    example = _example_input(data) if config.target_device or measure == "flops" else None  # tensors, or why not
    if measure is not None:
        check_reachable(model, target, measure, example, config.layer_filter)


def _check_finetune(model: nn.Module, data, config: CompressConfig) -> None:
    """Fine-tuning has a train split and a loss that the model and data allow; the dense control trains on labels."""
    if _split(data, "train") is None:
        raise ValueError("fine-tuning needs a training split: data.train")
    loss = finetune_loss(config.finetune.loss, model, data)
    if config.finetune_dense and loss != "labels":
        raise ValueError(f"--finetune-dense (the dense control) with distillation ({loss}): the dense model distilled "
                         "from itself would not change; fine-tune on labels, or drop the control")


def check_patterns(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming an ``include`` / ``exclude`` glob that matches none of ``model``'s Linear /
    Conv2d layers (a typo would otherwise select nothing, or everything, without a word), or patterns that
    together leave no layer."""
    layers, skipped = find_layers(model)
    names = [*layers, *skipped]
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(name_filter((pattern,))(None, n) for n in names):
                examples = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise ValueError(f"--{option} {pattern!r}: matches no Linear or Conv2d layer of the model (names are "
                                 f"like {examples}; globs match whole names: '*.fc1', 'blocks.0.*')")
    if (include or exclude) and not any(name_filter(include, exclude)(layers[n], n) for n in layers):
        raise ValueError(f"--include {' '.join(include) or '-'} / --exclude {' '.join(exclude) or '-'}: together "
                         "they leave no layer")


def _statistics_and_subspaces(job: _Job, statistics: Statistics | None, subspaces: Subspaces | None,
                              plan: Plan | None) -> tuple[Statistics | None, Subspaces | None]:
    """The stages' statistics and subspaces: those given, else collected (the planned layers only when the
    plan is given); none for a method that needs no data."""
    config = job.config
    if subspaces is not None:
        subspaces.check_model(job.model)
        return statistics, subspaces
    needed = config.needs_data if plan is None else config.method != "svd"
    if statistics is None and not needed:  # svd factors of given ranks: the weights are enough
        return None, None
    if statistics is None:
        only = None if plan is None else set(plan.layers)
        layer_filter = config.layer_filter if only is None else (lambda m, name: name in only)
        # under torchrun each process passes its shard; collect_stats all-reduces the sums
        loader = DataLoader(shard(job.train, *process()), batch_size=config.stats_batch_size, shuffle=False)
        meta = {"model": job.arch, "dataset": getattr(job.data, "name", "")}
        if config.error_aware:
            rule, ranks = _error_aware_ranks(job, loader, layer_filter, meta, plan)
            statistics = collect_stats_sequential(job.model, loader, rule, method=config.method,
                                                  filter_fn=layer_filter, device=job.device, progress=job.progress,
                                                  meta={**meta, "error_aware_ranks": ranks})
        else:
            statistics = collect_stats(job.model, loader, filter_fn=layer_filter, device=job.device,
                                       progress=job.progress, meta=meta)
    return statistics, compute_subspaces(job.model, statistics, progress=job.progress)


def _error_aware_ranks(job: _Job, loader: DataLoader, layer_filter, meta: dict,
                       plan: Plan | None) -> tuple[RankRule, str]:
    """The ranks the block-by-block pass factors the earlier blocks at, and what they are: the given plan's; for a
    target, the budget allocated (without refinement) on plain statistics, which costs one more pass, so that the
    pass sees the errors of the model it is sizing; for a uniform fraction, that fraction; else the energy cut."""
    config = job.config
    if plan is not None:
        return plan_rule(plan), "the given plan"
    if config.param_fraction is not None:
        return plan_rule(uniform_plan(job.model, config.param_fraction, multiple=config.rank_multiple,
                                      method=config.method, filter_fn=config.layer_filter)), "the uniform fraction"
    if config.budget is None:
        return energy_rule(config.energy), f"energy {config.energy}"
    measure, target = config.budget
    logger.info(f"error-aware statistics: a plain pass first, to size the {measure} budget the blocks are factored at")
    plain = collect_stats(job.model, loader, filter_fn=layer_filter, device=job.device, progress=job.progress,
                          meta=meta)
    first = budget_plan(job.model, compute_subspaces(job.model, plain, progress=job.progress), target,
                        measure=measure, example=_example_input(job.data) if measure == "flops" else None,
                        arch=job.arch, method=config.method, filter_fn=config.layer_filter, progress=job.progress)
    return plan_rule(first), f"target_{measure} {target:g} allocated on plain statistics"


def _plan(job: _Job, report: Report | None, subspaces: Subspaces | None, searches: bool) -> tuple[Plan, list[str]]:
    """The plan ``job.config`` asks for (a uniform fraction, a whole-model budget, or energy / the rank
    search), then the latency-aware pass; and the warnings of the search."""
    config = job.config
    job.scored("dense", job.model, needed=searches)  # the search's baseline
    warnings: list[str] = []
    if searches and job.metric_is_accuracy:  # the rules speak of examples and classes
        warnings = _search_warnings(job.scores["dense"]["val"], len(job.val), config.tolerance,
                                    getattr(job.data, "num_classes", None))
        for w in warnings:
            logger.warning(f"rank search: warning: {w}")
    if config.param_fraction is not None:
        plan = uniform_plan(job.model, config.param_fraction, multiple=config.rank_multiple, arch=job.arch,
                            method=config.method, filter_fn=config.layer_filter)
    elif config.budget is not None:
        plan = _budget(job, subspaces)
    else:
        if report is None:
            raise ValueError(f"method {config.method!r} with an energy or tolerance cut needs statistics")
        plan = plan_ranks(job.model, report, subspaces, arch=job.arch, method=config.method, energy=config.energy,
                          tolerance=config.tolerance, total_tolerance=config.total_tolerance,
                          evaluate=(lambda m: job.metric(m, job.val)) if searches else None,
                          baseline=job.scores.get("dense", {}).get("val"), filter_fn=config.layer_filter,
                          progress=job.progress)
    if config.target_device:
        plan = latency_aware(job.model, plan, _example_input(job.data), config.target_device, config.target_batch,
                             progress=job.progress)
        if config.budget is not None:  # rounding and dense layers may have moved it off the target
            plan = _budget(job, subspaces, after_latency=plan)
    return plan, warnings


def _factor_and_finetune(job: _Job, plan: Plan,
                         subspaces: Subspaces | None) -> tuple[nn.Module, Plan, nn.Module | None]:
    """The factored model, the plan it holds, and the fine-tuned dense control (None unless asked for), each
    scored."""
    config = job.config
    compressed, plan = factor_model(job.model, plan, subspaces, keep_ranks=config.keep_ranks)
    job.scored("projected", compressed)
    if config.finetune.epochs:
        desc = f"fine-tune ({'distil ' if config.finetune.distills else ''}{config.finetune.loss})"
        config.finetune.run(compressed, job.train, device=job.device, desc=desc, teacher=job.model)
        job.scored("compressed", compressed)
    elif "projected" in job.scores:
        job.scores["compressed"] = dict(job.scores["projected"])
    dense_finetuned = None
    if config.finetune_dense and config.finetune.epochs:
        dense_finetuned = config.finetune.run(copy.deepcopy(job.model), job.train, device=job.device,
                                              desc="fine-tune dense (control)")
        job.scored("dense_finetuned", dense_finetuned)
    return compressed, plan, dense_finetuned


def _search_warnings(dense_val: float, n_val: int, tolerance: float, num_classes: int | None) -> list[str]:
    """Why a search's accuracy differences may be noise: a validation split too small to resolve the
    tolerance, or a dense model near chance (every cut then looks free)."""
    warnings = []
    if n_val and 100.0 / n_val > tolerance:
        warnings.append(f"the validation split has {n_val} examples: one example is {100.0 / n_val:.2f} pp, more "
                        f"than the {tolerance} pp tolerance, so the search cannot tell a cut from noise")
    if num_classes and dense_val < 1.5 / num_classes:
        warnings.append(f"the dense model is near chance on validation ({dense_val:.2%}, chance {1 / num_classes:.2%}"
                        "): cuts cannot lower its accuracy measurably; train or fine-tune it first")
    return warnings


def _budget(job: _Job, subspaces: Subspaces | None, after_latency: Plan | None = None) -> Plan:
    """The whole-model budget's plan; after a latency-aware pass, re-allocated with the layers that pass kept
    dense fixed and ranks in steps of the device's tile multiple, so that the target still holds."""
    config, model = job.config, job.model
    measure, target = config.budget
    example = _example_input(job.data) if measure == "flops" else None
    if after_latency is not None:
        if plan_fraction(model, after_latency, measure, example) <= target * 1.01:
            return after_latency
        keep = {n: r for n, r in after_latency.dense.items() if r.startswith("latency:")}
        multiple = TILE_MULTIPLES[torch.device(config.target_device).type][0]
    else:
        keep, multiple = {}, 1
    evaluate = (lambda m: job.metric(m, job.val)) if config.refine and job.val is not None else None
    plan = budget_plan(model, subspaces, target, measure=measure, example=example, arch=job.arch,
                       method=config.method, filter_fn=config.layer_filter, multiple=multiple, keep_dense=keep,
                       evaluate=evaluate, progress=job.progress)
    if after_latency is not None:  # keep the timings the latency pass measured for the layers still factored
        plan = plan.replace_layers({n: replace(e, latency=after_latency.layers[n].latency)
                                    if n in after_latency.layers else e for n, e in plan.layers.items()},
                                   target=after_latency.meta.get("target"))
    logger.info(f"budget: {measure} at {plan_fraction(model, plan, measure, example):.4f} of dense "
                f"(target {target:g}), {len(plan.layers)} layers factored")
    return plan


def _example_input(data) -> torch.Tensor:
    """One input (batch of 1) from the data's test split (else val, else train), for the stages that time or
    count a layer at its input shape (a FLOPs budget, the latency-aware pass)."""
    for split in ("test", "val", "train"):
        ds = _split(data, split)
        if ds is not None and len(ds):
            x = ds[0][0] if isinstance(ds[0], (tuple, list)) else ds[0]
            if not isinstance(x, torch.Tensor):
                raise ValueError("--target-flops and --target-device need tensor inputs; this data yields "
                                 f"{type(x).__name__} examples (text): use --target-params, or no latency pass")
            return x[None]
    raise ValueError("--target-flops and --target-device need an example input: data with a non-empty split")
