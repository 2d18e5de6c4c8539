"""``utilrank analyze``: per-layer utilized rank and MLU from one pass over the data."""

from __future__ import annotations

import time

from ..analysis import build_report, compute_subspaces, format_table, statistics_bytes
from ..plots import plot_utilization
from ._model import model_and_data
from ._options import add_common_options
from ._output import commit, output_folder
from ._runtime import init_distributed, resolve_device
from ._statistics import collect_statistics


def run(args) -> int:
    folder = output_folder(args, "analyze")
    rank, world = init_distributed()
    device = resolve_device(args.device)
    started = time.perf_counter()
    loaded = model_and_data(args, device)
    model, data = loaded.model, loaded.data
    folder.require_space(2 * statistics_bytes(model))  # the statistics and their checkpoint
    stats = collect_statistics(args, model, data, device, folder, rank, world)
    if rank != 0:
        return 0
    report = build_report(model, stats, compute_subspaces(model, stats, progress=True), args.energy)
    report.save(folder.path("report.json"))
    plot_utilization(report.to_dict(), folder.path("utilization.png"))
    print(format_table(report))
    out = commit(folder)
    print(f"wrote {out}/ (report.json, utilization.png, stats.safetensors) in {time.perf_counter() - started:.1f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="per-layer utilized rank and MLU from one pass over the data",
                       description="Per-layer utilized rank and Mean Layer Utilization from one streaming pass over "
                                   "the data: report.json, utilization.png and stats.safetensors (the statistics, "
                                   "reusable by compress --stats and spectrum --stats).")
    add_common_options(p, "analyze")
    p.set_defaults(func=run)
