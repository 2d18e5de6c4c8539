"""Progress for work that reports none of its own (a ``torch.compile``, an export): a line that counts
the seconds, so that a long wait never looks like a hang."""

from __future__ import annotations

import contextlib
import threading

from tqdm.auto import tqdm


@contextlib.contextmanager
def ticking(desc: str, *, interval: float = 1.0, disable: bool = False):
    """A tqdm line ``desc: 00:03`` refreshed every ``interval`` seconds while the block runs (from a daemon
    thread: the block itself never reports), removed when it ends."""
    if disable:
        yield
        return
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=False)
    stop = threading.Event()

    def tick():
        while not stop.wait(interval):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
