"""_progress.ticking: the line keeps updating while the block runs, and is gone when it ends."""

from __future__ import annotations

import time

import pytest

from utilrank_kernels._progress import ticking


def test_ticking_refreshes_during_the_block_and_closes(capsys):
    with ticking("compiling x", interval=0.05):
        time.sleep(1.0)  # 20 intervals: at least a few refreshes even on a loaded machine
    err = capsys.readouterr().err
    assert err.count("compiling x: 00:0") >= 3
    last = err.rsplit("compiling x", 1)[1]
    assert last.endswith("\r") and last.rstrip("\r").split("\r")[-1].strip() == ""  # leave=False: blanked


def test_ticking_stops_its_thread_when_the_block_raises(capsys):
    import threading

    before = threading.active_count()
    with pytest.raises(RuntimeError), ticking("failing", interval=0.01):
        raise RuntimeError("boom")
    assert threading.active_count() == before


def test_ticking_disabled_writes_nothing(capsys):
    with ticking("quiet", interval=0.01, disable=True):
        time.sleep(0.1)
    assert "quiet" not in capsys.readouterr().err
