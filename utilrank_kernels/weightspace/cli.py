"""``utilrank spectrum`` and ``utilrank soup`` (DESIGN §4); ``add_parsers(sub)`` adds both to the command."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..commands import (
    UsageError,
    add_common_options,
    collect_statistics,
    init_distributed,
    load_model_and_data,
    resolve_device,
)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


@contextlib.contextmanager
def _threads(args) -> Iterator[None]:
    """``--threads`` for PyTorch and for the BLAS under numpy (the spectra's fits), via threadpoolctl; 0
    (the default) keeps the libraries' defaults. (A default of 1 for the built-in models was needed while
    the statistics pass ran scipy's BLAS beside torch's threads; without it, 2 threads are as fast on 2
    cores: spectrum 15 s either way, soup 37 s against 40-46 s.)"""
    from threadpoolctl import threadpool_limits

    threads = args.threads
    if threads < 0:
        raise UsageError(f"--threads {threads}: must be >= 0 (0: the libraries' defaults)")
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:  # a caller in the same process (a test, a notebook) gets its setting back
        torch.set_num_threads(before)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for PyTorch and BLAS (default: 0, the libraries' defaults)")


# -- spectrum -----------------------------------------------------------------------------------------


def cmd_spectrum(args) -> int:
    with _threads(args):
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


# -- soup ---------------------------------------------------------------------------------------------


def cmd_soup(args) -> int:
    with _threads(args):
        return _soup(args)


def _soup(args) -> int:
    from .._cache import write_json
    from .demo import format_soup_table, soup_experiment

    if args.ingredients < 1 or args.epochs < 0 or args.compressed_epochs < 0 or args.swa_cycles < 0:
        raise UsageError("--ingredients must be >= 1; --epochs, --compressed-epochs, --swa-cycles >= 0")
    if not 0 < args.energy <= 1:
        raise UsageError(f"--energy {args.energy}: must be in (0, 1]")
    for f in args.from_files or []:
        if not Path(f).is_file():
            raise UsageError(f"--from {f}: no such file")
    device = resolve_device(args.device)
    out = Path(args.out or f"utilrank-out/soup-{args.model}")
    started = time.perf_counter()
    model, _, data = load_model_and_data(args, device)
    try:
        doc = soup_experiment(
            model, data, arch=args.model, ingredients=args.from_files, n=args.ingredients, epochs=args.epochs,
            lrs=args.lrs, seed=args.seed, swa_cycles=args.swa_cycles, compressed=not args.no_compressed,
            energy=args.energy, compressed_epochs=args.compressed_epochs, compressed_lr=args.compressed_lr,
            device=device,
        )
    except ValueError as exc:  # ingredients that do not fit the model
        raise UsageError(str(exc)) from exc
    write_json(out / "soup.json", doc)
    print(format_soup_table(doc))
    print(f"wrote {out}/soup.json in {time.perf_counter() - started:.1f}s")
    return 0


def add_parsers(sub) -> None:
    """Add ``spectrum`` and ``soup`` to the ``utilrank`` subcommands."""
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
    _add_threads(p)
    p.epilog = ("--energy defaults to 0.999 here: at 0.99 most layers of the built-in ViT keep 4-15 "
                "directions, too few eigenvalues for a tail fit.")
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("soup", help="fine-tuned variants, uniform and greedy soups and SWA, dense and "
                                    "compressed")
    p.add_argument("--model", default="vit-digits",
                   help="built-in vit-digits | vgg-digits, or a timm name with --checkpoint "
                        "(default: %(default)s)")
    p.add_argument("--checkpoint", default=None, help="weights of the model the ingredients start from")
    p.add_argument("--data", default=None, help="'digits' (default) or an ImageFolder directory")
    p.add_argument("--from", dest="from_files", nargs="+", metavar="FILE", default=None,
                   help="soup these fine-tuned weight files (safetensors or weights-only torch) instead of "
                        "fine-tuning --ingredients variants")
    p.add_argument("--ingredients", type=int, default=5, help="variants to fine-tune (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2,
                   help="fine-tuning epochs per variant (default: %(default)s)")
    p.add_argument("--lrs", type=_floats, default=[3e-4, 1e-3],
                   help="learning rates the variants cycle through (default: 3e-4,1e-3); seeds are 1..N")
    p.add_argument("--seed", type=int, default=0, help="the variants' seeds are SEED+1..SEED+N (default: 0)")
    p.add_argument("--swa-cycles", type=int, default=5,
                   help="cyclical SWA from the base model: cycles of 1 epoch (0: no SWA; "
                        "default: %(default)s)")
    p.add_argument("--no-compressed", action="store_true", help="dense soups only")
    p.add_argument("--energy", type=float, default=0.995,
                   help="energy of the compression plan, from the base model's statistics "
                        "(default: %(default)s)")
    p.add_argument("--compressed-epochs", type=int, default=2,
                   help="fine-tuning epochs of each factored ingredient (default: %(default)s)")
    p.add_argument("--compressed-lr", type=float, default=1e-3,
                   help="their learning rate (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    _add_threads(p)
    p.add_argument("--out", default=None, help="output folder (default: utilrank-out/soup-MODEL)")
    p.set_defaults(func=cmd_soup)
