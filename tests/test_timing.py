"""Timing helpers: interleaved rounds and their time budget."""

import time

from utilrank_kernels.timing import time_interleaved


def test_time_interleaved_alternates_and_counts():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = time_interleaved(fns, warmup=2, iters=4)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert calls == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    # a time budget ends the rounds early, after at least 5: each 10 ms step alone overruns 50 ms by then
    slow = {"a": lambda: time.sleep(0.01), "b": lambda: time.sleep(0.01)}
    times = time_interleaved(slow, warmup=0, iters=100, max_seconds=0.05)
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5}
