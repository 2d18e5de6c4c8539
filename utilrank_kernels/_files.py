"""File primitives every stage that writes or reads files shares: the cache folder, atomic writes with the
mode any new file gets, SHA-256 of a file, JSON, and safetensors reads whose failures are one line."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open

from . import env


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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


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
