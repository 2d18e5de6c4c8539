"""``utilrank spectrum``: per-layer ESD, power-law alpha and WeightWatcher metrics, of W and of W'."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .._files import write_json
from ..analysis import Statistics, statistics_bytes
from ..analysis.esd import WELL_TRAINED, ESDOptions
from ..analysis.spectrum import check_finite_statistics, spectrum
from ..models import BUILTIN_MODELS, build_builtin
from ..plots import plot_alpha, plot_esds
from ..weightspace.inputs import WeightFileError, screen_files
from ._model import model_and_data
from ._options import UsageError, add_common_options, add_threads_option
from ._output import commit, output_folder
from ._runtime import init_distributed, limit_threads, resolve_device
from ._statistics import collect_statistics


def run(args) -> int:
    with limit_threads(args.threads):
        return _spectrum(args)


def esd_options(args):
    """The ``ESDOptions`` of the command line: the ``--definitions`` preset, then each option given."""
    given = {k: getattr(args, k) for k in ("ks", "small_sample", "fit_floor", "conv_norm", "mp", "min_evals",
                                           "max_evals", "count", "grouped_convs") if getattr(args, k) is not None}
    least = given.get("min_evals", ESDOptions.min_evals)
    if least < 2:
        raise UsageError(f"--min-evals {least}: must be >= 2 (a power law is not fitted to fewer eigenvalues)")
    if given.get("max_evals", ESDOptions.max_evals) < least:
        raise UsageError(f"--max-evals {given['max_evals']}: must be >= --min-evals ({least})")
    try:
        return ESDOptions.utilrank(**given) if args.definitions == "utilrank" else ESDOptions(**given)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _screen_inputs(args) -> Statistics | None:
    """What the command reads, checked before any work: ``--stats`` (readable, finite) and the files that hold the
    model's weights (``--checkpoint``, an ``hf:DIR`` folder's safetensors): every tensor finite, NaN or Inf named
    by file and tensor."""
    if args.stats and args.weights_only:
        raise UsageError(f"--stats {args.stats} and --weights-only: the statistics give the projected spectra, "
                         "--weights-only has none; give one")
    stats = None
    if args.stats:
        try:
            stats = Statistics.load(args.stats, device="cpu")
            check_finite_statistics(stats, f"--stats {args.stats}")
        except (FileNotFoundError, ValueError) as exc:
            reason = str(exc).removeprefix(f"statistics {args.stats}: ").removeprefix(f"--stats {args.stats}: ")
            raise UsageError(f"--stats {args.stats}: {reason}") from exc
    files = [("--checkpoint", args.checkpoint)] if args.checkpoint else []
    if args.model.startswith("hf:") and Path(args.model[3:]).is_dir():
        files += [(f"--model {args.model}:", p) for p in sorted(Path(args.model[3:]).glob("*.safetensors"))]
    try:
        for option, path in files:
            screen_files([path], option)
    except WeightFileError as exc:
        raise UsageError(str(exc)) from exc
    return stats


def _spectrum(args) -> int:
    options = esd_options(args)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    stats = _screen_inputs(args)
    if stats is not None and args.model in BUILTIN_MODELS:  # statistics of another model, before any work
        _check_stats(args, stats, build_builtin(args.model))
    folder = output_folder(args, "spectrum")
    rank, world = init_distributed()
    device = resolve_device(args.device)
    started = time.perf_counter()
    loaded = model_and_data(args, device)
    model, data = loaded.model, loaded.data
    if stats is not None:
        _check_stats(args, stats, model)
    elif not args.weights_only:
        folder.require_space(2 * statistics_bytes(model))
        stats = collect_statistics(args, model, data, device, folder, rank, world)
    if rank != 0:
        return 0
    try:
        report, esds = spectrum(model, stats, args.energy, options=options, dtype=dtype, model_name=args.model)
    except ValueError as exc:  # weights or statistics with NaN or Inf (a pass over data that makes them)
        raise UsageError(str(exc)) from exc
    write_json(folder.path("spectrum.json"), report)
    plot_alpha(report, folder.path("alpha.png"))
    plot_esds(report, esds, folder.path("esd"))
    print(format_spectrum_table(report))
    out = commit(folder)
    kept = ", stats.safetensors" if stats is not None and not args.stats else ""
    print(f"wrote {out}/spectrum.json, alpha.png, esd/ ({len(report['layers'])} plots){kept} "
          f"in {time.perf_counter() - started:.1f}s")
    return 0


def _check_stats(args, stats: Statistics, model) -> None:
    try:
        stats.check_model(model)
    except ValueError as exc:
        raise UsageError(f"--stats {args.stats}: {exc}") from exc


def format_spectrum_table(report: dict) -> str:
    proj = report["projected"]
    head = (f"{'layer':<24} {'shape':>14} {'evals':>5} {'alpha':>6} {'KS D':>5} {'a_w':>6} {'logsn':>6} "
            f"{'stab r':>6} {'mp sr':>5} {'spk':>3}")
    if proj:
        head += f" | {'rank':>4} {'alpha':>6} {'mp sr':>5} {'spk':>3}"
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        shape = "x".join(str(s) for s in r["shape"])
        line = (f"{r['name'][-24:]:<24} {shape:>14} {r['num_evals']:>5} {r['alpha']:>6.2f} "
                f"{r['ks_distance']:>5.3f} "
                f"{r['alpha_weighted']:>6.2f} {r['log_spectral_norm']:>6.2f} {r['stable_rank']:>6.1f} "
                f"{r['mp_softrank']:>5.2f} {r['num_spikes']:>3}")
        if proj:
            p = r["projected"]
            if "alpha" in p:
                line += f" | {p['rank']:>4} {p['alpha']:>6.2f} {p['mp_softrank']:>5.2f} {p['num_spikes']:>3}"
            else:
                line += f" | {p.get('rank', '-'):>4} {p['reason']}"
        lines.append(line)
    for s in report["skipped"]:
        lines.append(f"{s['name'][-24:]:<24} skipped: {s['reason']}")
    s = report["summary"]
    if s["layers"]:
        lines.append(f"mean over {s['layers']} layers: alpha {s['alpha']:.2f}, "
                     f"alpha_weighted {s['alpha_weighted']:.2f}, "
                     f"log spectral norm {s['log_spectral_norm']:.2f}, stable rank {s['stable_rank']:.1f}, "
                     f"MP soft rank {s['mp_softrank']:.2f}")
        if "projected" in s:
            p = s["projected"]
            lines.append(f"data-projected at energy {report['energy']}: alpha {p['alpha']:.2f}, "
                         f"alpha_weighted {p['alpha_weighted']:.2f}, MP soft rank {p['mp_softrank']:.2f}")
        lo, hi = WELL_TRAINED
        lines.append(f"alpha outside [{lo:g}, {hi:g}]: {len(s['over_trained'])} below (over-fit or heavily "
                     f"correlated), {len(s['under_trained'])} above (under-trained)")
    defs = report["definitions"]
    if defs != ESDOptions().to_dict():
        changed = ", ".join(f"{k}={v}" for k, v in defs.items() if ESDOptions().to_dict()[k] != v)
        lines.append(f"definitions differ from WeightWatcher's: {changed}")
    return "\n".join(lines)


def add_esd_options(p: argparse.ArgumentParser) -> None:
    """The metrics' definitions: WeightWatcher 0.7.7's by default (README, ``utilrank spectrum``)."""
    g = p.add_argument_group("definitions (default: WeightWatcher 0.7.7's)")
    g.add_argument("--definitions", choices=("ww", "utilrank"), default="ww",
                   help="ww: WeightWatcher's definitions; utilrank: this project's (--ks two-sided --fit-floor "
                        "rank --no-conv-norm --mp-fit robust --count slice --no-grouped-convs); the options "
                        "below override either (default: %(default)s)")
    g.add_argument("--ks", choices=("ww", "two-sided"), default=None,
                   help="KS distance of the xmin search: WeightWatcher's max |F(x_j) - j/n| or the standard "
                        "two-sided statistic")
    g.add_argument("--small-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="below 20 eigenvalues, WeightWatcher's bias-corrected estimator (--no-small-sample: the "
                        "plain MLE)")
    g.add_argument("--fit-floor", choices=("ww", "rank"), default=None,
                   help="eigenvalues the power law is fitted to: above 1e-5 (WeightWatcher's absolute "
                        "threshold) or above the fp32 rank tolerance (scale-free)")
    g.add_argument("--conv-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="scale pooled conv slices by 1/sqrt(2) as WeightWatcher does (log spectral norm -0.301; "
                        "--no-conv-norm: the weight's own scale)")
    g.add_argument("--mp-fit", dest="mp", choices=("ww", "robust"), default=None,
                   help="Marchenko-Pastur fit: WeightWatcher's, or this project's, robust to strong spikes")
    g.add_argument("--min-evals", type=int, default=None,
                   help="smallest matrix fitted, in eigenvalues (WeightWatcher's min_evals, default 8)")
    g.add_argument("--max-evals", type=int, default=None,
                   help="largest matrix fitted, in eigenvalues (WeightWatcher's max_evals, default 15000)")
    g.add_argument("--count", choices=("pooled", "slice"), default=None,
                   help="--min-evals applies to a conv's pooled eigenvalues (WeightWatcher) or to each slice")
    g.add_argument("--grouped-convs", action=argparse.BooleanOptionalAction, default=None,
                   help="analyze grouped and depthwise convs by their stored slices as WeightWatcher does "
                        "(--no-grouped-convs: skip them)")


def add_parser(sub) -> None:
    p = sub.add_parser("spectrum", help="per-layer ESD, power-law alpha and WeightWatcher metrics, of W and "
                                        "of the data-projected W'",
                       description="Per layer, the empirical spectral density of W^T W, its power-law alpha and "
                                   "WeightWatcher's metrics (WeightWatcher 0.7.7's definitions by default), of the "
                                   "weights and of the data-projected W' = P_out W P_in; writes spectrum.json, "
                                   "alpha.png and esd/<layer>.png.")
    add_common_options(p, "spectrum")
    p.set_defaults(energy=0.999)
    p.add_argument("--stats", default=None,
                   help="statistics (stats.safetensors from analyze) for the projected spectra, instead of "
                        "a pass")
    p.add_argument("--weights-only", action="store_true",
                   help="no statistics pass: spectra of the weights alone (WeightWatcher's analysis)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the eigensolver (default: %(default)s; never half precision)")
    add_esd_options(p)
    add_threads_option(p)
    p.epilog = ("--energy defaults to 0.999 here: at 0.99 most layers of the built-in ViT keep 4-15 "
                "directions, too few eigenvalues for a tail fit.")
    p.set_defaults(func=run)
