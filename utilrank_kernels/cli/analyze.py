"""``utilrank analyze``: per-layer utilized rank and MLU from one pass over the data, or from a saved statistics file
(``--stats``: a new ``--energy`` or layer selection without a pass)."""

from __future__ import annotations

import time

from ..analysis import build_report, compute_subspaces, format_table, statistics_bytes
from ..analysis.report import select_layers
from ..compress.pipeline import check_patterns
from ..layers import name_filter
from ..plots import plot_utilization
from ._model import model_and_data
from ._options import UsageError, add_common_options, add_layer_options, files_written
from ._output import commit, output_folder
from ._runtime import init_distributed, resolve_device
from ._statistics import check_statistics, collect_statistics, read_statistics


def check_options(args) -> None:
    """Options ``--stats`` makes meaningless (no statistics pass runs), refused before any file is read."""
    if not args.stats:
        return
    for given, option in ((args.resume, "--resume"), (args.checkpoint_every, "--checkpoint-every"),
                          (args.max_batches, "--max-batches")):
        if given:
            raise UsageError(f"{option} with --stats {args.stats}: no statistics pass runs; drop {option}")


def run(args) -> int:
    started = time.perf_counter()
    check_options(args)
    device = resolve_device(args.device)
    stats = read_statistics(args, device)
    folder = output_folder(args, "analyze")
    rank, world = init_distributed()
    loaded = model_and_data(args, device)
    model, data = loaded.model, loaded.data
    check_statistics(args, model, data, stats)
    try:
        check_patterns(model, tuple(args.include), tuple(args.exclude))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if stats is None:  # every layer: the saved file serves any later --include / --exclude
        folder.require_space(2 * statistics_bytes(model))  # the statistics and their checkpoint
        stats = collect_statistics(args, model, data, device, folder, rank, world)
    if rank != 0:
        return 0
    if args.include or args.exclude:
        keep = name_filter(args.include, args.exclude)
        stats = select_layers(stats, lambda name: keep(None, name))
    report = build_report(model, stats, compute_subspaces(model, stats, progress=True), args.energy)
    report.save(folder.path("report.json"))
    plot_utilization(report.to_dict(), folder.path("utilization.png"))
    print(format_table(report))
    out = commit(folder)
    print(f"wrote {out}/ ({files_written(out)}) in {time.perf_counter() - started:.1f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="per-layer utilized rank and MLU from one pass over the data",
                       description="Per-layer utilized rank and Mean Layer Utilization from one streaming pass over "
                                   "the data: report.json, utilization.png and stats.safetensors (the statistics of "
                                   "every layer, reusable by analyze --stats, compress --stats and spectrum --stats). "
                                   "With --stats FILE no pass runs: a report at a new --energy or of other layers.")
    add_common_options(p, "analyze")
    add_layer_options(p, "analyze")
    p.set_defaults(func=run)
