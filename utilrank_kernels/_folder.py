"""Output folders written as a unit, one run at a time, and the manifest that says what a folder holds.

A run holds ``OUT.lock`` (``fcntl.flock``, the file beside the folder holding the run's pid) from ``prepare`` to
the end: a second run into the same folder is refused, naming the first one's pid. Under the lock it writes its
files into ``OUT.partial/``: a stable name, because it also keeps the statistics checkpoint that ``--resume``
continues from after a crash; the lock is what makes one name safe (two runs never share it).
``OutputFolder.commit`` writes ``manifest.json`` last (every file with its size and SHA-256, the command that made
it) and swaps the folder into place: with Linux's ``renameat2(RENAME_EXCHANGE)`` the swap is one atomic step, so a
kill at any point leaves either the previous folder or the complete new one, never a mix. A run that fails or is
refused after ``prepare`` leaves what was there before it (``release(failed=True)``): its ``OUT.partial/`` is
removed unless it holds a checkpoint that ``--resume`` can continue, and an earlier run's leftover partial folder
it had set aside comes back. ``verify_manifest`` checks a folder against its manifest (``load_compressed`` does).
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from . import env
from ._files import SchemaError, read_json, sha256, write_json
from ._version import __version__

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "utilrank.manifest/1"
SPACE_MARGIN = 16 << 20  # bytes kept free beyond what a command expects to write
logger = logging.getLogger(__name__)


class FolderError(ValueError):
    """The output folder cannot be used: one line naming the folder and what to do."""


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None where it has none; ``FolderError`` if it is unreadable or not a manifest
    (``_schemas.ManifestFile``: the file and the field)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return read_json(path, "manifest")
    except SchemaError as exc:
        raise FolderError(str(exc)) from exc
    except OSError as exc:
        raise FolderError(f"{path}: not a readable manifest ({exc.strerror or exc})") from exc


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


def _missing_parents(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` of ``folder`` would create, deepest first."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _pid_in(fd: int) -> str:
    """The pid a lock holder wrote into its lock file (it writes it just after locking: wait a moment for it)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return "unknown"


class OutputFolder:
    """The folder ``out`` of ``command``, checked and locked before any compute (``prepare``), filled in
    ``partial``, swapped into place by ``commit``; ``release`` gives the lock up (``commit`` does). A symbolic link
    as ``out`` is followed: the results go to its target, and the link stays as it is. Also a context manager:
    ``with OutputFolder(...).prepare() as folder:`` releases it, as failed where the block raises."""

    def __init__(self, out: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False,
                 lock: bool = True):
        self.given = self.out = Path(out)
        self.command, self.force, self.resume, self.lock = command, force, resume, lock
        self._fd: int | None = None
        self._made: list[Path] = []  # folders this run created (removed again when it fails)
        self._set_paths()

    def _set_paths(self) -> None:
        # one stable name, not one per run: --resume finds the interrupted run's checkpoint there; the lock makes it
        # safe (two runs into one folder never share it: the second is refused)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.lock_path = self.out.with_name(self.out.name + ".lock")
        self._aside = self.out.with_name(self.out.name + ".partial.previous")  # an earlier run's leftover partial
        self._had_partial = self._touched = self._complete = False

    @property
    def label(self) -> str:
        """``--out OUT`` as given, with the target where it is a link."""
        return f"--out {self.given}" + (f" (a link to {self.out})" if self.out != self.given else "")

    def prepare(self) -> OutputFolder:
        """Refuse a folder this run must not replace, one another run is writing, and one it cannot write, before
        any work is done; then hold its lock."""
        self._follow_link()
        if self.out.exists() and not self.out.is_dir():
            raise FolderError(f"{self.label}: exists and is not a folder")
        if not self.lock:  # a process that shares the folder of one that holds the lock (torchrun's ranks > 0)
            self.partial.mkdir(parents=True, exist_ok=True)
            return self
        self._take_lock()
        try:
            self._check_and_make_partial()
        except BaseException:
            self.release(failed=True)
            raise
        return self

    def _follow_link(self) -> None:
        if not self.given.is_symlink():
            return
        try:
            self.out = self.given.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # a loop (RuntimeError before Python 3.13)
            raise FolderError(f"--out {self.given}: a symbolic link that does not resolve ({exc})") from exc
        self._set_paths()

    def _take_lock(self) -> None:
        """``fcntl.flock`` on ``OUT.lock``; refused, naming the holder's pid, where another run holds it. A holder
        removes the file when it ends, so a lock taken on a file that has since been removed is taken again."""
        missing = _missing_parents(self.lock_path.parent)
        above = (missing[-1] if missing else self.lock_path).parent  # the folder that exists
        if not above.is_dir():
            raise FolderError(f"{self.label}: cannot write there ({above} is not a folder)")
        self._made = missing
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(10):
                try:
                    fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                except FileExistsError:
                    try:
                        fd = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
                    except FileNotFoundError:  # its holder just removed it
                        continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _pid_in(fd)
                    os.close(fd)
                    self._remove_made()
                    raise FolderError(f"{self.label}: another utilrank run (pid {pid}) is writing it (it holds "
                                      f"{self.lock_path}); wait for it to end, or choose another --out") from None
                if self._is_lock_file(fd):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    self._fd = fd
                    return
                os.close(fd)  # the file was removed (its holder ended) between our open and our lock: again
        except OSError as exc:
            self._remove_made()
            raise FolderError(f"{self.label}: cannot write there ({exc.strerror or exc})") from exc
        raise FolderError(f"{self.label}: could not lock {self.lock_path} (other runs keep replacing it)")

    def _is_lock_file(self, fd: int) -> bool:
        try:
            here, held = os.stat(self.lock_path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def _check_and_make_partial(self) -> None:
        """Under the lock: finish an interrupted swap, refuse a folder of results without ``force``, set an earlier
        run's leftover partial folder aside (or keep it to resume), and check that the partial folder is writable."""
        out = self.out
        replaced = out.with_name(out.name + ".replaced")
        if replaced.is_dir() and not out.exists():  # a swap without RENAME_EXCHANGE was interrupted
            os.rename(replaced, out)
            logger.warning(f"restored {out} from {replaced} (an earlier run was stopped while replacing it)")
        if out.is_dir() and any(out.iterdir()) and not self.force:
            doc = read_manifest(out) if (out / MANIFEST).is_file() else None
            maker = f"utilrank {doc['command']}" if doc else "something else (no manifest)"
            raise FolderError(f"{self.label}: holds files made by {maker}; --force replaces the folder, "
                              "or choose another --out")
        try:
            if self._aside.exists():  # a run killed while it had set a leftover aside: the newest partial wins
                if self.partial.exists():
                    shutil.rmtree(self._aside)
                else:
                    os.rename(self._aside, self.partial)
            self._had_partial, self._touched = self.partial.exists(), True
            if self._had_partial and not self.resume:
                os.rename(self.partial, self._aside)  # an interrupted run's leftovers: back if this run fails
            if not self.partial.exists():
                self._made = [*_missing_parents(self.partial)[:1], *self._made]
            self.partial.mkdir(parents=True, exist_ok=True)
            probe = self.partial / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise FolderError(f"{self.label}: cannot write there ({exc.strerror or exc})") from exc

    def resumable(self) -> bool:
        """Whether the partial folder holds a statistics checkpoint that ``--resume`` continues."""
        return self.partial.is_dir() and any(self.partial.glob("stats.ckpt*.safetensors"))

    def release(self, failed: bool = False) -> str:
        """Give the folder up. ``failed``: leave what was there before this run; the partial folder stays only
        where ``--resume`` can continue it (the returned note says so, for the error line; else "")."""
        note = ""
        if failed:
            note = self._undo()
        if self._fd is not None:
            if self._is_lock_file(self._fd):
                self.lock_path.unlink()  # removed while held: a run that opened it takes the lock on a new file
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if failed:
            self._remove_made()
        return note

    def _undo(self) -> str:
        """A failed run's partial folder: kept where it can be resumed, else removed (an earlier leftover back)."""
        if not self._touched or self._complete or (self.resume and self._had_partial):
            return ""  # not this run's; complete (the error names it); or the folder it resumed, still resumable
        if self.resumable():
            if self._aside.exists():
                shutil.rmtree(self._aside, ignore_errors=True)
            return f"{self.partial} is kept: --resume continues its statistics checkpoint"
        if self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)
        if self._aside.exists():
            os.rename(self._aside, self.partial)
        return ""

    def _remove_made(self) -> None:
        for folder in self._made:  # deepest first; only empty ones
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
        self._made = []

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, kind, exc, trace) -> None:
        self.release(failed=kind is not None)

    def require_space(self, needed_bytes: int) -> None:
        """Refuse a run whose files would not fit on the folder's disk."""
        free = shutil.disk_usage(self.partial).free
        if free < needed_bytes + SPACE_MARGIN:
            raise FolderError(f"{self.label}: {free / 2**20:.0f} MiB free on its disk, this run writes about "
                              f"{(needed_bytes + SPACE_MARGIN) / 2**20:.0f} MiB; free some space or choose "
                              "another --out")

    def path(self, name: str) -> Path:
        """Where a file of the result goes while the run lasts."""
        return self.partial / name

    def commit(self, argv: list[str] | None = None) -> Path:
        """Write the manifest (every file in the partial folder; checkpoints are deleted, they have done
        their job), swap the folder into place and release the lock; returns ``out``. A folder that cannot be
        swapped stays in ``partial``, and the error names it."""
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
        self._complete = True
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
            raise FolderError(f"{self.label}: could not move the finished results into place ({exc}); "
                              f"they are complete in {self.partial}") from exc
        if self._aside.exists():
            shutil.rmtree(self._aside, ignore_errors=True)  # the leftover this run replaced
        self._made = []
        self.release()
        return self.out
