"""Engines of ``utilrank bench``: what runs a model and one step of it.

``eager`` (PyTorch as the modules run, optionally replayed from a CUDA graph), ``compile`` (``torch.compile``
with inductor, one static-shape full graph per batch size) and ``onnxruntime`` (each model exported by
``export.export_onnx``, checked against PyTorch, run by an onnxruntime session: the CPU provider, CUDA's on a
CUDA device); which backends can be timed on a device; the dtypes a run takes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..export import export_onnx, onnxruntime_provider, onnxruntime_session
from ..ops._dispatch import cuda_extension, triton_available

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch's and timm's names for them, accepted wherever a --dtype is
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def dtype_name(text: str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for any of their names (``float32``, ``bfloat16``, ...); unknown names
    are returned as given, for the caller's choices to refuse."""
    return DTYPE_ALIASES.get(text.strip().lower().removeprefix("torch."), text.strip().lower())


BACKEND_CHOICES = ("torch", "triton", "cuda", "auto")
ENGINES = ("eager", "compile", "onnxruntime")


def onnxruntime_model(model: nn.Module, example: torch.Tensor, folder: str | Path) -> tuple[object, dict]:
    """An onnxruntime session of ``model``'s ONNX export (``export.export_onnx``: the torch path, a dynamic
    batch axis, checked against ``model`` on a batch), and the row fields of that export."""
    path = Path(folder) / f"model-{id(model)}.onnx"
    result = export_onnx(model, example, path)
    session = onnxruntime_session(path, example.device)
    return session, {"onnxruntime_provider": onnxruntime_provider(session),
                     "export_max_abs_error": float(f"{result.max_abs_error:.3g}")}


def _onnxruntime_step(session, x: torch.Tensor) -> Callable[[], object]:
    """``session`` run on ``x`` in place through an IO binding (no copy of the input per step; on CUDA
    no host round trip)."""
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


def backend_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be timed on ``device`` (None if it can)."""
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


def engine_versions(engines: Sequence[str]) -> dict:
    if "onnxruntime" not in engines:
        return {}
    try:
        import onnxruntime  # optional: the deploy extra
    except ImportError:
        return {"onnxruntime_version": None}
    return {"onnxruntime_version": onnxruntime.__version__}


class _CpuCompileNotice(logging.Filter):
    """Drops inductor's "No CUDA runtime is found" warning, which a CUDA build of torch logs when it compiles
    for the CPU on a machine without a GPU: nothing is wrong, and nothing runs on CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


@contextlib.contextmanager
def quiet_cpu_compile(engine: str, device: torch.device):
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    notice = _CpuCompileNotice()
    if engine == "compile" and device.type == "cpu":
        cpp_logger.addFilter(notice)
    try:
        yield
    finally:
        cpp_logger.removeFilter(notice)
