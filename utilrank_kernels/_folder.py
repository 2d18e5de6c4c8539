"""Output folders written as a unit, and the manifest that says what a folder holds.

A command writes its files into ``OUT.partial/`` (a stable name: it also keeps the statistics checkpoint
that ``--resume`` continues from). ``OutputFolder.commit`` writes ``manifest.json`` last (every file with
its size and SHA-256, the command that made it) and swaps the folder into place: with Linux's
``renameat2(RENAME_EXCHANGE)`` the swap is one atomic step, so a kill at any point leaves either the
previous folder or the complete new one, never a mix. ``verify_manifest`` checks a folder against its
manifest (``load_compressed`` does).
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from . import env
from ._files import sha256, write_json
from ._version import __version__

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "utilrank.manifest/1"
SPACE_MARGIN = 16 << 20  # bytes kept free beyond what a command expects to write
logger = logging.getLogger(__name__)


class FolderError(ValueError):
    """The output folder cannot be used: one line naming the folder and what to do."""


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None where it has none; ``FolderError`` if it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FolderError(f"{path}: not a readable manifest ({exc})") from exc
    if doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), dict):
        raise FolderError(f"{path}: not a {MANIFEST_FORMAT} file")
    return doc


def verify_manifest(folder: str | os.PathLike, required: tuple[str, ...] = ()) -> dict | None:
    """Check every file the manifest lists (size and SHA-256); ``FolderError`` naming the first that differs.
    Returns the manifest (None for a folder without one: written by hand, or by an older version)."""
    folder = Path(folder)
    doc = read_manifest(folder)
    if doc is None:
        return None
    for name in required:
        if name not in doc["files"]:
            raise FolderError(f"{folder}: its manifest does not list {name} (made by {doc.get('command')})")
    for name, entry in doc["files"].items():
        path = folder / name
        if not path.is_file():
            raise FolderError(f"{folder}: {name} is missing (the manifest lists it)")
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise FolderError(f"{folder}: {name} differs from the manifest (changed or copied incompletely)")
    return doc


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS cannot."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # filesystem or kernel without it
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


def test_kill(point: str) -> None:
    """Tests only: ``UTILRANK_TEST_KILL_AT=point`` kills the process there (as ``kill -9`` would)."""
    if env.get("UTILRANK_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


class OutputFolder:
    """The folder ``out`` of ``command``, checked before any compute (``prepare``), filled in ``partial``,
    swapped into place by ``commit``."""

    def __init__(self, out: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.command, self.force, self.resume = command, force, resume

    def prepare(self) -> OutputFolder:
        """Refuse a folder this run must not replace, and one it cannot write, before any work is done."""
        out = self.out
        replaced = out.with_name(out.name + ".replaced")
        if replaced.is_dir() and not out.exists():  # a swap without RENAME_EXCHANGE was interrupted
            os.rename(replaced, out)
            logger.warning(f"restored {out} from {replaced} (an earlier run was stopped while replacing it)")
        if out.exists() and not out.is_dir():
            raise FolderError(f"--out {out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not self.force:
            doc = read_manifest(out) if (out / MANIFEST).is_file() else None
            maker = f"utilrank {doc['command']}" if doc else "something else (no manifest)"
            raise FolderError(f"--out {out}: holds files made by {maker}; --force replaces the folder, "
                              "or choose another --out")
        try:
            if self.partial.exists() and not self.resume:
                shutil.rmtree(self.partial)  # an interrupted run's leftovers: this run starts over
            self.partial.mkdir(parents=True, exist_ok=True)
            probe = self.partial / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise FolderError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc
        return self

    def require_space(self, needed_bytes: int) -> None:
        """Refuse a run whose files would not fit on the folder's disk."""
        free = shutil.disk_usage(self.partial).free
        if free < needed_bytes + SPACE_MARGIN:
            raise FolderError(f"--out {self.out}: {free / 2**20:.0f} MiB free on its disk, this run writes about "
                              f"{(needed_bytes + SPACE_MARGIN) / 2**20:.0f} MiB")

    def path(self, name: str) -> Path:
        """Where a file of the result goes while the run lasts."""
        return self.partial / name

    def commit(self, argv: list[str] | None = None) -> Path:
        """Write the manifest (every file in the partial folder; checkpoints are deleted, they have done
        their job) and swap the folder into place; returns ``out``. A folder that cannot be swapped stays in
        ``partial``, and the error names it."""
        files = {}
        for path in sorted(p for p in self.partial.rglob("*") if p.is_file()):
            name = path.relative_to(self.partial).as_posix()
            if name == MANIFEST or name.endswith(".tmp") or ".ckpt" in name:
                continue
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        doc = {"format": MANIFEST_FORMAT, "command": self.command,
               "argv": list(sys.argv[1:] if argv is None else argv), "version": __version__,
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "files": files}
        for path in list(self.partial.glob("*.ckpt*")):  # the checkpoint has done its job
            path.unlink()
        test_kill("before-manifest")
        write_json(self.partial / MANIFEST, doc)
        test_kill("before-swap")
        try:
            if self.out.is_dir() and _exchange(self.partial, self.out):
                test_kill("after-swap")
                shutil.rmtree(self.partial)  # the previous folder, now under the partial name
            else:
                old = self.out.with_name(self.out.name + ".replaced")
                if self.out.exists():
                    if old.exists():
                        shutil.rmtree(old)
                    os.rename(self.out, old)
                os.rename(self.partial, self.out)
                if old.exists():
                    shutil.rmtree(old)
        except OSError as exc:
            raise FolderError(f"--out {self.out}: could not move the finished results into place ({exc}); "
                              f"they are complete in {self.partial}") from exc
        return self.out
