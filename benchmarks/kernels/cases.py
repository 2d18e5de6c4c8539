"""A case: one op at one shape and dtype, and the implementations compared there, timed side by side into
``benchmarks.tools.rows.Row`` s. The kernel benchmarks declare their cases (``cublas.linear_cases``,
``covariance.syrk_cases``, ``cuda_small_m.graph_cases``, ...); :func:`measure_cases` times them with a timer:

- :func:`gpu_timer` on a GPU: ``rows.cuda_timing`` (``triton.testing.do_bench``'s CUDA events, L2 flushed),
  or CUDA-graph replays of many calls for an implementation that gives ``graph_calls`` (small M, where launch
  gaps would dominate);
- :class:`FakeTimer` in ``gpu_run.sh --dry-run`` on a CPU: made-up timings, after calling once every
  implementation that runs on CPU tensors (the torch paths), so that the cases' setup and the baselines' calls
  are exercised without a GPU.

A case's tensors are made when it is measured (``Case.build``) and dropped after, so a long list of cases
never holds all their inputs at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from benchmarks.tools.rows import Row, cuda_timing, first_line
from utilrank_kernels.timing import Timing


@dataclass(frozen=True)
class Impl:
    """One implementation: ``fn`` runs it once. ``cpu``: it runs on CPU tensors (the dry run calls it);
    ``graph_calls``: time it as one CUDA graph of these calls (each on its own copy of the weights) instead
    of ``fn`` alone; ``extra``: fields for its row (the roofline's ideal, an error measured at build time;
    ``bytes`` and ``flops`` of one call give the row ``gbps`` and ``tflops``)."""

    fn: Callable[[], object]
    cpu: bool = False
    graph_calls: Sequence[Callable[[], object]] | None = None
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """``build()`` makes the inputs and returns ``{impl name: Impl}``; every row of the case is compared
    with the ``baselines`` among them (measured in the same run)."""

    op: str
    layer: str
    dtype: str
    shape: Mapping[str, object]
    build: Callable[[], Mapping[str, Impl]]
    baselines: tuple[str, ...] = ()
    extra: Mapping[str, object] = field(default_factory=dict)


Timer = Callable[[str, Impl], Timing]


def scaled_rows(rows: int, max_rows: int | None) -> int:
    """``rows``, or for the dry run's CPU (``max_rows`` given) a thousandth of it, at least 1 and at most
    ``max_rows`` (12608 -> 13, 197 -> 1: the cases stay distinct)."""
    return rows if max_rows is None else max(1, min(max_rows, -(-rows // 1000)))


def time_graph(calls: Sequence[Callable[[], object]], reps: int = 30) -> Timing:
    """Per-call time of ``calls`` captured into one CUDA graph and replayed ``reps`` times (CUDA events)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls[:3]:  # warm-up (Triton autotuning, lazy init, a measured choice) off the capturing stream
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    seconds = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / len(calls))
    return Timing.of(seconds)


def gpu_timer(name: str, impl: Impl) -> Timing:
    """CUDA-graph replays where the implementation gives ``graph_calls``, else ``do_bench``'s protocol."""
    with torch.inference_mode():
        if impl.graph_calls is not None:
            return time_graph(list(impl.graph_calls))
        return cuda_timing(impl.fn)


class FakeTimer:
    """The dry run's timer: calls a CPU-capable implementation once (its errors surface as on a GPU), then
    returns made-up timings, 10, 11, 12, ... microseconds in call order."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures: list[str] = []  # "name: error" of each CPU-capable implementation that raised

    def __call__(self, name: str, impl: Impl) -> Timing:
        if impl.cpu:
            try:
                with torch.inference_mode():
                    impl.fn()
                    if impl.graph_calls:  # the last copy's call: the closures bind their own weights
                        impl.graph_calls[-1]()
            except Exception as exc:
                self.failures.append(f"{name}: {first_line(exc)}")
                raise
        self.calls += 1
        us = 10.0 + self.calls
        return Timing(us / 1e3, 0.98 * us / 1e3, 1.02 * us / 1e3)


def skipped_row(case: Case, why: str) -> Row:
    return Row(case.op, "-", case.dtype, case.shape, None, extra={"layer": case.layer, **case.extra, "skipped": why})


def case_rows(case: Case, timer: Timer) -> list[Row]:
    """One row per implementation of ``case``, each with the case's baselines measured beside it; an
    implementation that cannot run is a row with its error (a finding, not the end of the run)."""
    try:
        impls = case.build()
    except Exception as exc:  # the inputs could not be made (memory, a missing op): the case says why
        return [Row(case.op, "-", case.dtype, case.shape, None, extra={"layer": case.layer, **case.extra},
                    error=first_line(exc))]
    timings: dict[str, Timing | None] = {}
    errors: dict[str, str] = {}
    for name, impl in impls.items():
        try:
            timings[name] = timer(name, impl)
        except Exception as exc:  # an implementation that cannot run this case (not built, too wide, ...)
            timings[name], errors[name] = None, first_line(exc)
    rows = []
    for name, impl in impls.items():
        timing = timings[name]
        baselines = {b: timings[b] for b in case.baselines if b != name and timings.get(b) and timing}
        extra = {"layer": case.layer, **case.extra, **impl.extra}
        if timing and "bytes" in extra:
            extra["gbps"] = extra["bytes"] / (timing.median * 1e-3) / 1e9
        if timing and "flops" in extra:
            extra["tflops"] = extra["flops"] / (timing.median * 1e-3) / 1e12
        rows.append(Row(case.op, name, case.dtype, case.shape, timing, baselines, extra, errors.get(name)))
    return rows


def row_line(row: Row) -> str:
    """``  vit_b.fc1 M=12608 triton-fused   41.2 us  x1.20 vs torch``: one row as a progress line."""
    shape = " ".join(f"{k}={v}" for k, v in row.shape.items())
    if row.timing is None:
        return f"  {row.extra.get('layer', row.op)} {shape} {row.impl}: {row.error or row.extra.get('skipped')}"
    ratios = "  ".join(f"x{row.speedup(b):.2f} vs {b}" for b in row.baselines)
    return f"  {row.extra.get('layer', row.op)} {shape} {row.impl:16s} {row.timing.median * 1e3:9.1f} us  {ratios}"


def measure_cases(cases: Sequence[Case], timer: Timer, *, deadline: float | None = None,
                  on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Every case's rows; cases reached after ``deadline`` (``time.monotonic()``) are rows that say they were
    skipped. ``on_row`` sees each row as it comes (a results file rewritten as the run goes)."""
    rows: list[Row] = []
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            new = [skipped_row(case, "step time limit")]
        else:
            new = case_rows(case, timer)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for row in new:
            print(row_line(row), flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
