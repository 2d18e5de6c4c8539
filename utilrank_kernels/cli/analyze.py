"""``utilrank analyze``: per-layer utilized rank and MLU from one pass over the data."""

from __future__ import annotations

import time
from pathlib import Path

from ._common import add_common_options, collect_statistics, init_distributed, load_model_and_data, resolve_device


def run(args) -> int:
    from ..analysis import analyze, format_table, write_report

    rank, world = init_distributed()
    device = resolve_device(args.device)
    out = Path(args.out or f"utilrank-out/analyze-{args.model}")
    started = time.perf_counter()
    model, _, data = load_model_and_data(args, device)
    stats = collect_statistics(args, model, data, device, out, rank, world)
    if rank != 0:
        return 0
    report, _ = analyze(model, stats, args.energy, progress=True)
    write_report(report, out)
    print(format_table(report))
    print(f"wrote {out}/report.json, utilization.png, stats.safetensors in {time.perf_counter() - started:.1f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="per-layer utilized rank and MLU from one pass over the data")
    add_common_options(p, "analyze")
    p.set_defaults(func=run)
