"""The command's output folder: checked before any compute, written as ``OUT.partial/``, swapped into place by
``commit``; a folder problem is a usage error."""

from __future__ import annotations

from pathlib import Path

from .._folder import FolderError, OutputFolder
from ._options import UsageError


def output_folder(args, command: str) -> OutputFolder:
    """The command's ``--out`` folder, checked before any compute: writable, and not a folder of results this
    run must not replace (``--force``). Files go to ``OUT.partial/`` until ``commit``."""
    out = Path(args.out or f"utilrank-out/{command}-{Path(args.model.removeprefix('hf:')).name}")
    try:
        return OutputFolder(out, command, force=args.force, resume=getattr(args, "resume", False)).prepare()
    except FolderError as exc:
        raise UsageError(str(exc)) from exc


def commit(folder: OutputFolder) -> Path:
    """Swap the finished folder into place; if that fails the results stay where the error says."""
    try:
        return folder.commit()
    except FolderError as exc:
        raise UsageError(str(exc)) from exc
