"""The command's output folder: checked and locked before any compute, written as ``OUT.partial/``, swapped into
place by ``commit``; a folder problem is a usage error. The folders a command holds are given up by ``main`` when it
ends (``release_folders``): a run that fails leaves what was there before it."""

from __future__ import annotations

from pathlib import Path

from .. import env
from .._folder import FolderError, OutputFolder
from ._options import UsageError

_HELD: list[OutputFolder] = []  # the folders this command has prepared and not yet committed


def output_folder(args, command: str) -> OutputFolder:
    """The command's ``--out`` folder, checked before any compute: writable, not being written by another run
    (its lock), and not a folder of results this run must not replace (``--force``). Files go to ``OUT.partial/``
    until ``commit``. Under torchrun only rank 0 takes the lock; the other ranks write into the folder it holds."""
    out = Path(args.out or f"utilrank-out/{command}-{Path(args.model.removeprefix('hf:')).name}")
    folder = OutputFolder(out, command, force=args.force, resume=getattr(args, "resume", False),
                          lock=env.get("RANK", "0") == "0")
    try:
        folder.prepare()
    except FolderError as exc:
        raise UsageError(str(exc)) from exc
    _HELD.append(folder)
    return folder


def commit(folder: OutputFolder) -> Path:
    """Swap the finished folder into place and give up its lock; if that fails the results stay where the error
    says."""
    try:
        out = folder.commit()
    except FolderError as exc:
        raise UsageError(str(exc)) from exc
    if folder in _HELD:
        _HELD.remove(folder)
    return out


def release_folders(failed: bool) -> list[str]:
    """Give up every folder the command still holds (``failed``: it ended in an error, so each is left as it was
    before the run, but for a checkpoint ``--resume`` can continue); the notes say what was kept."""
    notes = [folder.release(failed=failed) for folder in _HELD]
    _HELD.clear()
    return [note for note in notes if note]


def held_folders() -> list[OutputFolder]:
    """The folders the command holds now (the error line names them)."""
    return list(_HELD)
