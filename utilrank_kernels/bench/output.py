"""``utilrank bench``'s rows: the terminal line, JSON (the contract), CSV and the speedup plot."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

from .._files import atomic_path, write_json
from ..nn.tune import summary
from ..plots import plot_speedup
from ..timing import Timing

BENCH_FORMAT = "utilrank.bench/1"


def format_row(row: dict) -> str:
    where = (f"{row['variant']:<10} {row.get('engine', 'eager'):<15} {row['backend']:<6} {row['dtype']:<4} "
             f"bs {row['batch_size']:<4}")
    if "error" in row:
        return f"{where} FAILED: {row['error']}"
    ratios = ""
    if row["variant"] == "compressed":
        ratios = f"  {speedup_words(row)}; FLOP ratio {row['theoretical_speedup']:.2f}x"
        if row.get("speedup_measurable", True):
            ratios += f" (realized {row['realized_fraction']:.2f})"
    if row.get("layer_backends"):
        ratios += f"  layers: {summary(row['layer_backends'])}"
    if "logit_cosine" in row:  # agreement with eager fp32 (the same model), and the weights' bytes
        ratios += f"  cos {row['logit_cosine']:.4f} vs fp32"
    if "bytes_on_disk" in row:
        ratios += f"  {row['bytes_on_disk'] / 2**20:.1f} MiB"
    if row.get("onnx_fusions"):
        ratios += "  fused: " + ", ".join(f"{op} {n}" for op, n in row["onnx_fusions"].items())
    return (f"{where} {row['infer_step_time']:10.3f} ms [{row['step_time_p20']:.3f}, {row['step_time_p80']:.3f}] "
            f"{row['infer_samples_per_sec']:10.1f}/s  {row['param_count']:.4g}M params "
            f"{row['infer_gmacs']:.4g} GMACs{ratios}")


def dense_timing(row: dict) -> Timing | None:
    """The dense timing a compressed row was compared with (None in rows written before it was recorded)."""
    if "dense_step_time_p20" not in row:
        return None
    return Timing(row["dense_step_time"], row["dense_step_time_p20"], row["dense_step_time_p80"])


def speedup_words(row: dict) -> str:
    """A compressed row's speedup as the measurement backs it (``Timing.compared_to``: a speedup only where the
    p20-p80 ranges of dense and compressed do not overlap), with the ratio of the medians where they do."""
    dense = dense_timing(row)
    if dense is None:
        return f"speedup {row['speedup']:.2f}x"
    words = Timing(row["infer_step_time"], row["step_time_p20"], row["step_time_p80"]).compared_to(dense)
    if words == "no measurable difference":
        words += f" (medians {row['speedup']:.2f}x, the p20-p80 ranges overlap)"
    return words


def check_out(out: str | Path, *, csv_too: bool = False, plot: bool = True) -> None:
    """Refuse an ``--out`` the rows could not be written to, before any timing: ``ValueError`` naming it. It must
    be a ``.json`` file name (the CSV and the plot go beside it under their own suffixes) in a folder this process
    can write, or can create (tested by creating and removing a file there)."""
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out {out}: give a .json file name (the plot and the CSV go beside it as .png and .csv)")
    beside = [out] + [out.with_suffix(s) for s, on in ((".csv", csv_too), (".png", plot)) if on]
    for path in beside:
        if path.is_dir():
            raise ValueError(f"--out {out}: {path} is a folder")
    folder = out.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent  # the folders that do not exist yet are created when the rows are written
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".utilrank-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write in {folder} ({exc.strerror or exc})") from exc


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


