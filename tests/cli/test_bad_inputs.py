"""Bad and unusual inputs, each refused the same way: exit code 2, one line on stderr naming the input, no
traceback, nothing written, nothing earlier changed.

The cases live in ``tests/_bad/``, one module per class of input (each a list ``CASES`` of ``Bad``); this file
runs them all and counts them. A case builds its files under a fresh folder (``setup``), may
inject a failure (``patch``: a disk that fills, a free-space figure), and runs ``utilrank`` in this process.
The whole folder is hashed before and after: a refused run leaves every earlier file as it was and no new one
(no ``OUT.partial``, no half-written output)."""

from __future__ import annotations

import hashlib
import importlib
import io
import pkgutil
from pathlib import Path

import _bad
import pytest
from _bad import Bad

from utilrank_kernels.cli import main

CLASSES = sorted(f"_bad.{m.name}" for m in pkgutil.iter_modules(_bad.__path__))
CASES: list[Bad] = [case for name in CLASSES for case in importlib.import_module(name).CASES]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and symlink under ``root`` with its content hash (a link: its target)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            tree[rel] = "-> " + str(path.readlink())
        elif path.is_file():
            tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            tree[rel] = "dir"
    return tree


def run_refused(case: Bad, tmp_path: Path, monkeypatch, capsys) -> str:
    """Run ``case`` and check the refusal; returns the one line."""
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    if case.stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(case.stdin))
    capsys.readouterr()
    try:
        code = main([a.format(tmp=tmp_path) for a in case.argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err
    assert code == 2, (code, captured.err)
    assert len(lines) == 1, lines
    for word in case.words:
        assert word.format(tmp=tmp_path) in lines[0], (word, lines[0])
    after = snapshot(tmp_path)
    assert after == before, {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                             if before.get(k) != after.get(k)}
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_line_with_nothing_written(case, tmp_path, monkeypatch, capsys):
    run_refused(case, tmp_path, monkeypatch, capsys)


def test_at_least_100_cases_in_every_class():
    by_class = {name: len(importlib.import_module(name).CASES) for name in CLASSES}
    assert sum(by_class.values()) >= 100, by_class
    assert all(by_class.values()), by_class
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
