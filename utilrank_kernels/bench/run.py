"""``bench``: dense and compressed models timed interleaved, one row per (engine, dtype, batch size, backend).

Within an engine (``bench.engines``) the dense model and the compressed variants are timed interleaved, so a
busy machine slows them alike; the engines are timed one after the other. Rows are timm's fields plus what
makes them comparable (``bench.output`` writes them). Compressed rows of PyTorch engines list the backend each
factored layer ran (``layer_backends``, from an eager pass before the engine's steps: on CUDA, the pass that
makes the measured choices, ``ops/_tune.py``, for keys not yet recorded; ``tune=True`` times them all again).

Every timed row also says how far its outputs are from eager fp32 on the same batch (``export.agreement``):
``logit_cosine``, ``top1_agreement`` and ``max_abs_error`` against the same model (dense or compressed) run
eagerly in fp32 (what the engine and the dtype cost), and on compressed rows ``dense_logit_cosine`` and
``dense_top1_agreement`` against the dense model in eager fp32 (what compression and the dtype cost together);
``bytes_on_disk`` is the runner's weights as saved (the ONNX file; ``torch.save`` of the state dict).
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
from ..export import agreement, first_output, run_onnxruntime
from ..measure import count_flops, count_params
from ..nn import layer_backends, set_backend, tune
from ..timing import Timing, cpu_thp_alloc, device_label, step_times, time_interleaved, versions
from .engines import (
    BENCH_DTYPES,
    DTYPES,
    ENGINES,
    ONNX_ENGINES,
    TokenBatch,
    backend_problem,
    engine_versions,
    example_input,
    make_step,
    onnxruntime_model,
    quiet_cpu_compile,
)
from .modes import COMPILE_SETTINGS, dtype_problem, engine_problem, int8_torch, state_bytes
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
    unknown = [d for d in dtypes if d not in BENCH_DTYPES]
    if unknown:
        raise ValueError(f"dtype {unknown[0]!r}: choose from {', '.join(BENCH_DTYPES)}")
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
               flops, params, common, log, tune, references={"dense": dense, "compressed": compressed})
    rows = []
    for dtype_name in dtypes:
        problem = dtype_problem(dtype_name, device)
        if problem:  # every row of this dtype says why: no silent run in another dtype
            rows += [run._error_row(e, k, dtype_name, bs, problem) for e in dict.fromkeys(engines)
                     for bs in batch_sizes for k in ("dense", *usable)]
            continue
        dtype = DTYPES.get(dtype_name, torch.float32)  # int8: an fp32 model, quantized per engine
        models = {"dense": copy.deepcopy(dense).to(device=device, dtype=dtype, memory_format=fmt)}
        for b in usable:  # copies: the fp32 models stay the references
            models[b] = set_backend(copy.deepcopy(compressed).to(device=device, dtype=dtype, memory_format=fmt), b)
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
    references: dict[str, nn.Module] = field(default_factory=dict)  # the fp32 CPU models, run eagerly
    tuned: set = field(default_factory=set)  # (backend, dtype, batch size) already tuned in this run

    def _input(self, batch: int, dtype: torch.dtype):
        return example_input(self.input_shape, batch, dtype, self.device, self.fmt)

    def _reference_outputs(self, x) -> dict[str, torch.Tensor]:
        """The fp32 models' eager outputs on ``x`` (on the CPU, in fp32)."""
        if isinstance(x, TokenBatch):
            x32 = TokenBatch({k: v.cpu() for k, v in x.items()})
        else:
            x32 = x.detach().float().cpu().contiguous()
        return {key: first_output(model(x32)).float() for key, model in self.references.items()}

    def _agreements(self, engine: str, runners: dict, steps: dict, x) -> dict[str, dict]:
        """Per runner, its outputs on ``x`` against the fp32 references (``export.agreement``); a runner whose
        outputs cannot be read (a CUDA graph's replay) or compared is left out, with a message."""
        if not self.references:
            return {}
        refs = self._reference_outputs(x)
        found = {}
        for key, step in steps.items():
            try:
                out = run_onnxruntime(runners[key], x) if engine in ONNX_ENGINES else step()
                if out is None:
                    continue
                out = first_output(out).float()
                own = refs["dense" if key == "dense" else "compressed"]
                fields = agreement(out, own)
                if key != "dense":
                    dense = agreement(out, refs["dense"])
                    fields.update(dense_logit_cosine=dense["logit_cosine"],
                                  dense_top1_agreement=dense["top1_agreement"])
                found[key] = fields
            except Exception as exc:  # outputs of another shape or kind: the row goes without
                self.log(f"{engine} {key}: no agreement with eager fp32: {_first_line(exc)}")
        return found

    def _error_row(self, engine: str, key: str, dtype_name: str, batch: int, error: str) -> dict:
        self.log(f"failed: {engine} {key} at {dtype_name}, batch {batch}: {error}")
        return {"model": self.model_name, "variant": "dense" if key == "dense" else "compressed",
                "backend": "torch" if key == "dense" else key, "engine": engine, "dtype": dtype_name,
                "batch_size": batch, "error": error, **self.common}

    def _torch_runners(self, engine: str, models: dict[str, nn.Module], dtype_name: str):
        """The PyTorch engines' runners: the models, or (int8) their dynamically quantized twins."""
        runners, fields, errors = {}, {}, {}
        for key, model in models.items():
            settings = {"compile_settings": COMPILE_SETTINGS[engine]} if engine in COMPILE_SETTINGS else {}
            try:
                if dtype_name == "int8":
                    model = int8_torch(model)
                    settings["quantization"] = "torch.ao quantize_dynamic qint8, nn.Linear (factors as Linear pairs)"
                runners[key], fields[key] = model, {**settings, "bytes_on_disk": state_bytes(model)}
            except Exception as exc:  # a quantization that fails: the row says why
                errors[key] = f"{engine} {dtype_name}: {_first_line(exc)}"
        return runners, fields, errors

    def _runners(self, engine: str, models: dict[str, nn.Module], dtype_name: str, folder: str):
        """What runs each model in ``engine`` (the module itself, or an onnxruntime session), the row fields
        that come with it, and the errors of those that could not be prepared."""
        if engine not in ONNX_ENGINES:
            return self._torch_runners(engine, models, dtype_name)
        # one ONNX file per model: the factored modules' backends do not reach ONNX (the torch path is exported)
        sources = {"dense": models["dense"], "torch": next(m for key, m in models.items() if key != "dense")}
        runners, fields, errors = {}, {}, {}
        example = self._input(2, DTYPES.get(dtype_name, torch.float32))  # batch 2: size 1 specializes the axis
        for key, model in sources.items():
            try:
                with ticking(f"exporting {'dense' if key == 'dense' else 'compressed'} to ONNX"):
                    runners[key], fields[key] = onnxruntime_model(model, example, folder, int8=dtype_name == "int8")
            except Exception as exc:  # not installed, export, check or session errors: the row says which
                errors[key] = f"{engine}: {_first_line(exc)}"
        return runners, fields, errors

    def engine_rows(self, engine: str, dtype_name: str, models: dict[str, nn.Module]) -> list[dict]:
        dtype = DTYPES.get(dtype_name, torch.float32)
        problem = engine_problem(engine)
        if problem:  # a missing package: every row of the engine says so
            return [self._error_row(engine, k, dtype_name, bs, problem) for bs in self.batch_sizes for k in models]
        rows = []
        with (tempfile.TemporaryDirectory(prefix="utilrank-bench-") as folder, torch.inference_mode(),
              quiet_cpu_compile(engine, self.device)):
            runners, fields, prepare_errors = self._runners(engine, models, dtype_name, folder)
            for bs in self.batch_sizes:
                x = self._input(bs, dtype)
                if engine in ("compile", "compile-freeze"):
                    torch.compiler.reset()  # each batch size compiles anew: no cache limit reached in silence
                plain = engine not in ONNX_ENGINES and dtype_name != "int8"  # factored modules run as they are
                layers = self._layer_backends(engine, runners, x, dtype_name) if plain else {}
                steps, errors = self._steps(engine, runners, x)
                agreements = self._agreements(engine, runners, steps, x) if "dense" in steps else {}
                fields_now = {k: {**fields.get(k, {}), **agreements.get(k, {})} for k in runners}
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
                rows += self._timed_rows(engine, dtype_name, bs, times, fields_now, layers)
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
                with ticking(f"compiling {label} at batch {bs}", disable=not engine.startswith("compile")):
                    steps[key] = make_step(runner, x, engine=engine, cuda_graphs=self.cuda_graphs)
                    step_times(steps[key], warmup=1, iters=0, device=self.device)
                if engine.startswith("compile"):
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
