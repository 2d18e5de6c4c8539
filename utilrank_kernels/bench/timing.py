"""Dense and compressed models timed interleaved, one row per (engine, dtype, batch size, backend).

Engines: ``eager`` (PyTorch as the modules run), ``compile`` (``torch.compile`` with inductor, one
static-shape full graph per batch size) and ``onnxruntime`` (each model exported by ``export.export_onnx``,
checked against PyTorch, run by an onnxruntime session: the CPU provider, CUDA's on a CUDA device). Within
an engine the dense model and the compressed variants are timed interleaved, so a busy machine slows them
alike; the engines are timed one after the other.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._progress import ticking
from ..measure import count_flops, count_params
from ..timing import cpu_thp_alloc, device_label, quantiles_ms, step_times, time_interleaved, versions
from ..nn import set_backend
from .output import format_row

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch's and timm's names for them, accepted wherever a --dtype is
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def dtype_name(text: str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for any of their names (``float32``, ``bfloat16``, ...); unknown names
    are returned as given, for the caller's choices to refuse."""
    return DTYPE_ALIASES.get(text.strip().lower().removeprefix("torch."), text.strip().lower())
BACKEND_CHOICES = ("torch", "triton", "cuda", "auto")
ENGINES = ("eager", "compile", "onnxruntime")


# ---------------------------------------------------------------------------------------------
# what makes a row comparable
# ---------------------------------------------------------------------------------------------
def realized(dense_ms: float, compressed_ms: float, dense_flops: int, compressed_flops: int) -> dict:
    """The compressed row's ratios: measured speedup, FLOP ratio, and the fraction of it realized."""
    speedup = dense_ms / compressed_ms
    theoretical = dense_flops / compressed_flops
    return {"speedup": round(speedup, 4), "theoretical_speedup": round(theoretical, 4),
            "realized_fraction": round(speedup / theoretical, 4)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# engines: what runs a model, and one step of it
# ---------------------------------------------------------------------------------------------
def onnxruntime_model(model: nn.Module, example: torch.Tensor, folder: str | Path) -> tuple[object, dict]:
    """An onnxruntime session of ``model``'s ONNX export (``export.export_onnx``: the torch path, a dynamic
    batch axis, checked against ``model`` on a batch), and the row fields of that export."""
    from ..export import export_onnx, onnxruntime_provider, onnxruntime_session

    path = Path(folder) / f"model-{id(model)}.onnx"
    result = export_onnx(model, example, path)
    session = onnxruntime_session(path, example.device)
    return session, {"onnxruntime_provider": onnxruntime_provider(session),
                     "export_max_abs_error": float(f"{result.max_abs_error:.3g}")}


def _onnxruntime_step(session, x: torch.Tensor) -> Callable[[], object]:
    """``session`` run on ``x`` in place through an IO binding (no copy of the input per step; on CUDA
    no host round trip)."""
    import numpy as np

    element_types = {torch.float32: np.float32, torch.float16: np.float16}
    if x.dtype not in element_types:
        raise ValueError(f"onnxruntime engine: no {x.dtype} input binding")
    x = x.contiguous()  # NCHW, as the exported graph reads it
    binding = session.io_binding()
    device_id = x.device.index or 0
    binding.bind_input(session.get_inputs()[0].name, x.device.type, device_id, element_types[x.dtype],
                       list(x.shape), x.data_ptr())
    binding.bind_output(session.get_outputs()[0].name, x.device.type, device_id)

    def step():
        session.run_with_iobinding(binding)
        return x  # keeps the bound input alive as long as the step

    return step


def make_step(model, x: torch.Tensor, *, engine: str = "eager", cuda_graphs: bool = False) -> Callable[[], object]:
    """One inference step on ``x`` in ``engine``: ``model`` eager or replayed from a CUDA graph (``eager``),
    ``torch.compile``d with inductor (``compile``: a static-shape full graph, compiled at the first call;
    with ``cuda_graphs``, inductor's ``reduce-overhead`` mode, which captures graphs itself), or, for
    ``onnxruntime``, ``model`` is a session (``onnxruntime_model``) run through an IO binding."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if cuda_graphs and not x.is_cuda:
        raise ValueError("--cuda-graphs needs a CUDA device")
    if engine == "onnxruntime":
        if cuda_graphs:
            raise ValueError("--cuda-graphs: the onnxruntime engine does not replay CUDA graphs")
        return _onnxruntime_step(model, x)
    if engine == "compile":
        # fullgraph: a graph break would time a half-compiled model without saying so
        compiled = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None, dynamic=False,
                                 fullgraph=True)
        return lambda: compiled(x)
    if not cuda_graphs:
        return lambda: model(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: autotuning, lazy init, workspaces
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def _backend_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be timed on ``device`` (None if it can)."""
    from ..ops._backend import cuda_extension, triton_available

    if backend in ("torch", "auto"):
        return None
    if device.type != "cuda":
        return (f"backend {backend} runs on CUDA devices only (TRITON_INTERPRET runs on the CPU are for "
                "correctness, not timing)")
    if backend == "triton" and not triton_available():
        return "backend triton: the triton package is not installed"
    if backend == "cuda" and cuda_extension() is None:
        return ("backend cuda: the extension utilrank_kernels._C is not built "
                "(UTILRANK_BUILD_CUDA=1 pip install -e . --no-build-isolation)")
    return None


def _engine_versions(engines: Sequence[str]) -> dict:
    if "onnxruntime" not in engines:
        return {}
    try:
        import onnxruntime
    except ImportError:
        return {"onnxruntime_version": None}
    return {"onnxruntime_version": onnxruntime.__version__}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
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
) -> list[dict]:
    """The rows of one run: per dtype, engine and batch size, one dense row and one compressed row per
    backend (the onnxruntime engine: one, the exported torch path), timed interleaved within the engine;
    engines one after the other (each has its own threads). ``max_seconds`` ends a configuration's timed
    rounds early (after at least 5). Backends that cannot run on ``device`` at all are skipped with a
    message; an engine or backend that fails (not installed, export or compile error) is a row with its
    ``error``; the dense model failing in eager PyTorch raises."""
    log = log or logger.info
    device = torch.device(device)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"engine {unknown[0]!r}: choose from {', '.join(ENGINES)}")
    dense, compressed = dense.float().cpu().eval(), compressed.float().cpu().eval()
    x1 = torch.randn(1, *input_shape)
    flops = {"dense": count_flops(dense, x1), "compressed": count_flops(set_backend(compressed, "torch"), x1)}
    params = {"dense": count_params(dense), "compressed": count_params(compressed)}
    usable = []
    for b in dict.fromkeys(backends):
        problem = _backend_problem(b, device)
        if problem:
            log(f"skipped: {problem}")
        else:
            usable.append(b)
    if not usable:
        raise ValueError(f"no requested backend ({', '.join(backends)}) can run on {device.type}")
    common = {"device": device_label(device), **versions(), **_engine_versions(engines),
              "channels_last": channels_last, "cuda_graphs": cuda_graphs,
              "date": datetime.date.today().isoformat(), **(extra or {})}
    if device.type == "cpu":
        common.update(threads=torch.get_num_threads(), thp_mem_alloc=cpu_thp_alloc())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    run = _Run(model_name, input_shape, batch_sizes, device, fmt, cuda_graphs, warmup, iters, max_seconds,
               flops, params, common, log)
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


class _CpuCompileNotice(logging.Filter):
    """Drops inductor's "No CUDA runtime is found" warning, which a CUDA build of torch logs when it compiles
    for the CPU on a machine without a GPU: nothing is wrong, and nothing runs on CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


@contextlib.contextmanager
def _quiet_cpu_compile(engine: str, device: torch.device):
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    notice = _CpuCompileNotice()
    if engine == "compile" and device.type == "cpu":
        cpp_logger.addFilter(notice)
    try:
        yield
    finally:
        cpp_logger.removeFilter(notice)


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

    def _input(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        x = torch.randn(batch, *self.input_shape, device=self.device, dtype=dtype)
        return x.contiguous(memory_format=self.fmt)

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
              _quiet_cpu_compile(engine, self.device)):
            runners, fields, prepare_errors = self._runners(engine, models, dtype, folder)
            for bs in self.batch_sizes:
                x = self._input(bs, dtype)
                if engine == "compile":
                    torch.compiler.reset()  # each batch size compiles anew: no cache limit reached in silence
                steps, errors = {}, dict(prepare_errors)
                for key, runner in runners.items():
                    try:
                        started = time.perf_counter()
                        label = "dense" if key == "dense" else f"compressed ({key})"
                        # a compile takes seconds to minutes: a ticking line, not a silent wait
                        with ticking(f"compiling {label} at batch {bs}", disable=engine != "compile"):
                            steps[key] = make_step(runner, x, engine=engine, cuda_graphs=self.cuda_graphs)
                            step_times(steps[key], warmup=1, iters=0, device=self.device)  # fails here, not mid-run
                        if engine == "compile":
                            self.log(f"compiled {label} at batch {bs} in {time.perf_counter() - started:.1f} s")
                    except Exception as exc:  # compile and onnxruntime errors are of many kinds
                        if key == "dense" and engine == "eager":
                            raise
                        errors[key] = f"{engine}: {_first_line(exc)}"
                        steps.pop(key, None)
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
                rows += self._timed_rows(engine, dtype_name, bs, times, fields)
        return rows

    def _timed_rows(self, engine: str, dtype_name: str, bs: int, times: dict[str, list[float]],
                    fields: dict[str, dict]) -> list[dict]:
        rows, dense_ms = [], None
        for key, ts in times.items():
            variant = "dense" if key == "dense" else "compressed"
            median, p20, p80 = quantiles_ms(ts)
            row = {"model": self.model_name, "variant": variant, "backend": "torch" if key == "dense" else key,
                   "engine": engine, "dtype": dtype_name, "batch_size": bs, "img_size": self.input_shape[-1],
                   "infer_samples_per_sec": round(1e3 * bs / median, 2),
                   "infer_step_time": round(median, 4),
                   "step_time_p20": round(p20, 4), "step_time_p80": round(p80, 4),
                   "warmup": self.warmup, "timed_steps": len(ts),
                   "param_count": round(self.params[variant] / 1e6, 4), "params": self.params[variant],
                   "infer_gmacs": round(self.flops[variant] / 2e9, 4), **fields.get(key, {}), **self.common}
            if key == "dense":
                dense_ms = median
            else:
                row.update(realized(dense_ms, median, self.flops["dense"], self.flops["compressed"]))
                row["weight_bytes_ratio"] = round(self.params["dense"] / self.params["compressed"], 4)
            rows.append(row)
            self.log(format_row(row))
        return rows
