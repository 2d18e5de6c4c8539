"""The README's tables of measured results, from the files in ``benchmarks/results/``.

    python benchmarks/run.py readme-table [RESULTS_DIR] > table.md

One line per compressed row of the ``utilrank bench`` files (``utilrank.bench/1``), beside the dense row
of the same run and engine: step times, the measured speedup, the FLOP ratio and the fraction of it
realized, the engine and the machine it was measured on. Rows of a configuration that failed (``error``)
are left out of the table and listed on stderr. Then one line per ``stats-pass`` row
(``utilrank.bench-stats/1``): the statistics pass against a plain forward.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"  # benchmarks/results (this reader needs no torch)
HEADER = ("| model | cut | machine | dtype | batch | engine | backend | dense ms | compressed ms | speedup "
          "| FLOP ratio | realized | params (M) |")
PROTOCOL = (10, 40)  # utilrank bench's default warm-up and timed steps


def _cut(row: dict) -> str:
    if "param_ratio" in row:
        return f"{row['param_ratio']:.0%} params (random)"
    if "latency_target" in row:
        return f"utilrank compress, latency-aware ({row['latency_target']})"
    if "compressed" in row:
        return "utilrank compress"
    if "energy" in row:
        return f"energy {row['energy']}"
    return "-"


def _engine(row: dict) -> str:
    """``eager`` | ``compile`` | ``onnxruntime 1.32.0 CPU``: rows from before ``--engine`` have ``compile``."""
    engine = row.get("engine") or ("compile" if row.get("compile") else "eager")
    if engine == "onnxruntime" and row.get("onnxruntime_provider"):
        provider = row["onnxruntime_provider"].removesuffix("ExecutionProvider")
        engine = f"onnxruntime {row.get('onnxruntime_version') or ''} {provider}".replace("  ", " ")
    steps = (row.get("warmup", PROTOCOL[0]), row.get("timed_steps", PROTOCOL[1]))
    return engine if steps == PROTOCOL else f"{engine} ({steps[1]} steps after {steps[0]})"


def _options(row: dict) -> str:
    flags = [name for name in ("cuda_graphs", "channels_last") if row.get(name)]
    if row.get("thp_mem_alloc"):
        flags.append("THP_MEM_ALLOC_ENABLE=1")
    if row.get("malloc_keep_freed"):
        flags.append("freed memory kept")
    return f" ({', '.join(flags)})" if flags else ""


def _ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _key(row: dict) -> tuple:
    engine = row.get("engine") or ("compile" if row.get("compile") else "eager")
    return (row["model"], row["device"], row["dtype"], row["batch_size"], engine, row.get("cuda_graphs"),
            row.get("channels_last"), row.get("thp_mem_alloc"), row.get("date"), row.get("compressed"),
            row.get("param_ratio"))


def _row_lists(files: list[Path], fmt: str) -> Iterator[list[dict]]:
    """The rows of each file in format ``fmt``; other and unreadable files are skipped."""
    for path in sorted(files):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == fmt:
            yield data["rows"]


def table_rows(files: list[Path]) -> list[str]:
    lines = []
    for rows in _row_lists(files, "utilrank.bench/1"):
        dense = {_key(r): r for r in rows if r["variant"] == "dense" and "error" not in r}
        for r in rows:
            if "error" in r:
                print(f"left out: {r['model']} {r['variant']} {_engine(r)} {r['backend']} batch {r['batch_size']}: "
                      f"{r['error']}", file=sys.stderr)
                continue
            d = dense.get(_key(r))
            if r["variant"] != "compressed" or d is None:
                continue
            lines.append(
                f"| {r['model']} | {_cut(r)} | {r['device']} | {r['dtype']} | {r['batch_size']} | {_engine(r)} "
                f"| {r['backend']}{_options(r)} | {_ms(d['infer_step_time'])} | {_ms(r['infer_step_time'])} "
                f"| {r['speedup']:.2f}x | {r['theoretical_speedup']:.2f}x | {r['realized_fraction']:.2f} "
                f"| {d['param_count']:.4g} -> {r['param_count']:.4g} |")
    return lines


STATS_HEADER = ("| model | machine | threads | updates | batch | batches | forward ms | statistics pass ms "
                "| ratio | per-round ratio p20-p80 | date |")


def stats_rows(files: list[Path]) -> list[str]:
    lines = []
    for rows in _row_lists(files, "utilrank.bench-stats/1"):
        for r in rows:
            rounds = r.get("round_ratio")
            spread = f"{rounds['p20']:.2f}-{rounds['p80']:.2f}" if rounds else "-"
            lines.append(
                f"| {r['model']} | {r['device']} | {r['threads']} | {'overlapped' if r.get('overlap') else 'inline'} "
                f"| {r['batch_size']} | {r['batches']} "
                f"| {_ms(1e3 * r['forward_s']['median'])} | {_ms(1e3 * r['stats_s']['median'])} "
                f"| {r['ratio']:.2f}x | {spread} | {r['date']} |")
    return lines


def _print_table(header: str, lines: list[str]) -> None:
    print(header)
    print("|" + "---|" * (header.count(" | ") + 1))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]) if argv else RESULTS
    lines = table_rows(list(root.glob("*.json")))
    if not lines:
        print(f"no utilrank.bench/1 results in {root}", file=sys.stderr)
        return 1
    _print_table(HEADER, lines)
    print("\nStep times are medians of 40 steps after 10 warm-up steps (where the engine column gives other "
          "counts, those), dense and compressed interleaved in one run and engine; realized = speedup / FLOP ratio "
          "(attention counted). onnxruntime rows time each model's ONNX export (`utilrank export`'s, checked "
          "against PyTorch). Generated by `python benchmarks/run.py readme-table`.")
    stats = stats_rows(list(root.glob("*.json")))
    if stats:
        print()
        _print_table(STATS_HEADER, stats)
        print("\nMedians of interleaved rounds (one forward, one statistics pass each) over the same batches; "
              "generated by `python benchmarks/run.py readme-table`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
