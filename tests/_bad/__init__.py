"""One bad input for ``tests/cli/test_bad_inputs.py``: the command line, the files it needs, and the words its one line
must hold. ``{tmp}`` in ``argv`` and ``words`` is the case's folder (also the working directory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bad:
    id: str
    argv: tuple[str, ...]
    words: tuple[str, ...]  # each must appear in the one line (the input's name, what is wrong)
    setup: Callable[[Path], None] | None = None  # builds the case's files under the folder
    patch: Callable[..., None] | None = None  # (monkeypatch, folder): inject a failure after setup
    stdin: str | None = None
