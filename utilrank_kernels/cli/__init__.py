"""The ``utilrank`` command: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.

Every command runs with no arguments on the built-in default."""

from __future__ import annotations

import argparse
import sys

from ._common import UsageError

# the order of ``utilrank --help``
COMMANDS = ("analyze", "compress", "bench", "spectrum", "soup")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="utilrank", description="Measure the utilized rank of every layer on its own data, factor the model to "
        "it, and run the factored model fast. Every command runs with no arguments on the built-in default.")
    parser.add_argument("--version", action="version", version=f"utilrank {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "energy", None) is not None and not 0 < args.energy <= 1:
        print(f"utilrank: error: --energy {args.energy}: must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"utilrank {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
