"""Engines of ``utilrank bench``: what runs a model and one step of it.

``eager`` (PyTorch as the modules run, optionally replayed from a CUDA graph), ``compile`` (``torch.compile``
with inductor, one static-shape full graph per batch size), ``compile-freeze`` (the same with inductor's
``freezing``), ``onnxruntime`` (each model exported by ``export.export_onnx``, checked against PyTorch, run by an
onnxruntime session: the CPU provider, CUDA's on a CUDA device); which backends can be timed on a device; the dtypes a
run takes (``int8``: dynamic quantization, ``bench.modes``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..export import export_onnx, int8_path, onnxruntime_provider, onnxruntime_session, quantize_onnx
from ..ops._dispatch import cuda_extension, triton_available

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what `bench --dtype` takes: int8 is dynamic quantization of an fp32 model (int8 weights; bench.modes)
BENCH_DTYPES = (*DTYPES, "int8")
# torch's and timm's names for them, accepted wherever a --dtype is
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def dtype_name(text: str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for any of their names (``float32``, ``bfloat16``, ...); unknown names
    are returned as given, for the caller's choices to refuse."""
    return DTYPE_ALIASES.get(text.strip().lower().removeprefix("torch."), text.strip().lower())


BACKEND_CHOICES = ("torch", "triton", "cuda", "auto")
# onnxruntime's transformer optimizer was an engine too, until measured: 0.94-0.99x the plain export on ViT-B/16,
# no measurable difference on all-MiniLM-L6-v2 (docs/results.md); benchmarks/studies/cpu_quant_lowrank.py keeps it
ENGINES = ("eager", "compile", "compile-freeze", "onnxruntime")
ONNX_ENGINES = ("onnxruntime",)
ENGINE_PACKAGES = dict.fromkeys(ONNX_ENGINES, ("onnx", "onnxscript", "onnxruntime"))  # beyond torch
TEXT_INPUTS = ("input_ids", "attention_mask")


class TokenInput(tuple):
    """A text model's input shape, ``(length,)`` tokens per example, with the ``vocab_size`` its random ids are
    drawn below and the ``names`` of its ``(batch, length)`` int64 tensors (what ``config.json``'s ``input``
    records for a text model). A tuple, so that it stands where an image's ``(C, H, W)`` does."""

    def __new__(cls, length: int, vocab_size: int, names: Sequence[str] = TEXT_INPUTS):
        shape = super().__new__(cls, (int(length),))
        shape.vocab_size, shape.names = int(vocab_size), tuple(names)
        return shape

    @property
    def length(self) -> int:
        return self[0]

    def describe(self) -> str:
        return f"{self.length} tokens ({', '.join(self.names)})"


class TokenBatch(dict):
    """A text model's batch, a dict of ``(batch, length)`` tensors by input name, with the ``shape`` of its ids (what
    the timing loop reads off an image batch)."""

    @property
    def shape(self) -> torch.Size:
        return next(iter(self.values())).shape

    @property
    def device(self) -> torch.device:
        return next(iter(self.values())).device


def example_input(shape: Sequence[int], batch: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", memory_format: torch.memory_format = torch.contiguous_format):
    """A random batch of ``batch`` inputs of ``shape``: images ``torch.randn(batch, *shape)`` in ``dtype``; for a
    ``TokenInput`` a ``TokenBatch`` of ids below its ``vocab_size`` and an all-ones ``attention_mask`` (int64,
    whatever the model's dtype)."""
    if isinstance(shape, TokenInput):
        ids = torch.randint(0, shape.vocab_size, (batch, shape.length), device=device)
        made = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return TokenBatch({name: made.get(name, torch.zeros_like(ids)) for name in shape.names})
    return torch.randn(batch, *shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)


def _device(example) -> torch.device:
    return example.device if isinstance(example, torch.Tensor) else next(iter(example.values())).device


def onnxruntime_model(model: nn.Module, example, folder: str | Path, *,
                      rewrite: Callable[[Path, Path], dict] | None = None, int8: bool = False) -> tuple[object, dict]:
    """An onnxruntime session of ``model``'s ONNX export (``export.export_onnx``: the torch path, a dynamic
    batch axis, checked against ``model`` on a batch), and the row fields of that export. ``example``: a tensor, or
    a dict of named tensors (a text model's). ``rewrite(source, path)``: the export rewritten into ``path`` first
    (a benchmark's graph optimizer), returning its row fields; ``int8``: then quantized (``export.quantize_onnx``,
    checked against the fp32 file). ``bytes_on_disk``: the file the session runs."""
    path = Path(folder) / f"model-{id(model)}.onnx"
    result = export_onnx(model, example, path)
    fields = {"export_max_abs_error": float(f"{result.max_abs_error:.3g}")}
    if rewrite is not None:
        rewritten = path.with_name(f"{path.stem}-rewritten.onnx")
        fields.update(rewrite(path, rewritten))
        path = rewritten
    if int8:
        quantized = quantize_onnx(path, int8_path(path))
        fields["onnx_quantization"] = "quantize_dynamic QInt8, MatMulConstBOnly"
        path = quantized.path
    session = onnxruntime_session(path, _device(example))
    return session, {"onnxruntime_provider": onnxruntime_provider(session), **fields,
                     "bytes_on_disk": path.stat().st_size}


_ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


def _onnxruntime_step(session, x) -> Callable[[], object]:
    """``session`` run on ``x`` (a tensor, or a dict of tensors by input name) in place through an IO binding (no
    copy of the input per step; on CUDA no host round trip); every output bound on the input's device."""
    named = dict(x) if isinstance(x, Mapping) else {session.get_inputs()[0].name: x}
    binding = session.io_binding()
    bound = []
    for name, tensor in named.items():
        if tensor.dtype not in _ELEMENT_TYPES:
            raise ValueError(f"onnxruntime engine: no {tensor.dtype} input binding")
        tensor = tensor.contiguous()  # NCHW, as the exported graph reads it
        bound.append(tensor)
        binding.bind_input(name, tensor.device.type, tensor.device.index or 0, _ELEMENT_TYPES[tensor.dtype],
                           list(tensor.shape), tensor.data_ptr())
    device = bound[0].device
    for output in session.get_outputs():
        binding.bind_output(output.name, device.type, device.index or 0)

    def step():
        session.run_with_iobinding(binding)
        return bound  # keeps the bound inputs alive as long as the step

    return step


def make_step(model, x, *, engine: str = "eager", cuda_graphs: bool = False) -> Callable[[], object]:
    """One inference step on ``x`` in ``engine``: ``model`` eager or replayed from a CUDA graph (``eager``),
    ``torch.compile``d with inductor (``compile``: a static-shape full graph, compiled at the first call;
    with ``cuda_graphs``, inductor's ``reduce-overhead`` mode, which captures graphs itself), or, for
    ``onnxruntime``, ``model`` is a session (``onnxruntime_model``) run through an IO binding."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if cuda_graphs and _device(x).type != "cuda":
        raise ValueError("--cuda-graphs needs a CUDA device")
    if engine in ONNX_ENGINES:
        if cuda_graphs:
            raise ValueError("--cuda-graphs: the onnxruntime engine does not replay CUDA graphs")
        return _onnxruntime_step(model, x)
    if engine in ("compile", "compile-freeze"):
        # fullgraph: a graph break would time a half-compiled model without saying so; freezing folds the weights
        # into the graph as constants (inference mode only: the bench's steps run under torch.inference_mode)
        # (torch.compile takes a mode or options, not both: reduce-overhead's CUDA graphs as an option then)
        options = {"freezing": True, "triton.cudagraphs": cuda_graphs} if engine == "compile-freeze" else None
        mode = "reduce-overhead" if cuda_graphs and options is None else None
        compiled = torch.compile(model, mode=mode, dynamic=False, fullgraph=True, options=options)
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
    if not set(engines) & set(ONNX_ENGINES):
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
    if engine.startswith("compile") and device.type == "cpu":
        cpp_logger.addFilter(notice)
    try:
        yield
    finally:
        cpp_logger.removeFilter(notice)
