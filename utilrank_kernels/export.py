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
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._files import atomic_path
from .models.hf import KeywordInputs
from .nn import FACTORED_MODULES

logger = logging.getLogger(__name__)
FORMATS = ("onnx", "exported-program")
SUFFIXES = {"onnx": ".onnx", "exported-program": ".pt2"}
DEPLOY_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the `deploy` extra
# the largest |exported - PyTorch| accepted in fp32, relative to max(1, max |output|): onnxruntime's graph
# rewrites (fused Gemm, LayerNorm, GELU) moved outputs by 2.6e-6 on the trained built-in folder, 3.6e-7 on a
# compressed ViT-S and 2.5e-6 on ViT-B/16 at 50% (`utilrank export`, benchmarks/models/vit_b_engines.py)
FP32_TOLERANCE = 1e-4
# the int8 file's agreement with the fp32 one it is made from, below which it is refused (``quantize_onnx``):
# ViT-B/16 with random weights agreed at logit cosine 0.999 (issue 26); a broken quantization gives ~0
INT8_MIN_COSINE = 0.99
QUANTIZATIONS = ("int8",)
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
    input_names: tuple[str, ...] = ("input",)
    output_names: tuple[str, ...] = ("output",)


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


Example = torch.Tensor | Mapping[str, torch.Tensor]


def opset_range() -> tuple[int, int]:
    """The ONNX opsets ``export_onnx`` writes as asked: from torchlib's opset (18: asked for less, torch's dynamo
    exporter writes 18 and tries a conversion that may keep 18) to the newest onnxscript's version converter knows
    (25 with onnxscript 0.7; asked for more, the exporter falls back to 18). Its default is torch's (20)."""
    try:  # private constants of the two exporters; the documented range where they move
        from onnxscript.version_converter import _version_converter as converter  # optional: the deploy extra
        from torch.onnx._internal.exporter import _constants
    except ImportError:
        return 18, 20
    return _constants.TORCHLIB_OPSET, getattr(converter, "SUPPORTED_MAX_ONNX_OPSET", 20)


def _tensors(output) -> list[tuple[str, torch.Tensor]]:
    """A model's output as named tensors: a tensor (``output``), a mapping such as a transformers ``ModelOutput``
    (its tensor fields: ``logits``, ``last_hidden_state``, ``pooler_output``), or a tuple (``output_i``)."""
    if isinstance(output, torch.Tensor):
        return [("output", output)]
    if isinstance(output, Mapping):
        return [(str(k), v) for k, v in output.items() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        return [(f"output_{i}", v) for i, v in enumerate(output) if isinstance(v, torch.Tensor)]
    raise ExportError(f"the model returns {type(output).__name__}, not tensors")


class _Graph(nn.Module):
    """The model as the exporters see it: positional tensors in (passed by name, ``names``, where the model takes
    keyword inputs: a transformers model), a tuple of tensors out (a ``ModelOutput``'s tensor fields)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...] | None):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor):
        output = self.model(**dict(zip(self.names, inputs, strict=True))) if self.names else self.model(*inputs)
        return tuple(t for _, t in _tensors(output))


@dataclass(frozen=True)
class _Prepared:
    """What both exporters trace: the module, its positional inputs, their names, the dynamic axes, the output
    names, and the check batch with the model's outputs on it."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    dynamic_shapes: tuple | None
    output_names: list[str]
    check_args: tuple[torch.Tensor, ...]
    reference: torch.Tensor | tuple[torch.Tensor, ...]

    @property
    def batch(self) -> int:
        return self.args[0].shape[0]

    @property
    def check_batch(self) -> int:
        return self.check_args[0].shape[0]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``models.hf.KeywordInputs`` (the wrapper that feeds a dict as keywords)."""
    return model.model if isinstance(model, KeywordInputs) else model


def _prepare(model: nn.Module, example: Example, dynamic_batch: bool, *, torch_path: bool,
             input_name: str = "input") -> _Prepared:
    """The traced module and its inputs. A tensor example into a model that returns a tensor is traced as the
    model is (input ``input_name``, output ``output``); a dict example (a text model's ``input_ids``,
    ``attention_mask``) or a model that returns a ``ModelOutput`` is traced through ``_Graph``, inputs and outputs
    named after their fields. Dynamic axes: the batch (``dynamic_batch``) and, for a dict example, the sequence
    (axis 1 of every input). The reference outputs on the check batch come from the torch path (``torch_path``:
    what ONNX holds) or the model's own backends."""
    model.eval()
    keyword = isinstance(example, Mapping)
    names = tuple(example) if keyword else None
    args = tuple(example.values()) if keyword else (example,)
    check_args = _check_inputs(args, names, dynamic_batch)
    backends = torch_backend(model) if torch_path else contextlib.nullcontext()
    with backends, torch.inference_mode():
        output = model(**dict(zip(names, check_args, strict=True))) if keyword else model(*check_args)
    plain = not keyword and isinstance(output, torch.Tensor)
    named = _tensors(output)
    if not named:
        raise ExportError(f"the model returns {type(output).__name__} without tensors: nothing to export")
    axes = ({0: torch.export.Dim("batch", min=1)} if dynamic_batch else {}) | (
        {1: torch.export.Dim("sequence", min=1)} if keyword else {})
    # a plain module's one input, or _Graph's one *inputs argument: a tuple of the inputs' axes
    dynamic = None if not axes else (axes,) if plain else (tuple(dict(axes) for _ in args),)
    module = model if plain else _Graph(model, names).eval()
    reference = named[0][1] if plain else tuple(t for _, t in named)
    return _Prepared(module, args, list(names or [input_name]), dynamic, [n for n, _ in named], check_args, reference)


def _check_inputs(args: tuple[torch.Tensor, ...], names: tuple[str, ...] | None,
                  dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    """The check batch: the example itself for a static batch; for a dynamic one, one more row than the traced
    example (random, seeded), so that the symbolic batch axis is what gets checked. A dict example (token ids and
    masks) is made from its own values instead: its first row repeated (a dynamic batch), one token shorter (the
    sequence axis; the traced length may be the model's last position), and the last row's final two positions
    masked, so that padding is checked too."""
    if names is None:
        (example,) = args
        if not dynamic_batch:
            return args
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=generator)
        return (x.to(device=example.device, dtype=example.dtype),)
    grown = []
    for name, t in zip(names, args, strict=True):
        t = t[:, :-1] if t.shape[1] > 2 else torch.cat([t, t[:, -1:]], dim=1)  # shorter: within the positions
        t = torch.cat([t, t[:1]], dim=0) if dynamic_batch else t.clone()
        if name == "attention_mask" and t.shape[1] > 2:
            t[-1, -2:] = 0
        grown.append(t)
    return tuple(grown)


def _float_dtype(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.dtype:
    """The dtype the export runs in: the example's where it is floating point, else the model's weights'."""
    floating = [a.dtype for a in args if a.is_floating_point()]
    if floating:
        return floating[0]
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def tolerance(reference, model: nn.Module | None = None, x=None) -> float:
    """The largest accepted |exported - PyTorch| for ``reference`` (the PyTorch model's output on ``x``: a tensor or
    a tuple of them; ``x`` a tensor or a tuple of the model's positional inputs).

    fp32: ``FP32_TOLERANCE * max(1, max |reference|)``. Half precision: flash-attention's rule, an exported
    model may be at most 2x as far from the fp32 model as PyTorch's own half-precision run is; the two
    half-precision runs then differ by at most 3x that distance (``model`` and ``x`` give the fp32 run)."""
    outputs = reference if isinstance(reference, tuple) else (reference,)
    scale = max(1.0, *(float(r.abs().max()) for r in outputs))
    if outputs[0].dtype == torch.float32 or model is None or x is None:
        return FP32_TOLERANCE * scale
    args = x if isinstance(x, tuple) else (x,)
    fp32 = copy.deepcopy(model).float()
    with torch.inference_mode():
        full = fp32(*(a.float() if a.is_floating_point() else a for a in args))
    full = full if isinstance(full, tuple) else (full,)
    own_error = max(float((f - r.float()).abs().max()) for f, r in zip(full, outputs, strict=True))
    return 3 * own_error + FP32_TOLERANCE * scale


def _max_error(got, want) -> float:
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    if len(got) != len(want):
        raise ExportError(f"the exported model returns {len(got)} outputs, the model {len(want)}")
    error = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            raise ExportError(f"the exported model returns shape {tuple(g.shape)}, the model {tuple(w.shape)}")
        error = max(error, float((g.float() - w.float()).abs().max()))
    return error


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


def run_onnxruntime(session, x: Example):
    """One run of ``session`` on ``x`` (a tensor, or a dict of tensors by input name; host copies in and out): the
    check's path, not the timed one. The output tensor, or a tuple of them where the graph has several."""
    named = x if isinstance(x, Mapping) else {session.get_inputs()[0].name: x}
    device = next(iter(named.values())).device
    outputs = session.run(None, {name: t.detach().cpu().numpy() for name, t in named.items()})
    tensors = tuple(torch.from_numpy(o).to(device) for o in outputs)
    return tensors[0] if len(tensors) == 1 else tensors


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """The logger ``name`` (``""``: the root logger, where onnxruntime's tools log) at ERROR for the duration: their
    advice ("pre-process the model", "specify num_heads") is not a problem of the run."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def first_output(output) -> torch.Tensor:
    """A model's first output tensor (its logits): the tensor itself, a ``ModelOutput``'s first tensor field, or a
    tuple's first tensor."""
    return _tensors(output)[0][1]


def agreement(got: torch.Tensor, want: torch.Tensor) -> dict:
    """How far ``got`` (a model's outputs in another dtype or runtime) agrees with ``want`` (the fp32 reference):
    ``logit_cosine``, the smallest per-example cosine of the flattened outputs; ``top1_agreement``, the fraction
    of examples whose arg-max over the last axis (the class) is the same; ``max_abs_error``. Computed in fp64."""
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if g.shape != w.shape:
        raise ValueError(f"outputs of shape {tuple(g.shape)} against {tuple(w.shape)}")
    flat_g, flat_w = g.reshape(g.shape[0], -1), w.reshape(w.shape[0], -1)
    cosine = torch.nn.functional.cosine_similarity(flat_g, flat_w, dim=1, eps=1e-30)
    top1 = (g.argmax(-1) == w.argmax(-1)).double().mean()
    return {"logit_cosine": round(float(cosine.min()), 6), "top1_agreement": round(float(top1), 4),
            "max_abs_error": float(f"{float((g - w).abs().max()):.3g}")}


@dataclass(frozen=True)
class QuantizeResult:
    """An int8 file made from a checked fp32 ONNX file: its size, the fp32 file's, and the int8 file's agreement
    with the fp32 file in onnxruntime on ``check_batch`` inputs (``agreement``'s fields)."""

    path: Path
    bytes: int
    fp32_bytes: int
    check_batch: int
    logit_cosine: float
    top1_agreement: float
    max_abs_error: float


# the ops int8 quantization rewrites: by default quantize_dynamic also makes every Conv a ConvInteger, which
# onnxruntime's CPU provider runs 3-7x slower than the fp32 Conv (vgg-digits at batch 8: 3.65 ms against 0.74 ms fp32
# and 0.72 ms with MatMul/Gemm only; benchmarks/studies/cpu_quant_accuracy.py), so convolutions stay fp32
INT8_OPS = ["MatMul", "Gemm"]


def quantize_onnx(source: str | Path, path: str | Path, example: Example | None = None, *,
                  min_cosine: float = INT8_MIN_COSINE) -> QuantizeResult:
    """Dynamic int8 quantization of the fp32 ONNX file ``source`` into ``path``: onnxruntime's
    ``quantize_dynamic`` with QInt8 weights (per tensor; activations quantized at run time), every MatMul/Gemm whose
    weight is a constant (the factors and the layers left dense; ``MatMulConstBOnly``: attention's activation
    products stay fp32). Checked in onnxruntime on ``example`` (a tensor or a dict of named tensors) against the fp32
    file: refused (``ExportError``, nothing written) below ``min_cosine``."""
    _require(DEPLOY_PACKAGES, "int8 quantization")
    from onnxruntime.quantization import QuantType, quantize_dynamic  # optional: the deploy extra

    source, path = Path(source), Path(path)
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), quiet_logger(""):
                warnings.simplefilter("ignore")  # its "pre-process the model" advice: shape inference is optional
                quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS,
                                 extra_options={"MatMulConstBOnly": True})
        except Exception as exc:  # onnxruntime's quantizer raises many kinds
            raise ExportError(f"onnxruntime quantize_dynamic failed: {_first_line(exc)}") from exc
        fields = {"logit_cosine": float("nan"), "top1_agreement": float("nan"), "max_abs_error": float("nan")}
        batch = 0
        if example is not None:
            want = run_onnxruntime(onnxruntime_session(source), example)
            got = run_onnxruntime(onnxruntime_session(tmp), example)
            want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
            fields = agreement(got, want)
            batch = int(want.shape[0])
            if not fields["logit_cosine"] >= min_cosine:  # NaN refuses too
                raise ExportError(f"the int8 file agrees with the fp32 one at logit cosine "
                                  f"{fields['logit_cosine']:.4g} (below {min_cosine}) on a batch of {batch}; "
                                  "nothing written")
        size = tmp.stat().st_size
    return QuantizeResult(path, size, source.stat().st_size, batch, **fields)


def int8_path(path: str | Path) -> Path:
    """Where ``utilrank export --quantize int8`` writes the int8 file: beside the fp32 one, ``NAME-int8.onnx``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-int8{path.suffix}")


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


def _check_opset(opset: int | None) -> None:
    low, high = opset_range()
    if opset is not None and not low <= opset <= high:
        raise ExportError(f"opset {opset}: the exporter writes opset {low} to {high} (below {low} torch.onnx's "
                          f"dynamo exporter would write {low}; above {high} its version converter has no rules)")


def export_onnx(model: nn.Module, example: Example, path: str | Path, *, dynamic_batch: bool = True,
                opset: int | None = None, check: bool = True, input_name: str = "input") -> ExportResult:
    """Write ``model`` (in its dtype and on its device; eval mode) as ONNX at ``path``, traced on ``example``
    (a batch: with ``dynamic_batch`` the batch axis stays symbolic, so trace with a batch > 1), and check it
    in onnxruntime on a batch against the PyTorch model. ``example``: a tensor (input ``input_name``: an HF
    image model's is ``pixel_values``), or a dict of
    named tensors (a transformers text model's ``input_ids`` and ``attention_mask``: inputs of those names, the
    sequence axis dynamic too); a model returning a ``ModelOutput`` gets outputs named after its tensor fields.
    ``opset``: the exporter's default where None, else one of ``opset_range()``; the file is refused if it holds
    another opset than asked for."""
    _require(DEPLOY_PACKAGES, "ONNX export")
    _check_opset(opset)
    path = Path(path)
    model = _unwrapped(model)
    args = tuple(example.values()) if isinstance(example, Mapping) else (example,)
    dtype = _float_dtype(model, args)
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"ONNX export in {dtype}: onnxruntime's CPU provider has no "
                          f"{str(dtype).removeprefix('torch.')} kernels for MatMul/Conv, so the file could "
                          "not be checked; export float32 or float16 (or an ExportedProgram)")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes >= 2**31 - (64 << 20):
        raise ExportError(f"ONNX export: {weight_bytes / 2**30:.2f} GiB of weights do not fit one ONNX file "
                          "(2 GiB protobuf limit); export float16")
    prepared = _prepare(model, example, dynamic_batch, torch_path=True, input_name=input_name)
    with torch_backend(model), warnings.catch_warnings():
        # the exporter warns that two inputs' sequence axes share one name: they are one axis, as meant
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        try:
            program = torch.onnx.export(prepared.module, prepared.args, dynamo=True,
                                        dynamic_shapes=prepared.dynamic_shapes, input_names=prepared.input_names,
                                        output_names=prepared.output_names, opset_version=opset, optimize=True,
                                        verbose=False, external_data=False)
        except Exception as exc:  # the exporter's errors are many kinds; one line, the cause chained
            raise ExportError(f"torch.onnx.export (dynamo) failed: {_first_line(exc)}") from exc
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
        operators, foreign, written_opset = _onnx_operators(tmp)
        if foreign:  # every factored module ran its torch path: nothing else may reach the file
            raise ExportError(f"the ONNX graph holds non-standard ops {', '.join(foreign)}; nothing written")
        if opset is not None and written_opset != opset:  # the converter can fail and keep 18 without raising
            raise ExportError(f"opset {opset}: the exporter wrote opset {written_opset} instead (its version "
                              "converter could not convert this graph); nothing written")
        error, limit, runtime = float("nan"), float("nan"), "not checked"
        if check:
            session = onnxruntime_session(tmp, prepared.args[0].device)
            runtime = f"onnxruntime ({onnxruntime_provider(session)})"
            check_input = (dict(zip(prepared.input_names, prepared.check_args, strict=True))
                           if isinstance(example, Mapping) else prepared.check_args[0])
            got = run_onnxruntime(session, check_input)
            error = _max_error(got, prepared.reference)
            limit = tolerance(prepared.reference, prepared.module, prepared.check_args)
            _refuse_if(error, limit, runtime, prepared.check_batch)
    logger.debug(f"wrote {path}: ONNX opset {written_opset}, {sum(operators.values())} nodes; {runtime}: max abs error "
                 f"{error:.3g} on a batch of {prepared.check_batch}")
    return ExportResult(path, "onnx", dtype, None if dynamic_batch else prepared.batch, error, limit,
                        prepared.check_batch, runtime, operators, (), written_opset, tuple(prepared.input_names),
                        tuple(prepared.output_names))


def _program_operators(program) -> tuple[dict[str, int], tuple[str, ...]]:
    calls = Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    custom = tuple(sorted({t.rsplit(".", 1)[0].replace(".", "::", 1) for t in calls if t.startswith("utilrank")}))
    return dict(sorted(calls.items())), custom


def export_program(model: nn.Module, example: Example, path: str | Path, *, dynamic_batch: bool = True,
                   check: bool = True) -> ExportResult:
    """Write ``torch.export.export(model, (example,))`` (non-strict) with ``torch.export.save`` at ``path``;
    factored modules keep their backends (a kernel backend stays as a ``utilrank::`` custom op). Checked by
    reloading the file (``torch.export.load``) and running it on a batch against the model. ``example`` as for
    ``export_onnx``: a dict example or a ``ModelOutput`` is traced through a module that takes the inputs
    positionally (in the dict's order) and returns a tuple of tensors."""
    path = Path(path)
    model = _unwrapped(model)
    args = tuple(example.values()) if isinstance(example, Mapping) else (example,)
    prepared = _prepare(model, example, dynamic_batch, torch_path=False)
    try:
        # traced without autograd: the kernel backends are inference paths, a traced gradient would send every
        # factored module to the torch path ("auto") or refuse ("triton", "cuda")
        with torch.no_grad():
            program = torch.export.export(prepared.module, prepared.args, dynamic_shapes=prepared.dynamic_shapes,
                                          strict=False)
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
                got = torch.export.load(f).module()(*prepared.check_args)
            error = _max_error(got, prepared.reference)
            limit = tolerance(prepared.reference, prepared.module, prepared.check_args)
            _refuse_if(error, limit, runtime, prepared.check_batch)
    logger.debug(f"wrote {path}: ExportedProgram, custom ops {', '.join(custom) or 'none'}; {runtime}: max abs "
                 f"error {error:.3g} on a batch of {prepared.check_batch}")
    return ExportResult(path, "exported-program", _float_dtype(model, args), None if dynamic_batch else prepared.batch,
                        error, limit, prepared.check_batch, runtime, operators, custom, None,
                        tuple(prepared.input_names), tuple(prepared.output_names))
