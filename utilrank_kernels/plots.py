"""Every figure the commands write, drawn on matplotlib's object API (``Figure``, no ``pyplot``): nothing
changes matplotlib's process-wide backend or state, so a notebook or GUI that imports the package keeps its
own. Each figure is written under a temporary name and renamed."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._cache import atomic_path

if TYPE_CHECKING:
    from .analysis.esd import ESD
    from .analysis.report import Report


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="tight")
    return fig, fig.subplots()


def _save(fig, path: str | Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


# -- utilization and benchmarks -----------------------------------------------------------------------


def plot_utilization(report: Report, path: str | Path) -> None:
    """The paper's Figure 2 style: per layer, the weight's rank (dotted) and the utilized rank (solid); in a
    compress folder also the rank the saved model holds (squares; a layer kept dense sits at its full
    rank, hollow), and the saved model's parameter counts in the title."""
    rows = report.layers
    xs = list(range(len(rows)))
    fig, ax = _figure(figsize=(max(6.0, 0.32 * len(rows) + 2), 4.2))
    ax.plot(xs, [r.weight_rank for r in rows], ":o", color="tab:gray", ms=4, label="rank of W")
    ax.plot(xs, [r.rank for r in rows], "-o", color="tab:blue", ms=4, label=f"utilized rank (energy {report.energy})")
    if report.saved is not None:
        ax.plot(xs, [r.saved_rank if r.saved_rank is not None else r.full_rank for r in rows], "-s",
                color="tab:orange", ms=5, label="rank in the saved model")
        dense_at = [(x, r.full_rank) for x, r in zip(xs, rows, strict=True) if r.saved_rank is None]
        if dense_at:
            ax.plot(*zip(*dense_at, strict=True), "s", ms=8, mfc="white", color="tab:orange",
                    label="kept dense in the saved model")
    ax.set_xticks(xs)
    ax.set_xticklabels([r.name for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("rank")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    title = f"{report.model} on {report.dataset}: MLU {report.mlu:.1%}"
    if report.saved is not None:
        title += (f"; saved model {report.saved['dense'] / 1e6:.3g}M -> {report.saved['compressed'] / 1e6:.3g}M "
                  "params")
    else:
        title += f"; analyzed layers {report.params_dense / 1e6:.3g}M -> {report.params_factored / 1e6:.3g}M params"
    ax.set_title(title, fontsize=10)
    _save(fig, path, dpi=130)


def plot_speedup(rows: list[dict], path: str | Path) -> None:
    """Speedup against batch size per backend and dtype: measured (solid) beside the FLOP ratio (dashed)."""
    comp = [r for r in rows if r["variant"] == "compressed" and "error" not in r]
    fig, ax = _figure(figsize=(6.4, 4.2))
    series = sorted({(r["backend"], r["dtype"]) for r in comp})
    for i, (backend, dtype) in enumerate(series):
        pts = sorted((r["batch_size"], r["speedup"], r["theoretical_speedup"]) for r in comp
                     if (r["backend"], r["dtype"]) == (backend, dtype))
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color,
                label=f"measured {backend} {dtype}")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=color, alpha=0.6,
                label=f"theoretical (FLOPs) {dtype}" if len(series) > 1 else "theoretical (FLOP ratio)")
    ax.axhline(1.0, color="gray", lw=0.8)
    if len({r["batch_size"] for r in comp}) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over dense")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if comp:
        ax.set_title(f"{comp[0]['model']} on {comp[0]['device']}", fontsize=9)
    _save(fig, path, dpi=130)


# -- spectra ----------------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def _draw_esd(ax, esd: ESD, color: str, label: str) -> None:
    x = esd.evals
    bins = np.logspace(np.log10(x.min()), np.log10(x.max()), max(10, min(60, x.size // 3)) + 1)
    ax.hist(x, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=color, label=f"{label} ESD")
    pl = esd.power_law
    xs = np.logspace(np.log10(pl.xmin), np.log10(x.max()), 50)
    ax.plot(xs, pl.density(xs), color=color, lw=2,
            label=f"{label} fit: alpha {pl.alpha:.2f}, D {pl.ks_distance:.3f}")
    ax.axvline(pl.xmin, color=color, ls="--", lw=1)
    ax.axvline(esd.mp.bulk_max, color=color, ls=":", lw=1.2)


def _readable_log_axes(ax) -> None:
    """At least a decade on each log axis (so that it has labelled major ticks) and no minor labels,
    which collide on a narrow range."""
    from matplotlib.ticker import NullFormatter

    for get, set_, axis in ((ax.get_xlim, ax.set_xlim, ax.xaxis), (ax.get_ylim, ax.set_ylim, ax.yaxis)):
        lo, hi = get()
        if hi < 10 * lo:
            mid = math.sqrt(lo * hi)
            set_(mid / 10**0.55, mid * 10**0.55)
        axis.set_minor_formatter(NullFormatter())


def plot_esds(report: dict, esds: dict[str, dict[str, ESD]], out_dir: str | Path) -> list[Path]:
    """One log-log ESD histogram per layer with its power-law fit (``xmin`` dashed, MP bulk edge dotted),
    the projected weight's beside it when there is one; written to ``out_dir/<layer>.png``."""
    out_dir = Path(out_dir)
    paths = []
    for row in report["layers"]:
        parts = esds[row["name"]]
        fig, ax = _figure(figsize=(5.6, 4.0))
        _draw_esd(ax, parts["weight"], "tab:blue", "W")
        if "projected" in parts:
            _draw_esd(ax, parts["projected"], "tab:orange", f"W' (rank {row['projected']['rank']})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _readable_log_axes(ax)
        pooled = " (kernel slices pooled" + (", W scaled by 1/sqrt(2))" if row["scale"] != 1 else ")")
        ax.set_xlabel("eigenvalue of $W^TW$" + (pooled if row["kind"] == "conv2d" else ""))
        ax.set_ylabel("density")
        ax.set_title(f"{row['name']}  {'x'.join(map(str, row['shape']))}\n"
                     f"dashed: xmin, dotted: MP bulk edge; MP soft rank {row['mp_softrank']:.2f}, "
                     f"{row['num_spikes']} spikes", fontsize=8)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3, which="both")
        path = out_dir / f"{_safe_name(row['name'])}.png"
        _save(fig, path, dpi=110)
        paths.append(path)
    return paths


def plot_alpha(report: dict, path: str | Path) -> None:
    """alpha per layer (and of the projected weights), WeightWatcher's well-trained band shaded."""
    rows = report["layers"]
    xs = np.arange(len(rows))
    fig, ax = _figure(figsize=(max(6.0, 0.36 * len(rows) + 2), 4.4))
    from .analysis.esd import WELL_TRAINED

    lo, hi = WELL_TRAINED
    ax.axhspan(lo, hi, color="tab:green", alpha=0.08, label=f"{lo:g} <= alpha <= {hi:g} (well trained)")
    ax.plot(xs, [r["alpha"] for r in rows], "-o", color="tab:blue", ms=5, label="alpha of W")
    if report["projected"]:
        ys = [(r["projected"] or {}).get("alpha", np.nan) for r in rows]
        ax.plot(xs, ys, "--s", color="tab:orange", ms=5,
                label=f"alpha of W' = P_out W P_in (energy {report['energy']})")
    ax.set_xticks(xs)
    ax.set_xticklabels([r["name"] for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("power-law exponent alpha")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    s = report["summary"]
    ax.set_title(f"{report['model']}: mean alpha {s['alpha']:.2f}, "
                 f"mean alpha_weighted {s['alpha_weighted']:.2f}"
                 if s["layers"] else report["model"], fontsize=10)
    _save(fig, path, dpi=130)


