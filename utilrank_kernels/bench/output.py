"""``utilrank bench``'s rows: the terminal line, JSON (the contract), CSV and the speedup plot."""

from __future__ import annotations

import csv
from pathlib import Path

from .._files import atomic_path, write_json
from ..nn.tune import summary
from ..plots import plot_speedup

BENCH_FORMAT = "utilrank.bench/1"


def format_row(row: dict) -> str:
    where = (f"{row['variant']:<10} {row.get('engine', 'eager'):<11} {row['backend']:<6} {row['dtype']:<4} "
             f"bs {row['batch_size']:<4}")
    if "error" in row:
        return f"{where} FAILED: {row['error']}"
    ratios = ""
    if row["variant"] == "compressed":
        ratios = (f"  speedup {row['speedup']:.2f}x of {row['theoretical_speedup']:.2f}x "
                  f"(realized {row['realized_fraction']:.2f})")
    if row.get("layer_backends"):
        ratios += f"  layers: {summary(row['layer_backends'])}"
    return (f"{where} {row['infer_step_time']:10.3f} ms [{row['step_time_p20']:.3f}, {row['step_time_p80']:.3f}] "
            f"{row['infer_samples_per_sec']:10.1f}/s  {row['param_count']:.4g}M params "
            f"{row['infer_gmacs']:.4g} GMACs{ratios}")


def write_rows(rows: list[dict], out: str | Path, *, csv_too: bool = False, plot: bool = True) -> list[Path]:
    """``out`` (the contract's JSON), ``out.csv`` on request and ``out.png``; each written atomically."""
    out = Path(out)
    written = [out]
    write_json(out, {"format": BENCH_FORMAT, "rows": rows})
    if csv_too:
        path = out.with_suffix(".csv")
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)
    if plot:
        path = out.with_suffix(".png")
        engines = {r.get("engine", "eager") for r in rows}
        if len(engines) > 1:  # one series per engine and backend: the plot's series are keyed by backend
            rows = [{**r, "backend": f"{r.get('engine', 'eager')} {r['backend']}"} for r in rows]
        plot_speedup(rows, path)
        written.append(path)
    return written


