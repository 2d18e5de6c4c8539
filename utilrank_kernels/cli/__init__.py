"""The ``utilrank`` command: one module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.

Every command runs with no arguments on the built-in default. Every input or environment problem it knows (a bad
option or file, a folder in use, a full disk, a missing optional package) ends in one line on stderr,
``utilrank COMMAND: error: ...``, and exit status 2; ``utilrank --debug COMMAND`` shows the traceback instead.
Anything else is a bug, and shows its traceback."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from typing import NoReturn

from safetensors import SafetensorError

from .._files import SchemaError
from .._folder import FolderError, OutputFolder
from .._version import __version__
from ..models import ModelDataError
from ._options import UsageError
from ._output import held_folders, release_folders

# the order of ``utilrank --help``
COMMANDS = ("analyze", "compress", "bench", "export", "spectrum", "soup", "regions", "predict")
KNOWN = (UsageError, FolderError, SchemaError, ModelDataError)  # their message is the line
OPTIONAL = {"transformers": "hf", "tokenizers": "hf", "onnx": "deploy", "onnxscript": "deploy",
            "onnxruntime": "deploy", "weightwatcher": "test"}  # optional packages and the extra that installs them
# errors of the environment (a file's system, not the code): their words; those after ENOSPC need a path to be one
OS_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.EROFS: "read-only file system", errno.ENOENT: "no such file or folder",
             errno.ENOTDIR: "not a folder", errno.EISDIR: "is a folder"}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line refusals, ``utilrank CMD: error: MESSAGE (see utilrank CMD --help)``, exit
    status 2, instead of the usage block (the subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's, but an option the command does not know is refused by the command's parser (its name in
        the line), not the top level's."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            subparsers = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            chosen = [a.choices.get(getattr(parsed, a.dest, None)) for a in subparsers]
            hint = "; --debug goes before the command: utilrank --debug COMMAND ..." if "--debug" in extras else ""
            (next((p for p in chosen if p is not None), self)).error(
                f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="utilrank", description="Measure the utilized rank of every layer on its own data, factor the model to "
        "it, and run the factored model fast. Every command runs with no arguments on the built-in default.")
    parser.add_argument("--version", action="version", version=f"utilrank {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one line (give it before the command)")
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
        print(f"utilrank {args.command}: error: --energy {args.energy}: must be in (0, 1]", file=sys.stderr)
        return 2
    code = None
    try:
        code = args.func(args)
        return code
    except Exception as exc:
        held = held_folders()
        notes = release_folders(failed=True)  # a failed run leaves what was there before it
        line = failure_line(exc, held)
        if line is None or args.debug:
            raise
        print(f"utilrank {args.command}: error: {'; '.join([line, *notes])}", file=sys.stderr)
        return 2
    finally:  # a run that ended otherwise (a non-zero status, Ctrl-C) gives its folders up too
        release_folders(failed=code != 0)


def failure_line(exc: BaseException, held: list[OutputFolder] = ()) -> str | None:
    """The one line of a known input or environment failure, None for anything else (a bug: its traceback)."""
    if isinstance(exc, KNOWN):
        return _one_line(str(exc))
    if isinstance(exc, SafetensorError):  # a safetensors read or write outside _files' wrappers
        return _one_line(f"safetensors: {exc}")
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in OPTIONAL:
        name = exc.name.split(".")[0]
        return f"needs the optional package {name}: pip install -e '.[{OPTIONAL[name]}]' (or pip install {name})"
    if isinstance(exc, OSError) and exc.errno in OS_ERRORS and (exc.filename or exc.errno in DISK_FULL):
        return _os_line(exc, held)
    return None


def _os_line(exc: OSError, held: list[OutputFolder]) -> str:
    """``PATH: what`` (the OS's words); where an output folder was being written, named first, and whether its
    previous contents are untouched (they are: the run wrote only into OUT.partial/)."""
    what = OS_ERRORS[exc.errno]
    path = f"{exc.filename}: " if exc.filename else ""
    if not held:
        return f"{path}{what}"
    folder = held[0]
    before = (f"{folder.out} is as it was before this run" if folder.out.exists()
              else f"{folder.out} was not written")
    hint = "; free some space or choose another --out" if exc.errno in DISK_FULL else ""
    return f"{folder.label}: {what}" + (f" writing {exc.filename}" if exc.filename else "") + f"; {before}{hint}"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
