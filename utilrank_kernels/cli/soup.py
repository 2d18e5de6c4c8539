"""``utilrank soup``: fine-tuned variants, uniform and greedy soups and SWA, dense and compressed."""

from __future__ import annotations

import time

from .._files import write_json
from ..models import BUILTIN_MODELS, ModelAndData, build_builtin
from ..weightspace.experiment import format_soup_table, soup_experiment
from ..weightspace.inputs import WeightFileError, require_distinct, screen_files
from ._model import model_and_data
from ._options import UsageError, add_threads_option, positive_floats
from ._output import commit, output_folder
from ._runtime import limit_threads, resolve_device


def run(args) -> int:
    with limit_threads(args.threads):
        return _soup(args)


def _soup(args) -> int:
    for option in ("epochs", "compressed_epochs", "swa_cycles"):
        if getattr(args, option) < 0:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)}: must be >= 0")
    if not 0 < args.energy <= 1:
        raise UsageError(f"--energy {args.energy}: must be in (0, 1]")
    if args.compressed_lr <= 0:
        raise UsageError(f"--compressed-lr {args.compressed_lr}: must be > 0")
    if not args.from_files:
        if args.ingredients < 2:
            raise UsageError(f"--ingredients {args.ingredients}: a soup needs at least 2 ingredients")
        if args.epochs == 0:
            raise UsageError(f"--epochs 0: the {args.ingredients} ingredients would all be the base model, a soup "
                             "of one; give --epochs >= 1 or --from FILE...")
    device = resolve_device(args.device)
    loaded = _check_ingredients(args, device)
    folder = output_folder(args, "soup")
    started = time.perf_counter()
    loaded = loaded or model_and_data(args, device)
    model, data = loaded.model, loaded.data
    try:
        doc = soup_experiment(
            model, data, arch=args.model, ingredients=args.from_files, n=args.ingredients, epochs=args.epochs,
            lrs=args.lrs, seed=args.seed, swa_cycles=args.swa_cycles, compressed=not args.no_compressed,
            energy=args.energy, compressed_epochs=args.compressed_epochs, compressed_lr=args.compressed_lr,
            device=device, log=print,
        )
    except ValueError as exc:  # ingredients that do not fit the model
        raise UsageError(str(exc)) from exc
    write_json(folder.path("soup.json"), doc)
    print(format_soup_table(doc))
    out = commit(folder)
    print(f"wrote {out}/soup.json in {time.perf_counter() - started:.1f}s")
    return 0


def _check_ingredients(args, device) -> ModelAndData | None:
    """The weight files checked before any work: ``--checkpoint`` and each ``--from`` file readable, finite and of
    the model's architecture, and at least 2 different ingredients. Returns the model and data where they had to
    be loaded for that (a model that is not built in), else None."""
    if not args.checkpoint and not args.from_files:
        return None
    loaded = None if args.model in BUILTIN_MODELS else model_and_data(args, device)
    template = build_builtin(args.model) if loaded is None else loaded.model
    try:
        if args.checkpoint:
            screen_files([args.checkpoint], "--checkpoint", model=template, model_name=args.model)
        if args.from_files:
            files = screen_files(args.from_files, "--from", model=template, model_name=args.model)
            require_distinct(files, 2, "--from", "a soup")
    except WeightFileError as exc:
        raise UsageError(str(exc)) from exc
    return loaded


def add_parser(sub) -> None:
    p = sub.add_parser("soup", help="fine-tuned variants, uniform and greedy soups and SWA, dense and "
                                    "compressed",
                       description="Fine-tune --ingredients variants of the model (or soup the --from files), then "
                                   "compare on validation and test: the best single ingredient, the uniform soup, "
                                   "the greedy soup and cyclical SWA; dense, and compressed (each ingredient "
                                   "factored on one plan, the soups averaged as dense B @ A and re-factored on the "
                                   "soup's own statistics). Writes soup.json.")
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
    p.add_argument("--lrs", type=positive_floats, default=[3e-4, 1e-3],
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
    add_threads_option(p)
    p.add_argument("--out", default=None, help="output folder (default: utilrank-out/soup-MODEL)")
    p.add_argument("--force", action="store_true", help="replace an --out folder that already holds results")
    p.set_defaults(func=run)
