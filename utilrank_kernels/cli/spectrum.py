"""``utilrank spectrum``: per-layer ESD, power-law alpha and WeightWatcher metrics, of W and of W'."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ._common import (
    UsageError,
    add_common_options,
    add_threads_option,
    collect_statistics,
    init_distributed,
    limit_threads,
    load_model_and_data,
    resolve_device,
)


def run(args) -> int:
    with limit_threads(args.threads):
        return _spectrum(args)


def _spectrum(args) -> int:
    from ..analysis import Statistics
    from ..analysis.spectrum import format_spectrum_table, spectrum, write_spectrum

    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    rank, world = init_distributed()
    device = resolve_device(args.device)
    out = Path(args.out or f"utilrank-out/spectrum-{args.model}")
    started = time.perf_counter()
    model, _, data = load_model_and_data(args, device)
    stats = None
    if args.stats:
        try:
            stats = Statistics.load(args.stats, device="cpu")
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
    elif not args.weights_only:
        stats = collect_statistics(args, model, data, device, out, rank, world)
    if rank != 0:
        return 0
    try:
        report, esds = spectrum(model, stats, args.energy, dtype=dtype, model_name=args.model)
    except ValueError as exc:  # statistics of another model
        raise UsageError(str(exc)) from exc
    write_spectrum(report, esds, out)
    print(format_spectrum_table(report))
    kept = ", stats.safetensors" if stats is not None and not args.stats else ""
    print(f"wrote {out}/spectrum.json, alpha.png, esd/ ({len(report['layers'])} plots){kept} "
          f"in {time.perf_counter() - started:.1f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("spectrum", help="per-layer ESD, power-law alpha and WeightWatcher metrics, of W and "
                                        "of the data-projected W'")
    add_common_options(p, "spectrum")
    p.set_defaults(energy=0.999)
    p.add_argument("--stats", default=None,
                   help="statistics (stats.safetensors from analyze) for the projected spectra, instead of "
                        "a pass")
    p.add_argument("--weights-only", action="store_true",
                   help="no statistics pass: spectra of the weights alone (WeightWatcher's analysis)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="precision of the eigensolver (default: %(default)s; never half precision)")
    add_threads_option(p)
    p.epilog = ("--energy defaults to 0.999 here: at 0.99 most layers of the built-in ViT keep 4-15 "
                "directions, too few eigenvalues for a tail fit.")
    p.set_defaults(func=run)
