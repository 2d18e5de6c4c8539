"""File primitives every stage that writes or reads files shares: the cache folder, atomic writes with the
mode any new file gets, SHA-256 of a file, JSON read through a schema, and safetensors reads whose failures are
one line."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open

from . import env


class SchemaError(ValueError):
    """A file that is not what its reader expects (not JSON, a field of the wrong type or out of range): one line
    naming the file and the field, ``PATH: field a.b: expected ..., got ...``."""


def cache_dir() -> Path:
    root = Path(env.get("UTILRANK_CACHE") or Path.home() / ".cache" / "utilrank")
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.cache
def file_mode() -> int:
    """The mode new files get under the process umask (``mkstemp`` alone would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # mkstemp made it 0600: give it the mode any new file gets
        os.replace(tmp, path)
    except SafetensorError as exc:  # safetensors reports a full disk as its own error: give it the errno and path
        code = _io_errno(str(exc))
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc
    except OSError as exc:  # a write that failed (a full disk): name the file, not its temporary name
        if exc.filename not in (None, tmp) or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _io_errno(message: str) -> int | None:
    """The errno of an I/O failure that a Rust library (safetensors) reports as text: ``... (os error 28)``."""
    match = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", message)
    if match:
        return int(match.group(1) or match.group(2))
    return errno.ENOSPC if "No space left on device" in message else None


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, kind: str, what: str = "") -> dict:
    """The JSON file at ``path`` checked against the schema of its ``kind`` (``_schemas.SCHEMAS``: "plan",
    "config", "manifest", "report", "summary", "statistics"): the document as written (the fields it holds, none
    added), or ``SchemaError`` naming the file (after ``what``, e.g. "plan") and the first field that is wrong. A
    missing file is ``FileNotFoundError``."""
    path = Path(path)
    source = f"{what} {path}" if what else str(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{source}: not JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc
    return parse_json(text, kind, source)


def parse_json(text: str, kind: str, source: str) -> dict:
    """``read_json`` for JSON text held elsewhere (a safetensors header); ``source`` names it in the error."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{source}: not JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from exc
    # pydantic is imported only where a file is validated: the kernels and the GPU machines' image (which has no
    # pydantic) import the package without it
    from . import _schemas

    try:
        return _schemas.validate(doc, kind)
    except _schemas.Invalid as exc:
        raise SchemaError(f"{source}: {exc}") from None


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, what: str, device: str = "cpu"):
    """``safe_open`` whose failures (a truncated file, another format) are one ``ValueError`` naming the
    file and what it should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{what} {path}: not a readable safetensors file ({exc})") from exc
    with handle as f:
        try:
            yield f
        except SafetensorError as exc:
            raise ValueError(f"{what} {path}: damaged safetensors file ({exc})") from exc


def load_safetensors(path: str | os.PathLike, what: str, device: str = "cpu") -> dict:
    """Every tensor of a safetensors file, with ``open_safetensors``'s errors."""
    with open_safetensors(path, what, device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
