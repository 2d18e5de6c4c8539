"""The ``utilrank`` command: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.

Every command runs with no arguments on the built-in default."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .._version import __version__
from ._options import UsageError

# the order of ``utilrank --help``
COMMANDS = ("analyze", "compress", "bench", "export", "spectrum", "soup", "regions", "predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="utilrank", description="Measure the utilized rank of every layer on its own data, factor the model to "
        "it, and run the factored model fast. Every command runs with no arguments on the built-in default.")
    parser.add_argument("--version", action="version", version=f"utilrank {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).add_parser(sub)
    return parser


def _log_to_terminal() -> None:
    """The library logs (``logging.getLogger("utilrank_kernels")``); the command shows its INFO messages
    on stderr, beside the progress bars, as plain lines."""
    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is when a message comes (a test's capture, a redirect)."""

        stream = property(lambda self: sys.stderr, lambda self, value: None)

    logger = logging.getLogger("utilrank_kernels")
    if not any(type(h).__name__ == "CurrentStderr" for h in logger.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_terminal()
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
