"""Every figure the commands write, drawn on matplotlib's object API (``Figure``, no ``pyplot``): nothing
changes matplotlib's process-wide backend or state, so a notebook or GUI that imports the package keeps its
own. Each figure is written under a temporary name and renamed. A figure draws a document the command also
saves (``report.json``, ``spectrum.json``, ...): the analysis computes, the command saves and plots."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._files import atomic_path
from .analysis.esd import WELL_TRAINED

if TYPE_CHECKING:
    from .analysis.esd import ESD


# matplotlib (heavy: ~0.9 s on 2 cores) loads with the first figure, not with the commands that draw none
def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="tight")
    return fig, fig.subplots()


def _save(fig, path: str | Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


# -- utilization and benchmarks -----------------------------------------------------------------------


def plot_utilization(report: dict, path: str | Path) -> None:
    """The paper's Figure 2 style, of a ``report.json`` document (``Report.to_dict()``): per layer, the weight's
    rank (dotted) and the utilized rank (solid); in a compress folder also the rank the saved model holds
    (squares; a layer kept dense sits at its full rank, hollow), and the saved model's parameter counts in the
    title. A layer whose rank its sample count bounds (``sample_bounded``) is shaded, its name red, and its sample
    count drawn (red bar: the rank cannot rise above it); the title gives the MLU without those layers too."""
    rows, saved = report["layers"], report.get("saved")
    xs = list(range(len(rows)))
    fig, ax = _figure(figsize=(max(6.0, 0.32 * len(rows) + 2), 4.2))
    ax.plot(xs, [r["weight_rank"] for r in rows], ":o", color="tab:gray", ms=4, label="rank of W")
    ax.plot(xs, [r["rank"] for r in rows], "-o", color="tab:blue", ms=4,
            label=f"utilized rank (energy {report['energy']})")
    if saved is not None:
        ax.plot(xs, [r["saved_rank"] if r["saved_rank"] is not None else r["full_rank"] for r in rows], "-s",
                color="tab:orange", ms=5, label="rank in the saved model")
        dense_at = [(x, r["full_rank"]) for x, r in zip(xs, rows, strict=True) if r["saved_rank"] is None]
        if dense_at:
            ax.plot(*zip(*dense_at, strict=True), "s", ms=8, mfc="white", color="tab:orange",
                    label="kept dense in the saved model")
    bounded = [x for x, r in zip(xs, rows, strict=True) if r.get("sample_bounded")]
    _mark_sample_bounded(ax, bounded, [rows[x]["samples"] for x in bounded])
    ax.set_xticks(xs)
    ax.set_xticklabels([r["name"] for r in rows], rotation=70, ha="right", fontsize=7)
    for x in bounded:
        ax.get_xticklabels()[x].set_color("tab:red")
    ax.set_ylabel("rank")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    title = f"{report['model']} on {report['dataset']}: MLU {report['mlu']:.1%}"
    if bounded and report.get("mlu_unbounded") is not None:
        title += f", {report['mlu_unbounded']:.1%} without the {len(bounded)} sample-bounded (shaded)"
    if saved is not None:
        title += f"\nsaved model {saved['dense'] / 1e6:.3g}M -> {saved['compressed'] / 1e6:.3g}M params"
    else:
        dense, factored = (sum(r[k] for r in rows) for k in ("params_dense", "params_factored"))
        title += f"\nanalyzed layers {dense / 1e6:.3g}M -> {factored / 1e6:.3g}M params"
    ax.set_title(title, fontsize=10)
    _save(fig, path, dpi=130)


def _mark_sample_bounded(ax, xs: list[int], samples: list[int]) -> None:
    """Shade the columns of the layers whose rank their samples bound and draw each one's sample count as a red
    bar (the ceiling of its rank), with one legend entry for both."""
    for x in xs:
        ax.axvspan(x - 0.45, x + 0.45, color="tab:red", alpha=0.12, lw=0)
    if xs:
        ax.plot(xs, samples, "_", color="tab:red", ms=14, mew=2.5,
                label="samples seen, fewer than min(in, out): the rank's ceiling")


def speedup_range(row: dict) -> tuple[float, float] | None:
    """A compressed bench row's speedup at the ends of the p20-p80 ranges (dense p20 / compressed p80, dense p80 /
    compressed p20); None for rows without the dense timing."""
    if "dense_step_time_p20" not in row:
        return None
    return row["dense_step_time_p20"] / row["step_time_p80"], row["dense_step_time_p80"] / row["step_time_p20"]


def plot_speedup(rows: list[dict], path: str | Path) -> None:
    """Speedup against batch size per backend and dtype: measured (solid, with the p20-p80 range as error bars;
    hollow where the ranges of dense and compressed overlap: no measurable difference) beside the FLOP ratio
    (dashed)."""
    comp = [r for r in rows if r["variant"] == "compressed" and "error" not in r]
    fig, ax = _figure(figsize=(6.4, 4.2))
    # one file may hold several cuts (benchmarks/models/vit_b_engines.py: 50% and 35% params): a series per cut too
    cuts = sorted({r.get("param_ratio") for r in comp}, key=lambda c: -1 if c is None else -c)
    cut_label = (lambda c: f" at {c:.0%} params") if len(cuts) > 1 else (lambda c: "")  # noqa: E731
    series = sorted({(r["backend"], r["dtype"]) for r in comp})
    for k, cut in enumerate(cuts):
        for i, (backend, dtype) in enumerate(series):
            pts = sorted((r for r in comp if (r["backend"], r["dtype"], r.get("param_ratio")) == (backend, dtype, cut)),
                         key=lambda r: r["batch_size"])
            _speedup_series(ax, pts, ("o", "s", "^")[k % 3], f"C{i}", f"measured {backend} {dtype}{cut_label(cut)}")
        # the FLOP ratio depends on the model, the cut and the batch size only: one dashed line per dtype
        dtypes = sorted({r["dtype"] for r in comp})
        for j, dtype in enumerate(dtypes):
            pts = sorted({(r["batch_size"], r["theoretical_speedup"]) for r in comp
                          if (r["dtype"], r.get("param_ratio")) == (dtype, cut)})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ("--", ":", "-.")[(j + k) % 3], color="gray",
                    label=f"FLOP ratio {dtype}{cut_label(cut)}" if len(dtypes) > 1
                    else f"FLOP ratio (theoretical){cut_label(cut)}")
    ax.axhline(1.0, color="gray", lw=0.8)
    if len({r["batch_size"] for r in comp}) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over dense")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if any(speedup_range(r) for r in comp):  # a key to the bars and the hollow markers, as a legend entry
        ax.plot([], [], "o", color="gray", mfc="white", label="hollow: no measurable difference")
        ax.errorbar([], [], yerr=[], fmt="none", ecolor="gray", capsize=3, label="bars: p20-p80 of the ratio")
    ax.legend(fontsize=8)
    if comp:
        ax.set_title(f"{comp[0]['model']} on {comp[0]['device']}", fontsize=9)
    _save(fig, path, dpi=130)


def _speedup_series(ax, rows: list[dict], marker: str, color: str, label: str) -> None:
    """One measured series: a line through the median speedups, p20-p80 error bars, and filled markers where the
    speedup is measurable, hollow where it is not."""
    xs, ys = [r["batch_size"] for r in rows], [r["speedup"] for r in rows]
    ax.plot(xs, ys, "-" + marker, color=color, label=label)
    for r, x, y in zip(rows, xs, ys, strict=True):
        bounds = speedup_range(r)
        if bounds is not None:
            ax.errorbar([x], [y], yerr=[[max(0.0, y - bounds[0])], [max(0.0, bounds[1] - y)]], fmt="none",
                        ecolor=color, elinewidth=1, capsize=3)
        if not r.get("speedup_measurable", True):
            ax.plot([x], [y], marker, color=color, mfc="white", zorder=3)


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
    from matplotlib.ticker import NullFormatter  # heavy: with the first figure

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
    ax.legend(fontsize=8, loc="best")  # the patch embedding's alpha often sits top left
    s = report["summary"]
    ax.set_title(f"{report['model']}: mean alpha {s['alpha']:.2f}, "
                 f"mean alpha_weighted {s['alpha_weighted']:.2f}"
                 if s["layers"] else report["model"], fontsize=10)
    _save(fig, path, dpi=130)


# -- weight-space regions and accuracy from weights -----------------------------------------------------------

_GROUP_MARKERS = "osD^vP<>Xh"


def _group_styles(groups: list[str]) -> dict[str, tuple[str, str]]:
    """A colour and a marker per group, stable in the groups' order."""
    return {g: (f"C{i % 10}", _GROUP_MARKERS[i % len(_GROUP_MARKERS)]) for i, g in enumerate(groups)}


def _figure_grid(rows: int, cols: int, figsize: tuple[float, float]):
    from matplotlib.figure import Figure  # heavy: with the first figure

    fig = Figure(figsize=figsize, layout="constrained")
    fig.subplots(rows, cols, squeeze=False)
    return fig


def _scatter_members(ax, doc: dict, key: str, styles: dict) -> None:
    members = doc["members"]
    for g, (color, marker) in styles.items():
        pts = [m[key] for m in members if m["group"] == g]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, s=46, edgecolors="black",
                   linewidths=0.5, label=f"{g} ({len(pts)})", zorder=3)
    runs = {}
    for m in members:  # a training run's snapshots, joined in order of training
        if m.get("run") is not None:
            runs.setdefault(m["run"], []).append(m)
    for run in runs.values():
        run.sort(key=lambda m: m.get("epochs", 0))
        color = styles[run[0]["group"]][0]
        ax.plot([m[key][0] for m in run], [m[key][1] for m in run], "-", color=color, lw=0.8, alpha=0.6, zorder=2)
        last = run[-1]
        ax.annotate(f"{last['run']} ({last.get('epochs', '?')} ep)", last[key], fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    for m in members:
        if m["name"] in ("base", "swa-average"):
            ax.annotate(m["name"], m[key], fontsize=7, xytext=(4, -9), textcoords="offset points")


def plot_regions(doc: dict, path: str | Path) -> None:
    """The population in 2-D: PCA (axes labelled with the variance they explain), the PCA of the base's
    neighbourhood when far-away models squash it, and t-SNE; coloured by group, a training run's snapshots
    joined in order."""
    styles = _group_styles(doc["groups"])
    panels = [("pca", "PCA of all models", doc["pca_explained"])]
    if doc.get("pca_near"):
        z = doc["pca_near"]
        panels.append(("pca_near", f"PCA of the {z['members']} models within {z['radius']:.3g} of {z['center']}",
                       z["explained"]))
    if all("tsne" in m for m in doc["members"]):
        panels.append(("tsne", f"t-SNE of all models (perplexity {doc['tsne_perplexity']:.0f})", None))
    fig = _figure_grid(1, len(panels), (6.0 * len(panels) + 0.5, 5.6))
    for ax, (key, title, explained) in zip(fig.axes, panels, strict=True):
        shown = {"members": [m for m in doc["members"] if key in m]}
        _scatter_members(ax, shown, key, {g: st for g, st in styles.items()
                                          if any(m["group"] == g for m in shown["members"])})
        ax.set_title(title, fontsize=10)
        if explained is None:
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ev = list(explained) + [0.0] * (2 - len(explained))
            ax.set_xlabel(f"PC 1 ({ev[0]:.0%} of the variance)")
            ax.set_ylabel(f"PC 2 ({ev[1]:.0%})")
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.axes[0].legend(handles, labels, fontsize=7, loc="best", framealpha=0.85)
    space = doc["space"]
    what = (f"layer {space['layer']}" if space["layer"] else "all parameters") + \
        (f", projected on the data subspaces (energy {space['energy']})" if space["projected"] else "")
    fig.suptitle(f"{doc['model']} on {doc['dataset']}: {len(doc['members'])} models in weight space ({what}; "
                 f"{space['dims']:,} dimensions)", fontsize=10)
    _save(fig, path, dpi=130)


def plot_distances(doc: dict, path: str | Path) -> None:
    """The pairwise distance matrix, members ordered by group (group boundaries drawn), and the mean
    distance within each group and between groups."""
    names = doc["distances"]["names"]
    dist = np.asarray(doc["distances"]["matrix"])
    groups = [m["group"] for m in doc["members"]]
    order = sorted(range(len(names)), key=lambda i: (doc["groups"].index(groups[i]), i))
    d = dist[np.ix_(order, order)]
    n = len(names)
    fig = _figure_grid(1, 1, (max(6.5, 0.2 * n + 3.5), max(5.5, 0.2 * n + 2.5)))
    ax = fig.axes[0]
    from matplotlib.colors import LogNorm  # heavy: with the first figure

    positive = d[d > 0]
    # a log scale: distances within a basin are ~10x smaller than across basins and would all look alike
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.max() > 0 else None
    im = ax.imshow(np.where(d > 0, d, np.nan), cmap="viridis", norm=norm)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Euclidean distance between weight vectors")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([names[i] for i in order], rotation=90, fontsize=6)
    ax.set_yticklabels([names[i] for i in order], fontsize=6)
    bounds = [k for k in range(1, n) if groups[order[k]] != groups[order[k - 1]]]
    for b in bounds:
        ax.axhline(b - 0.5, color="white", lw=1)
        ax.axvline(b - 0.5, color="white", lw=1)
    within = ", ".join(f"{g} {v:.3g}" for g, v in doc["distances"]["within"].items() if v is not None)
    ax.set_title(f"{doc['model']}: pairwise distances (mean within group: {within})", fontsize=8, wrap=True)
    _save(fig, path, dpi=130)


def plot_barriers(doc: dict, path: str | Path) -> None:
    """Validation accuracy along the straight line between pairs of models (left), and each pair's barrier
    height (right, largest first)."""
    pairs = doc["barriers"]["pairs"]
    fig = _figure_grid(1, 2, (13.0, max(4.8, 0.22 * len(pairs) + 1.5)))
    ax, bx = fig.axes
    kinds = {"same group": "tab:blue", "across groups": "tab:red"}
    for p in pairs:
        ts = np.linspace(0, 1, len(p["accuracy"]))
        ax.plot(ts, 100 * np.asarray(p["accuracy"]), "-", color=kinds.get(p["kind"], "gray"), alpha=0.55, lw=1.1)
    for kind, color in kinds.items():
        ax.plot([], [], color=color, label=kind)
    ax.set_xlabel("t: weights (1 - t) A + t B")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"{len(pairs)} straight paths between models", fontsize=10)
    ranked = sorted(pairs, key=lambda p: p["barrier"])
    ys = np.arange(len(ranked))
    bx.barh(ys, [100 * p["barrier"] for p in ranked], color=[kinds.get(p["kind"], "gray") for p in ranked])
    bx.set_yticks(ys)
    bx.set_yticklabels([f"{p['a']} - {p['b']}" for p in ranked], fontsize=6)
    bx.set_xlabel("barrier: largest drop below the line between the endpoint accuracies (pp)")
    bx.grid(alpha=0.3, axis="x")
    bx.set_title("barrier height (0: one basin, can be averaged)", fontsize=10)
    fig.suptitle(f"{doc['model']} on {doc['dataset']}", fontsize=10)
    _save(fig, path, dpi=130)


def plot_predict(doc: dict, path: str | Path) -> None:
    """One scatter per weight metric against the target accuracy (Spearman's rho in each title), coloured
    by group, and the leave-one-out predictions of the regression against the truth."""
    metrics = doc["metrics"]
    members = doc["members"]
    groups = list(dict.fromkeys(m["group"] for m in members))
    styles = _group_styles(groups)
    panels = len(metrics) + 1
    cols = 4
    rows = math.ceil(panels / cols)
    fig = _figure_grid(rows, cols, (3.4 * cols, 3.0 * rows))
    target = doc["target"]
    for ax, name in zip(fig.axes, metrics, strict=False):
        for g, (color, marker) in styles.items():
            pts = [(m["metrics"][name], 100 * m[target]) for m in members if m["group"] == g]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, s=22, edgecolors="black",
                       linewidths=0.3, label=g)
        c = doc["spearman"][name]
        ax.set_title(f"{name}: rho {c['rho']:+.2f} (p {c['p']:.2g})", fontsize=9)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(f"{target} accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    ax = fig.axes[len(metrics)]
    reg = doc["regression"]
    truth = [100 * m[target] for m in members]
    pred = [100 * p for p in reg["predictions"]]
    for g, (color, marker) in styles.items():
        ii = [i for i, m in enumerate(members) if m["group"] == g]
        ax.scatter([pred[i] for i in ii], [truth[i] for i in ii], c=color, marker=marker, s=22, edgecolors="black",
                   linewidths=0.3)
    lo, hi = min(truth + pred), max(truth + pred)
    ax.plot([lo, hi], [lo, hi], "--", color="gray", lw=1)
    ax.set_xlabel("leave-one-out prediction (%)", fontsize=8)
    ax.set_ylabel(f"{target} accuracy (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(f"ridge on all: LOO MAE {100 * reg['loo_mae']:.1f} pp (mean: {100 * reg['trivial_loo_mae']:.1f})",
                 fontsize=9)
    for extra in fig.axes[panels:]:
        extra.set_visible(False)
    fig.axes[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{doc['model']} on {doc['dataset']}: {target} accuracy against weight metrics "
                 f"({len(members)} models)", fontsize=10)
    _save(fig, path, dpi=120)
