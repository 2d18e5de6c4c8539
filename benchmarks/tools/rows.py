"""The one row type of the kernel and model benchmarks, and where their results go.

A :class:`Row` carries what makes a measurement comparable (STYLE; Liger-Kernel's ``BenchmarkDataCSVRow``): the
op and implementation, dtype, shape, the median and p20/p80 in milliseconds (``utilrank_kernels.timing.Timing``)
and every baseline measured beside it in the same run, so that a row's ratios are side-by-side measurements.
:func:`environment` adds the device and the torch/triton versions; result files are
``benchmarks/results/<device>_<what>.json`` (:func:`result_path`), written atomically (:func:`write_rows`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utilrank_kernels._files import write_json
from utilrank_kernels.timing import Timing, device_label, device_slug, step_times, versions

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROWS_FORMAT = "utilrank.bench-rows/1"


@dataclass(frozen=True)
class Row:
    """One implementation of one op at one shape and dtype; ``timing`` None where it could not run (``error``
    says why). ``baselines``: name -> timing of what it is compared with, measured in the same run."""

    op: str
    impl: str
    dtype: str
    shape: Mapping[str, object]
    timing: Timing | None
    baselines: Mapping[str, Timing] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)
    error: str | None = None

    def speedup(self, baseline: str) -> float | None:
        """How many times faster than ``baseline`` (its median over this row's)."""
        base = self.baselines.get(baseline)
        return base.median / self.timing.median if base and self.timing else None

    def as_dict(self, env: Mapping[str, object] = ()) -> dict:
        """Flat: ``median_ms``, ``p20_ms``, ``p80_ms``, then per baseline ``<name>_median_ms`` (p20, p80) and
        ``speedup_vs_<name>``, the extra fields, the error, and ``env`` (device, versions)."""
        out: dict = {"op": self.op, "impl": self.impl, "dtype": self.dtype, "shape": dict(self.shape)}
        if self.timing:
            out |= {f"{k}_ms": v for k, v in self.timing.as_dict().items()}
        for name, base in self.baselines.items():
            out |= {f"{name}_{k}_ms": v for k, v in base.as_dict().items()}
            out[f"speedup_vs_{name}"] = self.speedup(name)
        out |= dict(self.extra)
        if self.error:
            out["error"] = self.error
        return out | dict(env)


def against_dense(op: str, dtype: str, shape: Mapping[str, object], times: Mapping[str, list[float]],
                  extra: Mapping[str, object] = (), digits: int = 3) -> list[Row]:
    """The dense row, then every other implementation's row with the dense timing as its baseline (``times``:
    seconds per step by implementation, ``"dense"`` among them, measured interleaved); prints one line."""
    dense = Timing.of(times["dense"])
    rows = [Row(op, "dense", dtype, shape, dense)]
    rows += [Row(op, impl, dtype, shape, Timing.of(t), {"dense": dense}, dict(extra))
             for impl, t in times.items() if impl != "dense"]
    print(f"{op} {dtype} {dict(shape)}: dense {dense.median:.{digits}f} ms, " + ", ".join(
        f"{r.impl} {r.timing.median:.{digits}f} ms (x{r.speedup('dense'):.2f})" for r in rows[1:]), flush=True)
    return rows


def environment(device: str | torch.device = "cpu") -> dict:
    """The device's name, the torch/triton (and CUDA) versions, torch's threads and the date."""
    device = torch.device(device)
    return {"device": device_label(device), **versions(),
            "cuda_version": torch.version.cuda if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()}


def result_path(what: str, device: str | torch.device = "cpu", out: str | Path | None = None) -> Path:
    """``out`` if given, else ``benchmarks/results/<device>_<what>.json``."""
    return Path(out) if out else RESULTS / f"{device_slug(device)}_{what}.json"


def write_rows(path: Path, benchmark: str, rows: list[Row], env: Mapping[str, object], **meta) -> Path:
    """A results file of :class:`Row` s: ``{"format", "benchmark", **env, **meta, "rows": [...]}``, each row
    carrying ``env`` too (a row is comparable on its own)."""
    write_json(path, {"format": ROWS_FORMAT, "benchmark": benchmark, **env, **meta,
                      "rows": [row.as_dict(env) for row in rows]})
    return path


def cpu_timing(fn: Callable[[], object], *, warmup: int = 10, iters: int = 40,
               device: torch.device | None = None) -> Timing:
    """``fn``'s time per call by ``timing.step_times`` (timm's 10 warm-up and 40 timed calls)."""
    return Timing.of(step_times(fn, warmup=warmup, iters=iters, device=device))


def cuda_timing(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """``fn``'s time per call on the GPU: ``triton.testing.do_bench``'s protocol (CUDA events, the L2 flushed
    before every call, about ``rep_ms`` of calls), every sample kept and summarized as ``Timing``."""
    from triton.testing import do_bench  # triton: only the GPU benchmarks need it

    times_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return Timing.of([t / 1e3 for t in times_ms])


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``RuntimeError: what went wrong``: an exception as one line, for a row that could not run."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"
