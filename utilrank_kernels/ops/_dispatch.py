"""The one dispatch rule: which implementation runs an op, for every op and module of the package; and what it
reads: the backend names, whether Triton, the interpreter and the compiled CUDA extension are here, and the
measured small-M table. Nothing else in the package decides these.

:func:`choose` looks at every operand (device and dtype of ``x``, the weights and the bias), whether a
gradient is needed, ``torch.is_autocast_enabled`` and the number of rows, and returns a :class:`Choice`:

``backend="auto"``, in this order:

1. ``x`` not on a CUDA device: the torch path (it is the CPU path; nothing is passed over).
2. A gradient is needed: the torch path (the kernels are inference-only).
3. Under autocast on CUDA, the operands are cast to the autocast dtype first, as ``F.linear`` /
   ``F.conv2d`` would cast them (a bf16 input with fp32 weights then runs in bf16 on the kernel instead of
   reaching it with mixed dtypes). The covariance ops take ``x`` as it is (autocast has no rule for them).
4. An operand on another device, or of another dtype than ``x``, or a dtype the kernels lack (fp64 for the
   low-rank ops): the torch path (which raises where torch itself would).
5. Low-rank linear and MLP with at most ``SMALL_M_MAX_ROWS`` (16) rows (tokens) and the CUDA extension built:
   the extension's one-launch kernel, unless the device's small-M table (below) recorded another backend as
   faster for the nearest shape.
6. Triton installed: Triton. Otherwise the torch path; for ``conv_covariance_update`` that means im2col
   patches formed on the GPU (``F.unfold``, in chunks of ``UTILRANK_IM2COL_CHUNK_BYTES``).

Each time ``auto`` passes over a kernel for a CUDA tensor (rules 2, 4, 6, or a recorded table preferring
another backend) it says why once per reason (a ``KernelFallbackWarning``).

Rules 5-6 are the fixed rule. Where ``auto`` reaches them for a factored op (``Choice.tunable``), the measured
choice (``ops/_tune.py``, on unless ``UTILRANK_TUNE=0``) times the op's candidates (:data:`TUNE_CANDIDATES`; those
:func:`candidate_problem` rules out are passed over with its reason) once per shape bucket and runs the fastest;
the fixed rule is what it falls back to where nothing may be timed (CUDA-graph capture, ``torch.compile``
tracing) and nothing is recorded. A named backend (``"triton"``,
``"cuda"``) is used or fails with a one-line error naming what is wrong; ``"torch"`` is always the torch path.
Under ``TRITON_INTERPRET=1``, ``backend="triton"`` also runs on CPU tensors.

The small-M table: ``benchmarks/kernels/cuda_small_m.py`` times the CUDA extension, the Triton kernel and the
two-call torch path on ViT shapes for M up to 16 and records, per device, which was fastest, with
:func:`write_small_m_table` (into the cache folder: ``<UTILRANK_CACHE>/small_m/<device slug>.json``);
:func:`small_m_choice` reads it (``$UTILRANK_SMALL_M_TABLE`` names another file). Without a table for the
device there is no recorded choice, and rule 5 takes the extension.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import env
from .._files import cache_dir, write_json
from ..timing import device_slug

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda")
LOWRANK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the covariance kernels form fp64 inputs' products in fp32, as the torch reference does
COVARIANCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts for a matmul
CUDA_EXT_OPS = ("lowrank_linear", "lowrank_mlp")
# What the measured choice times per op (ops/_tune.py). "triton:fused" / "triton:split": the Triton launcher with
# that ``path=``; "linears": the MLP as two factored linears, each with its own measured choice.
TUNE_CANDIDATES = {
    "lowrank_linear": ("torch", "triton:fused", "triton:split", "cuda"),
    "lowrank_mlp": ("triton:fused", "linears", "cuda"),
    "lowrank_conv2d": ("torch", "triton"),
}
SMALL_M_MAX_ROWS = 16  # rows (tokens) the CUDA extension's kernels take (kMaxM in csrc/small_m_plan.h)
SMALL_M_TABLE_FORMAT = "utilrank.small_m_table/1"


def check_backend(op: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# ------------------------------------------------------------------------------------------------
# What is here. The predicates the rule reads, one function each (tests replace them to fake a GPU, an
# extension, ...).
# ------------------------------------------------------------------------------------------------
# read once at import: torch.compile then sees a constant, not a call into importlib
HAS_TRITON = importlib.util.find_spec("triton") is not None
_extension: list = []  # the loaded utilrank_kernels._C (or None), once looked up


def triton_available() -> bool:
    return HAS_TRITON


def triton_interpret() -> bool:
    return env.flag("TRITON_INTERPRET")


def cuda_extension():
    """The compiled ``utilrank_kernels._C`` module, or None; a missing build never breaks import."""
    if not _extension:
        try:
            # by name: loading the extension needs no import of the package face
            module = importlib.import_module("utilrank_kernels._C")
        except ImportError as exc:  # built only with UTILRANK_BUILD_CUDA=1
            logger.debug("utilrank_kernels._C not loaded, backend='cuda' unavailable: %s", exc)
            module = None
        _extension.append(module)
    return _extension[0]


def cuda_extension_loaded() -> bool:
    return cuda_extension() is not None


def on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``t``'s device, or None where it is off."""
    device = t.device.type
    if device == "cuda" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


# ------------------------------------------------------------------------------------------------
# The measured small-M table.
# ------------------------------------------------------------------------------------------------
def _cached_table_path(device: str | torch.device) -> Path:
    return cache_dir() / "small_m" / f"{device_slug(device)}.json"


def small_m_table_path(device: str | torch.device = "cuda") -> Path:
    """Where the small-M table of ``device`` is read: ``$UTILRANK_SMALL_M_TABLE``, else the cache's
    ``small_m/<device slug>.json``."""
    override = env.get("UTILRANK_SMALL_M_TABLE")
    return Path(override) if override else _cached_table_path(device)


def write_small_m_table(table: dict, device: str | torch.device = "cuda") -> Path:
    """Record ``table`` (see :func:`small_m_table`) as ``device``'s in the cache folder (atomically); returns
    the path. Later :func:`small_m_choice` calls read it (unless ``$UTILRANK_SMALL_M_TABLE`` names another)."""
    if table.get("format") != SMALL_M_TABLE_FORMAT or not table.get("entries"):
        raise ValueError(f"write_small_m_table: not a {SMALL_M_TABLE_FORMAT} table with entries")
    path = _cached_table_path(device)
    write_json(path, table)
    small_m_table.cache_clear()
    return path


@functools.cache
def small_m_table(device: str | torch.device | None = None) -> dict | None:
    """The small-M dispatch table recorded for a device (default: the current CUDA device), or None.

    ``{"format": "utilrank.small_m_table/1", "device": str, "entries": [{"op", "m", "in_features",
    "out_features", "rank", "dtype", "fastest", "us": {backend: microseconds}}]}``, read from
    :func:`small_m_table_path` (a benchmark result file holding it under ``"dispatch"`` reads too). None
    without a table: then nothing picks a backend by measurement."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = "cuda"
    path = small_m_table_path(device)
    try:
        data = json.loads(path.read_text())
        table = data.get("dispatch", data)
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(table, dict) or table.get("format") != SMALL_M_TABLE_FORMAT or not table.get("entries"):
        logger.debug("%s holds no small-M dispatch table", path)
        return None
    return table


def small_m_choice(op: str, rows: int, shape: tuple[int, int, int], dtype: torch.dtype, *,
                   available: tuple[str, ...] = ("cuda", "triton", "torch"),
                   device: str | torch.device | None = None) -> str | None:
    """The backend measured fastest, among ``available``, for the recorded shape nearest to this one
    (``shape``: ``(in_features, out_features, rank)``).

    Entries of the same op and dtype are considered; the nearest has the closest M (preferring the
    next larger), then the closest weight size (log ratio of ``rank * (in + out)``). None when the
    device has no table, no entry matches, or M is beyond the small-M range."""
    if rows < 1 or rows > SMALL_M_MAX_ROWS:
        return None
    table = small_m_table(device)
    if table is None:
        return None
    dtype_name = str(dtype).removeprefix("torch.")
    entries = [e for e in table["entries"] if e.get("op") == op and e.get("dtype") == dtype_name]
    if not entries:
        return None
    in_features, out_features, rank = shape
    size = rank * (in_features + out_features)

    def distance(e: dict) -> tuple[float, float]:
        dm = e["m"] - rows
        e_size = max(e["rank"] * (e["in_features"] + e["out_features"]), 1)
        return (dm if dm >= 0 else 2 * -dm, abs(math.log(e_size / max(size, 1))))

    best = min(entries, key=distance)
    times = {k: v for k, v in best.get("us", {}).items() if k in available and v is not None}
    return min(times, key=times.get) if times else None


# ------------------------------------------------------------------------------------------------
# The rule.
# ------------------------------------------------------------------------------------------------
class KernelFallbackWarning(UserWarning):
    """``backend="auto"`` ran the torch path for CUDA tensors; the message says why."""


@dataclass(frozen=True)
class Choice:
    impl: str  # "torch" | "triton" | "cuda"; measured choices also "triton:fused" | "triton:split" | "linears"
    cast_to: torch.dtype | None = None  # autocast: cast the floating operands to this dtype first
    reason: str = ""  # why a kernel was passed over ("" when none was)
    # ``auto`` reached the kernel rules (5-6) for a factored op: the measured choice may pick among its candidates
    tunable: bool = field(default=False, compare=False)


_warned: set[tuple[str, str]] = set()


def _say_once(op: str, reason: str, stacklevel: int) -> None:
    if (op, reason) in _warned or torch.compiler.is_compiling():
        return
    _warned.add((op, reason))
    warnings.warn(f"{op}: backend='auto' runs the torch path: {reason}", KernelFallbackWarning, stacklevel=stacklevel)


def _fallback(op: str, reason: str, stacklevel: int = 5) -> Choice:
    """``stacklevel`` for the warning: _say_once, _fallback, _auto_rule, choose, then the op (one more from
    _kernel_rule)."""
    _say_once(op, reason, stacklevel)
    return Choice("torch", reason=reason)


def _autocast_cast(x: torch.Tensor, operands: Sequence[torch.Tensor | None]) -> torch.dtype | None:
    """The dtype autocast would cast the operands to, or None (autocast off, nothing to cast, or an fp64
    operand autocast would leave as it is)."""
    cast_to = autocast_dtype(x)
    if cast_to is None:
        return None
    floats = [t for t in (x, *operands) if t is not None and t.is_floating_point()]
    if all(t.dtype == cast_to for t in floats) or any(t.dtype not in AUTOCAST_CASTS for t in floats):
        return None
    return cast_to


def _operand_problem(x: torch.Tensor, operands: Sequence[torch.Tensor | None], supported,
                     cast_to: torch.dtype | None) -> str | None:
    """What keeps the operands from a kernel: devices, and (unless autocast casts them) dtypes."""
    if cast_to is None and x.dtype not in supported:
        return f"the kernels take {', '.join(str(d).removeprefix('torch.') for d in supported)}, not {x.dtype}"
    for t in operands:
        if t is None:
            continue
        if t.device != x.device:
            return f"operands on different devices ({x.device} and {t.device})"
        if cast_to is None and t.dtype != x.dtype:
            return f"operands of mixed dtypes ({x.dtype} and {t.dtype}) outside autocast"
    return None


def _auto_rule(op: str, x: torch.Tensor, cast_to: torch.dtype | None, problem: str | None, needs_grad: bool,
               rows: int | None, shape: tuple[int, int, int] | None) -> Choice:
    """``backend="auto"``: rules 1-6 of the module docstring."""
    if not on_cuda(x):
        return Choice("torch")
    if needs_grad:
        return _fallback(op, "a gradient is needed and the kernels are inference-only")
    if problem:
        return _fallback(op, problem)
    choice = _kernel_rule(op, x, cast_to, rows, shape)
    # a plain constructor, not dataclasses.replace: dynamo traces this under torch.compile(fullgraph=True)
    return Choice(choice.impl, choice.cast_to, choice.reason, tunable=True) if op in TUNE_CANDIDATES else choice


def _kernel_rule(op: str, x: torch.Tensor, cast_to: torch.dtype | None, rows: int | None,
                 shape: tuple[int, int, int] | None) -> Choice:
    """Rules 5-6: the fixed rule among the kernels, for operands a kernel takes."""
    small_m = op in CUDA_EXT_OPS and rows is not None and 0 < rows <= SMALL_M_MAX_ROWS
    if small_m and cuda_extension_loaded():
        recorded = small_m_choice(op, rows, shape, cast_to or x.dtype) if shape is not None else None
        if recorded in (None, "cuda"):
            return Choice("cuda", cast_to)
        if recorded == "torch":
            return _fallback(op, "the recorded small-M table measured the torch path fastest here", 6)
    if triton_available():
        return Choice("triton", cast_to)
    if op == "conv_covariance_update":
        return _fallback(op, "triton is not installed: im2col patches are formed on the GPU with F.unfold", 6)
    return _fallback(op, "triton is not installed", 6)


def candidate_problem(op: str, name: str, rows: int, dtype: torch.dtype) -> str | None:
    """Why the measured choice passes over candidate ``name`` of ``op`` (one of ``TUNE_CANDIDATES[op]``) for
    ``rows`` rows of ``dtype`` before timing it, or None where it is timed (a candidate may still fail when
    run: it is passed over then with its error)."""
    kind = name.partition(":")[0]
    if kind == "triton" and not triton_available():
        return "triton is not installed"
    if kind == "cuda":
        if not cuda_extension_loaded():
            return "the CUDA extension utilrank_kernels._C is not built"
        if not 0 < rows <= SMALL_M_MAX_ROWS:
            return f"the CUDA extension takes 1 to {SMALL_M_MAX_ROWS} rows, not {rows}"
    if op == "lowrank_mlp" and name == "triton:fused" and dtype not in (torch.float16, torch.bfloat16):
        return f"the fused MLP kernel takes 16-bit inputs, not {str(dtype).removeprefix('torch.')}"
    return None


def _triton_rule(op: str, x: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if not (on_cuda(x) or (x.device.type == "cpu" and triton_interpret())):
        raise RuntimeError(f"{op}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU "
                           f"tensors); got a tensor on {x.device}")


def _cuda_rule(op: str, x: torch.Tensor, rows: int | None) -> None:
    if op not in CUDA_EXT_OPS:
        raise RuntimeError(f"{op}: the CUDA extension has no kernel for this op; use backend='triton' or 'torch'")
    if not cuda_extension_loaded():
        raise RuntimeError(f"{op}: backend='cuda' needs the compiled extension; build it with "
                           ".ci/build_cuda_ext.sh (UTILRANK_BUILD_CUDA=1 pip install -e . --no-build-isolation)")
    if not on_cuda(x):
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors; got a tensor on {x.device}")
    if rows is not None and rows > SMALL_M_MAX_ROWS:
        raise ValueError(f"{op}: backend='cuda' runs the small-M kernel, which takes at most "
                         f"{SMALL_M_MAX_ROWS} rows (tokens); x has {rows}. Use backend='triton' or 'torch'")


def _named_rule(op: str, backend: str, x: torch.Tensor, cast_to: torch.dtype | None, problem: str | None,
                needs_grad: bool, rows: int | None) -> Choice:
    """``backend="triton"`` or ``"cuda"``: that kernel, or a one-line error naming what is wrong."""
    if needs_grad:
        raise RuntimeError(f"{op}: backend={backend!r} is inference-only; use backend='torch' to train")
    if problem:
        raise ValueError(f"{op}: backend={backend!r}: {problem}")
    if backend == "triton":
        _triton_rule(op, x)
    else:
        _cuda_rule(op, x, rows)
    return Choice(backend, cast_to)


def choose(op: str, backend: str, x: torch.Tensor, operands: Sequence[torch.Tensor | None] = (), *,
           needs_grad: bool = False, rows: int | None = None,
           shape: tuple[int, int, int] | None = None) -> Choice:
    """Which implementation runs ``op`` (see the module docstring). ``operands``: every other tensor the
    kernel reads with ``x``'s dtype (weights, bias); ``rows``: ``x``'s rows once its leading dims are
    flattened; ``shape``: ``(in_features, out_features, rank)`` for the small-M table."""
    check_backend(op, backend)
    if backend == "torch":
        return Choice("torch")
    covariance = op.endswith("covariance_update")
    cast_to = None if covariance else _autocast_cast(x, operands)
    problem = _operand_problem(x, operands, COVARIANCE_DTYPES if covariance else LOWRANK_DTYPES, cast_to)
    if backend == "auto":
        return _auto_rule(op, x, cast_to, problem, needs_grad, rows, shape)
    return _named_rule(op, backend, x, cast_to, problem, needs_grad, rows)


# ------------------------------------------------------------------------------------------------
# What the ops do with a choice.
# ------------------------------------------------------------------------------------------------
def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` in the autocast dtype a :class:`Choice` asks for (floating tensors only); the kernel's output
    then has that dtype, as ``F.linear``'s has under autocast."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


def through_op() -> bool:
    """Whether an op call goes through its ``torch.library`` custom op rather than straight to the
    implementation: under ``torch.compile``, and under a dispatch mode (``FlopCounterMode``, fake tensors),
    which sees the op and not a kernel launch. Eager calls skip the op's Python dispatch (tens of
    microseconds a call, which batch-1 latency and the small layers of a statistics pass feel)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
