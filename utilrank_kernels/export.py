"""A compressed model for deployment: ONNX, or a ``torch.export`` ExportedProgram, each checked against the
PyTorch model before it is written.

- ``export_onnx(model, example, path)``: every factored module runs its torch path while the graph is
  captured (``set_backend(model, "torch")``, restored afterwards), so the factors reach ONNX as two plain
  ``MatMul``/``Gemm`` nodes (bias ``Add``, activation), and the file runs in onnxruntime (or any ONNX
  runtime) without this package. The exporter is ``torch.onnx.export(dynamo=True)``: the ``torch.export``
  capture that ``export_program`` uses too, the default exporter since torch 2.9 (the TorchScript one is
  deprecated there) and present since torch 2.6.
- ``export_program(model, example, path)``: ``torch.export`` as the model is; factored modules keep their
  backend, so a kernel backend (``auto`` on CUDA tensors, ``triton``, ``cuda``) stays in the graph as the
  ``utilrank::lowrank_*`` custom ops. Reload with ``import utilrank_kernels`` (which registers the ops) and
  ``torch.export.load(path).module()``; a graph without custom ops (the torch path, e.g. exported on the
  CPU) reloads without the package.

Both write under a temporary name, run the written file on a batch (for a dynamic batch axis, a batch size
other than the traced one), compare it with the PyTorch model and rename it into place only if the largest
absolute difference is within ``tolerance``; otherwise ``ExportError`` and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._files import atomic_path
from .nn import FACTORED_MODULES

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "exported-program")
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}
DEPLOY_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the `deploy` extra
# the largest |exported - PyTorch| accepted in fp32, relative to max(1, max |output|): onnxruntime's graph
# rewrites (fused Gemm, LayerNorm, GELU) moved outputs by 2.6e-6 on the trained built-in folder, 3.6e-7 on a
# compressed ViT-S and 2.5e-6 on ViT-B/16 at 50% (`utilrank export`, benchmarks/models/vit_b_engines.py)
FP32_TOLERANCE = 1e-4
ONNX_DTYPES = (torch.float32, torch.float16)  # what onnxruntime's CPU provider runs (no bfloat16 MatMul/Conv)


class ExportError(RuntimeError):
    """The model could not be exported, or the exported file does not compute what the model computes."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it matches the PyTorch model: ``max_abs_error`` over a batch of
    ``check_batch`` inputs (against ``tolerance``), ``batch`` the exported batch size (None: dynamic),
    ``operators`` the graph's node counts (ONNX op types; ``torch.export``'s call targets), ``custom_ops``
    the ``utilrank::`` ops left in it, ``runtime`` what ran the check."""

    path: Path
    format: str
    dtype: torch.dtype
    batch: int | None
    max_abs_error: float
    tolerance: float
    check_batch: int
    runtime: str
    operators: dict[str, int] = field(default_factory=dict)
    custom_ops: tuple[str, ...] = ()
    opset: int | None = None


def missing_packages(names: tuple[str, ...] = DEPLOY_PACKAGES) -> list[str]:
    """The packages of ``names`` that are not installed."""
    return [n for n in names if importlib.util.find_spec(n) is None]


def _require(names: tuple[str, ...], what: str) -> None:
    missing = missing_packages(names)
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}: pip install -e '.[deploy]'")


@contextlib.contextmanager
def torch_backend(model: nn.Module) -> Iterator[nn.Module]:
    """Every factored module of ``model`` on the torch path for the duration (``set_backend``'s effect,
    undone afterwards: the caller's backends are kept)."""
    saved = [(m, m.backend) for m in model.modules() if isinstance(m, FACTORED_MODULES)]
    for m, _ in saved:
        m.backend = "torch"
    try:
        yield model
    finally:
        for m, backend in saved:
            m.backend = backend


def _batch_dim(dynamic_batch: bool) -> tuple[dict, ...] | None:
    return ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None


def _check_input(example: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The check batch: the example itself for a static batch; for a dynamic one, one more row than the
    traced example (seeded), so that the symbolic batch axis is what gets checked."""
    if not dynamic_batch:
        return example
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=generator)
    return x.to(device=example.device, dtype=example.dtype)


def tolerance(reference: torch.Tensor, model: nn.Module | None = None, x: torch.Tensor | None = None) -> float:
    """The largest accepted |exported - PyTorch| for ``reference`` (the PyTorch model's output on ``x``).

    fp32: ``FP32_TOLERANCE * max(1, max |reference|)``. Half precision: flash-attention's rule, an exported
    model may be at most 2x as far from the fp32 model as PyTorch's own half-precision run is; the two
    half-precision runs then differ by at most 3x that distance (``model`` and ``x`` give the fp32 run)."""
    scale = max(1.0, float(reference.abs().max()))
    if reference.dtype == torch.float32 or model is None or x is None:
        return FP32_TOLERANCE * scale
    fp32 = copy.deepcopy(model).float()
    with torch.inference_mode():
        own_error = float((fp32(x.float()) - reference.float()).abs().max())
    return 3 * own_error + FP32_TOLERANCE * scale


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise ExportError(f"the exported model returns shape {tuple(got.shape)}, the model {tuple(want.shape)}")
    return float((got.float() - want.float()).abs().max())


def _refuse_if(error: float, limit: float, runtime: str, batch: int) -> None:
    if not error <= limit:  # NaN refuses too
        raise ExportError(f"{runtime}'s outputs differ from the PyTorch model's by {error:.3g} "
                          f"(tolerance {limit:.3g}) on a batch of {batch}; nothing written")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------
def onnxruntime_session(path: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` of ``path`` on ``device``'s execution provider (CUDA's, or an
    error where this onnxruntime has none: no silent CPU run), with ``threads`` intra-op threads (default:
    torch's) and no spinning: an idle session's threads would otherwise busy-wait on the cores another
    model is being timed on."""
    _require(("onnxruntime",), "onnxruntime")
    import onnxruntime as ort  # optional: the deploy extra

    device = torch.device(device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                               "(install onnxruntime-gpu for a CUDA device)")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the CPU provider's per-node placement notes are noise
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def onnxruntime_provider(session) -> str:
    return session.get_providers()[0]


def run_onnxruntime(session, x: torch.Tensor) -> torch.Tensor:
    """One run of ``session`` on ``x`` (host copies in and out): the check's path, not the timed one."""
    (output,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    return torch.from_numpy(output).to(x.device)


# ---------------------------------------------------------------------------------------------
# exports
# ---------------------------------------------------------------------------------------------
def _onnx_operators(path: Path) -> tuple[dict[str, int], list[str], int | None]:
    """ONNX node counts by op type, the nodes of a non-standard domain, and the default opset."""
    import onnx  # optional: the deploy extra

    proto = onnx.load(str(path), load_external_data=False)
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")})
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items())), foreign, opset


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, dynamic_batch: bool = True,
                opset: int | None = None, check: bool = True) -> ExportResult:
    """Write ``model`` (in its dtype and on its device; eval mode) as ONNX at ``path``, traced on ``example``
    (a batch: with ``dynamic_batch`` the batch axis stays symbolic, so trace with a batch > 1), and check it
    in onnxruntime on a batch against the PyTorch model. ``opset``: the exporter's default where None."""
    _require(DEPLOY_PACKAGES, "ONNX export")
    path = Path(path)
    if example.dtype not in ONNX_DTYPES:
        raise ExportError(f"ONNX export in {example.dtype}: onnxruntime's CPU provider has no "
                          f"{str(example.dtype).removeprefix('torch.')} kernels for MatMul/Conv, so the file could "
                          "not be checked; export float32 or float16 (or an ExportedProgram)")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes >= 2**31 - (64 << 20):
        raise ExportError(f"ONNX export: {weight_bytes / 2**30:.2f} GiB of weights do not fit one ONNX file "
                          "(2 GiB protobuf limit); export float16")
    model.eval()
    x_check = _check_input(example, dynamic_batch)
    with torch_backend(model), torch.inference_mode():
        reference = model(x_check)
    with torch_backend(model):
        try:
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_batch_dim(dynamic_batch),
                                        input_names=["input"], output_names=["output"], opset_version=opset,
                                        optimize=True, verbose=False, external_data=False)
        except Exception as exc:  # the exporter's errors are many kinds; one line, the cause chained
            raise ExportError(f"torch.onnx.export (dynamo) failed: {_first_line(exc)}") from exc
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
        operators, foreign, written_opset = _onnx_operators(tmp)
        if foreign:  # every factored module ran its torch path: nothing else may reach the file
            raise ExportError(f"the ONNX graph holds non-standard ops {', '.join(foreign)}; nothing written")
        error, limit, runtime = float("nan"), float("nan"), "not checked"
        if check:
            session = onnxruntime_session(tmp, example.device)
            runtime = f"onnxruntime ({onnxruntime_provider(session)})"
            got = run_onnxruntime(session, x_check)
            error, limit = _max_error(got, reference), tolerance(reference, model, x_check)
            _refuse_if(error, limit, runtime, x_check.shape[0])
    logger.debug(f"wrote {path}: ONNX opset {written_opset}, {sum(operators.values())} nodes; {runtime}: max abs error "
                f"{error:.3g} on a batch of {x_check.shape[0]}")
    return ExportResult(path, "onnx", example.dtype, None if dynamic_batch else example.shape[0], error, limit,
                        x_check.shape[0], runtime, operators, (), written_opset)


def _program_operators(program) -> tuple[dict[str, int], tuple[str, ...]]:
    calls = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    custom = tuple(sorted({t.rsplit(".", 1)[0].replace(".", "::", 1) for t in calls if t.startswith("utilrank")}))
    return dict(sorted(calls.items())), custom


def export_program(model: nn.Module, example: torch.Tensor, path: str | Path, *, dynamic_batch: bool = True,
                   check: bool = True) -> ExportResult:
    """Write ``torch.export.export(model, (example,))`` (non-strict) with ``torch.export.save`` at ``path``;
    factored modules keep their backends (a kernel backend stays as a ``utilrank::`` custom op). Checked by
    reloading the file (``torch.export.load``) and running it on a batch against the model."""
    path = Path(path)
    model.eval()
    x_check = _check_input(example, dynamic_batch)
    with torch.inference_mode():
        reference = model(x_check)
    try:
        # traced without autograd: the kernel backends are inference paths, a traced gradient would send every
        # factored module to the torch path ("auto") or refuse ("triton", "cuda")
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim(dynamic_batch), strict=False)
    except Exception as exc:  # the exporter's errors are many kinds; one line, the cause chained
        raise ExportError(f"torch.export failed: {_first_line(exc)}") from exc
    operators, custom = _program_operators(program)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: torch.export warns about a path not ending in .pt2
            torch.export.save(program, f)
        error, limit, runtime = float("nan"), float("nan"), "not checked"
        if check:
            runtime = "torch.export.load"
            with open(tmp, "rb") as f, torch.inference_mode():
                got = torch.export.load(f).module()(x_check)
            error, limit = _max_error(got, reference), tolerance(reference, model, x_check)
            _refuse_if(error, limit, runtime, x_check.shape[0])
    logger.debug(f"wrote {path}: ExportedProgram, custom ops {', '.join(custom) or 'none'}; {runtime}: max abs "
                f"error {error:.3g} on a batch of {x_check.shape[0]}")
    return ExportResult(path, "exported-program", example.dtype, None if dynamic_batch else example.shape[0], error,
                        limit, x_check.shape[0], runtime, operators, custom)
