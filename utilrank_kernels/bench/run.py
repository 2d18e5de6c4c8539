"""``bench``: dense and compressed models timed interleaved, one row per (engine, dtype, batch size, backend).

Within an engine (``bench.engines``) the dense model and the compressed variants are timed interleaved, so a
busy machine slows them alike; the engines are timed one after the other. Rows are timm's fields plus what
makes them comparable (``bench.output`` writes them). Compressed rows of PyTorch engines list the backend each
factored layer ran (``layer_backends``, from an eager pass before the engine's steps: on CUDA, the pass that
makes the measured choices, ``ops/_tune.py``, for keys not yet recorded; ``tune=True`` times them all again).
"""

from __future__ import annotations

import copy
import datetime
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._progress import ticking
from ..compress.summary import SPREAD_LIMIT
from ..measure import count_flops, count_params
from ..nn import layer_backends, set_backend, tune
from ..timing import Timing, cpu_thp_alloc, device_label, step_times, time_interleaved, versions
from .engines import (
    DTYPES,
    ENGINES,
    backend_problem,
    engine_versions,
    example_input,
    make_step,
    onnxruntime_model,
    quiet_cpu_compile,
)
from .output import format_row

logger = logging.getLogger(__name__)


def realized(dense_ms: float, compressed_ms: float, dense_flops: int, compressed_flops: int) -> dict:
    """The compressed row's ratios: measured speedup, FLOP ratio, and the fraction of it realized."""
    speedup = dense_ms / compressed_ms
    theoretical = dense_flops / compressed_flops
    return {"speedup": round(speedup, 4), "theoretical_speedup": round(theoretical, 4),
            "realized_fraction": round(speedup / theoretical, 4)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def bench(
    dense: nn.Module,
    compressed: nn.Module,
    *,
    model_name: str,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 64),
    dtypes: Sequence[str] = ("fp32",),
    backends: Sequence[str] = ("auto",),
    engines: Sequence[str] = ("eager",),
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    cuda_graphs: bool = False,
    warmup: int = 10,
    iters: int = 40,
    max_seconds: float | None = None,
    extra: dict | None = None,
    log: Callable[[str], None] | None = None,
    tune: bool = False,
) -> list[dict]:
    """The rows of one run: per dtype, engine and batch size, one dense row and one compressed row per
    backend (the onnxruntime engine: one, the exported torch path), timed interleaved within the engine;
    engines one after the other (each has its own threads). ``max_seconds`` ends a configuration's timed
    rounds early (after at least 5). ``tune``: on CUDA, each compressed model's measured backend choices are
    timed anew on each batch before its steps (``nn.tune(..., retune=True)``), once per dtype and batch size.
    Backends that cannot run on ``device`` at all are skipped with a message; an engine or backend that fails
    (not installed, export or compile error) is a row with its ``error``; the dense model failing in eager
    PyTorch raises."""
    log = log or logger.info
    device = torch.device(device)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"engine {unknown[0]!r}: choose from {', '.join(ENGINES)}")
    dense, compressed = dense.float().cpu().eval(), compressed.float().cpu().eval()
    x1 = example_input(input_shape, 1)  # a TokenInput shape: a dict of token ids and a mask
    flops = {"dense": count_flops(dense, x1), "compressed": count_flops(set_backend(compressed, "torch"), x1)}
    params = {"dense": count_params(dense), "compressed": count_params(compressed)}
    usable = _usable_backends(backends, device, log)
    common = {"device": device_label(device), **versions(), **engine_versions(engines),
              "channels_last": channels_last, "cuda_graphs": cuda_graphs,
              "date": datetime.date.today().isoformat(), **(extra or {})}
    if device.type == "cpu":
        common.update(threads=torch.get_num_threads(), thp_mem_alloc=cpu_thp_alloc())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if tune and device.type != "cuda":
        log(f"tune: nothing is timed on {device.type} (the torch path runs)")
    run = _Run(model_name, input_shape, batch_sizes, device, fmt, cuda_graphs, warmup, iters, max_seconds,
               flops, params, common, log, tune)
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        models = {"dense": copy.deepcopy(dense).to(device=device, dtype=dtype, memory_format=fmt)}
        for b in usable:
            m = compressed if len(usable) == 1 else copy.deepcopy(compressed)
            models[b] = set_backend(m.to(device=device, dtype=dtype, memory_format=fmt), b)
        for engine in dict.fromkeys(engines):
            rows += run.engine_rows(engine, dtype_name, models)
    return rows


def _usable_backends(backends: Sequence[str], device: torch.device, log: Callable[[str], None]) -> list[str]:
    """The requested backends that can run on ``device`` (each other one skipped with a message)."""
    usable = []
    for b in dict.fromkeys(backends):
        problem = backend_problem(b, device)
        if problem:
            log(f"skipped: {problem}")
        else:
            usable.append(b)
    if not usable:
        raise ValueError(f"no requested backend ({', '.join(backends)}) can run on {device.type}")
    return usable


@dataclass
class _Run:
    """One ``bench`` call's settings, and the rows of one engine at one dtype."""

    model_name: str
    input_shape: Sequence[int]
    batch_sizes: Sequence[int]
    device: torch.device
    fmt: torch.memory_format
    cuda_graphs: bool
    warmup: int
    iters: int
    max_seconds: float | None
    flops: dict[str, int]
    params: dict[str, int]
    common: dict
    log: Callable[[str], None]
    tune: bool = False
    tuned: set = field(default_factory=set)  # (backend, dtype, batch size) already tuned in this run

    def _input(self, batch: int, dtype: torch.dtype):
        return example_input(self.input_shape, batch, dtype, self.device, self.fmt)

    def _error_row(self, engine: str, key: str, dtype_name: str, batch: int, error: str) -> dict:
        self.log(f"failed: {engine} {key} at {dtype_name}, batch {batch}: {error}")
        return {"model": self.model_name, "variant": "dense" if key == "dense" else "compressed",
                "backend": "torch" if key == "dense" else key, "engine": engine, "dtype": dtype_name,
                "batch_size": batch, "error": error, **self.common}

    def _runners(self, engine: str, models: dict[str, nn.Module], dtype: torch.dtype, folder: str):
        """What runs each model in ``engine`` (the module itself, or an onnxruntime session), the row fields
        that come with it, and the errors of those that could not be prepared."""
        if engine != "onnxruntime":
            return dict(models), {key: {} for key in models}, {}
        # one ONNX file per model: the factored modules' backends do not reach ONNX (the torch path is exported)
        sources = {"dense": models["dense"], "torch": next(m for key, m in models.items() if key != "dense")}
        runners, fields, errors = {}, {}, {}
        example = self._input(2, dtype)  # a dynamic batch axis is traced at batch 2 (size 1 specializes)
        for key, model in sources.items():
            try:
                with ticking(f"exporting {'dense' if key == 'dense' else 'compressed'} to ONNX"):
                    runners[key], fields[key] = onnxruntime_model(model, example, folder)
            except Exception as exc:  # not installed, export, check or session errors: the row says which
                errors[key] = f"onnxruntime: {_first_line(exc)}"
        return runners, fields, errors

    def engine_rows(self, engine: str, dtype_name: str, models: dict[str, nn.Module]) -> list[dict]:
        dtype = DTYPES[dtype_name]
        rows = []
        with (tempfile.TemporaryDirectory(prefix="utilrank-bench-") as folder, torch.inference_mode(),
              quiet_cpu_compile(engine, self.device)):
            runners, fields, prepare_errors = self._runners(engine, models, dtype, folder)
            for bs in self.batch_sizes:
                x = self._input(bs, dtype)
                if engine == "compile":
                    torch.compiler.reset()  # each batch size compiles anew: no cache limit reached in silence
                layers = self._layer_backends(engine, runners, x, dtype_name) if engine != "onnxruntime" else {}
                steps, errors = self._steps(engine, runners, x)
                errors = {**prepare_errors, **errors}
                if "dense" not in steps:  # nothing to compare with: every row of this engine says why
                    keys = list(runners) + [k for k in errors if k not in runners]
                    why = errors["dense"]
                    rows += [self._error_row(engine, k, dtype_name, bs, errors.get(k, f"dense model failed: {why}"))
                             for k in keys]
                    continue
                rows += [self._error_row(engine, k, dtype_name, bs, e) for k, e in errors.items()]
                if len(steps) == 1:
                    continue
                times = time_interleaved(steps, warmup=self.warmup, iters=self.iters, device=self.device,
                                         max_seconds=self.max_seconds)
                rows += self._timed_rows(engine, dtype_name, bs, times, fields, layers)
        return rows

    def _steps(self, engine: str, runners: dict, x: torch.Tensor) -> tuple[dict[str, Callable], dict[str, str]]:
        """One step of each runner on ``x`` in ``engine``, each run once (so that it fails here, not mid-run),
        and the errors of those that failed; the dense model failing in eager PyTorch raises."""
        steps, errors = {}, {}
        bs = x.shape[0]
        for key, runner in runners.items():
            try:
                started = time.perf_counter()
                label = "dense" if key == "dense" else f"compressed ({key})"
                # a compile takes seconds to minutes: a ticking line, not a silent wait
                with ticking(f"compiling {label} at batch {bs}", disable=engine != "compile"):
                    steps[key] = make_step(runner, x, engine=engine, cuda_graphs=self.cuda_graphs)
                    step_times(steps[key], warmup=1, iters=0, device=self.device)
                if engine == "compile":
                    self.log(f"compiled {label} at batch {bs} in {time.perf_counter() - started:.1f} s")
            except Exception as exc:  # compile and onnxruntime errors are of many kinds
                if key == "dense" and engine == "eager":
                    raise
                errors[key] = f"{engine}: {_first_line(exc)}"
                steps.pop(key, None)
        return steps, errors

    def _layer_backends(self, engine: str, runners: dict, x: torch.Tensor, dtype_name: str) -> dict[str, list]:
        """Per compressed model, the backend each factored layer runs on ``x`` (``nn.layer_backends``; with
        ``tune``, the first time per backend, dtype and batch size: ``nn.tune(..., retune=True)``). A model that
        fails here fails again in its steps, where its row says why."""
        layers = {}
        for key, model in runners.items():
            if key == "dense":
                continue
            first = (key, dtype_name, x.shape[0]) not in self.tuned
            try:
                if self.tune and first:
                    self.tuned.add((key, dtype_name, x.shape[0]))
                    layers[key] = tune(model, x, retune=True)
                else:
                    layers[key] = layer_backends(model, x)
            except Exception as exc:  # a kernel that fails: the engine's step reports it in the row
                self.log(f"{engine} {key}: no per-layer backends: {_first_line(exc)}")
        return layers

    def _timed_rows(self, engine: str, dtype_name: str, bs: int, times: dict[str, list[float]],
                    fields: dict[str, dict], layers: dict[str, list]) -> list[dict]:
        """One row per model of the configuration; a compressed row carries the dense timing it is compared with,
        and whether its speedup is measurable (the p20-p80 ranges apart). A wide p20-p80 is warned about."""
        timings = {key: Timing.of(ts) for key, ts in times.items()}
        dense = timings["dense"]
        rows = []
        for key, timing in timings.items():
            variant = "dense" if key == "dense" else "compressed"
            row = {"model": self.model_name, "variant": variant, "backend": "torch" if key == "dense" else key,
                   "engine": engine, "dtype": dtype_name, "batch_size": bs, "img_size": self.input_shape[-1],
                   "infer_samples_per_sec": round(1e3 * bs / timing.median, 2),
                   "infer_step_time": round(timing.median, 4),
                   "step_time_p20": round(timing.p20, 4), "step_time_p80": round(timing.p80, 4),
                   "warmup": self.warmup, "timed_steps": len(times[key]),
                   "param_count": round(self.params[variant] / 1e6, 4), "params": self.params[variant],
                   "infer_gmacs": round(self.flops[variant] / 2e9, 4), **fields.get(key, {}), **self.common}
            if key != "dense":
                row.update(realized(dense.median, timing.median, self.flops["dense"], self.flops["compressed"]))
                row.update(dense_step_time=round(dense.median, 4), dense_step_time_p20=round(dense.p20, 4),
                           dense_step_time_p80=round(dense.p80, 4), speedup_measurable=not dense.overlaps(timing))
                row["weight_bytes_ratio"] = round(self.params["dense"] / self.params["compressed"], 4)
                if key in layers:
                    row["layer_backends"] = layers[key]
            rows.append(row)
            self.log(format_row(row))
        widest = max(timings, key=lambda k: timings[k].p80 / timings[k].p20)
        spread = timings[widest].p80 / timings[widest].p20
        if spread > SPREAD_LIMIT:
            which = "dense" if widest == "dense" else f"compressed ({widest})"
            self.log(f"warning: {engine} {dtype_name} batch {bs}: {which} p80/p20 {spread:.2f} (above {SPREAD_LIMIT}): "
                     "a busy or throttling machine, the medians are rough; more --iters or a quieter machine narrow it")
        return rows
