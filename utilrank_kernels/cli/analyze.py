"""``utilrank analyze``: per-layer utilized rank and MLU from one pass over the data."""

from __future__ import annotations

import time

from ._common import (
    add_common_options,
    collect_statistics,
    commit,
    init_distributed,
    load_model_and_data,
    output_folder,
    resolve_device,
    statistics_bytes,
)


def run(args) -> int:
    from ..analysis import analyze, format_table, write_report

    folder = output_folder(args, "analyze")
    rank, world = init_distributed()
    device = resolve_device(args.device)
    started = time.perf_counter()
    model, _, data = load_model_and_data(args, device)
    folder.require_space(2 * statistics_bytes(model))  # the statistics and their checkpoint
    stats = collect_statistics(args, model, data, device, folder, rank, world)
    if rank != 0:
        return 0
    report, _ = analyze(model, stats, args.energy, progress=True)
    write_report(report, folder.partial)
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
