"""Dense and compressed models timed interleaved, one row per (dtype, batch size, backend)."""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..measure import (
    count_flops,
    count_params,
    cpu_thp_alloc,
    device_label,
    quantiles_ms,
    step_times,
    time_interleaved,
    versions,
)
from ..nn import set_backend
from .output import format_row

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKEND_CHOICES = ("torch", "triton", "cuda", "auto")

# ---------------------------------------------------------------------------------------------
# what makes a row comparable
# ---------------------------------------------------------------------------------------------
def realized(dense_ms: float, compressed_ms: float, dense_flops: int, compressed_flops: int) -> dict:
    """The compressed row's ratios: measured speedup, FLOP ratio, and the fraction of it realized."""
    speedup = dense_ms / compressed_ms
    theoretical = dense_flops / compressed_flops
    return {"speedup": round(speedup, 4), "theoretical_speedup": round(theoretical, 4),
            "realized_fraction": round(speedup / theoretical, 4)}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def make_step(model: nn.Module, x: torch.Tensor, *, compile: bool = False,
              cuda_graphs: bool = False) -> Callable[[], object]:
    """One inference step of ``model`` on ``x``: eager, ``torch.compile``d, and/or replayed from a CUDA
    graph (with ``compile``: inductor's ``reduce-overhead`` mode, which captures graphs itself)."""
    if cuda_graphs and not x.is_cuda:
        raise ValueError("--cuda-graphs needs a CUDA device")
    if compile:
        model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
        return lambda: model(x)
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


def bench(
    dense: nn.Module,
    compressed: nn.Module,
    *,
    model_name: str,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 64),
    dtypes: Sequence[str] = ("fp32",),
    backends: Sequence[str] = ("auto",),
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
    warmup: int = 10,
    iters: int = 40,
    extra: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """The rows of one run: per dtype and batch size, one dense row and one compressed row per backend,
    all timed interleaved. Backends that cannot run on ``device`` at all are skipped with a message; a
    backend that fails on a configuration is a row with its ``error`` (the dense model failing raises)."""
    log = log or logger.info
    device = torch.device(device)
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
    common = {"device": device_label(device), **versions(), "channels_last": channels_last,
              "compile": compile, "cuda_graphs": cuda_graphs, "date": datetime.date.today().isoformat(),
              **(extra or {})}
    if device.type == "cpu":
        common.update(threads=torch.get_num_threads(), thp_mem_alloc=cpu_thp_alloc())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        models = {"dense": copy.deepcopy(dense).to(device=device, dtype=dtype, memory_format=fmt)}
        for b in usable:
            m = compressed if len(usable) == 1 else copy.deepcopy(compressed)
            models[b] = set_backend(m.to(device=device, dtype=dtype, memory_format=fmt), b)
        for bs in batch_sizes:
            x = torch.randn(bs, *input_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            with torch.inference_mode():
                steps = {}
                for key, m in models.items():
                    try:
                        steps[key] = make_step(m, x, compile=compile, cuda_graphs=cuda_graphs)
                        step_times(steps[key], warmup=1, iters=0, device=device)  # fails here, not mid-run
                    except (RuntimeError, ValueError) as exc:
                        if key == "dense":
                            raise
                        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        rows.append({"model": model_name, "variant": "compressed", "backend": key,
                                     "dtype": dtype_name, "batch_size": bs, "error": error, **common})
                        log(f"failed: backend {key} at {dtype_name}, batch {bs}: {error}")
                        steps.pop(key, None)
                times = time_interleaved(steps, warmup=warmup, iters=iters, device=device)
            dense_ms = None
            for key, ts in times.items():
                variant = "dense" if key == "dense" else "compressed"
                median, p20, p80 = quantiles_ms(ts)
                row = {"model": model_name, "variant": variant, "backend": "torch" if key == "dense" else key,
                       "dtype": dtype_name, "batch_size": bs, "img_size": input_shape[-1],
                       "infer_samples_per_sec": round(1e3 * bs / median, 2),
                       "infer_step_time": round(median, 4),
                       "step_time_p20": round(p20, 4), "step_time_p80": round(p80, 4),
                       "param_count": round(params[variant] / 1e6, 4), "params": params[variant],
                       "infer_gmacs": round(flops[variant] / 2e9, 4), **common}
                if key == "dense":
                    dense_ms = median
                else:
                    row.update(realized(dense_ms, median, flops["dense"], flops["compressed"]))
                    row["weight_bytes_ratio"] = round(params["dense"] / params["compressed"], 4)
                rows.append(row)
                log(format_row(row))
    return rows


