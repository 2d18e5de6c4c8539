"""The one dispatch rule: which implementation runs an op, for every op and module of the package.

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
5. Low-rank linear and MLP with at most 16 rows (tokens) and the CUDA extension built: the extension's
   one-launch kernel, unless ``benchmarks/cuda_results.py`` recorded another backend as faster on this GPU
   for the nearest shape (``ops/_cuda_ext.small_m_choice``).
6. Triton installed: Triton. Otherwise the torch path; for ``conv_covariance_update`` that means im2col
   patches formed on the GPU (``F.unfold``, in chunks of ``UTILRANK_IM2COL_CHUNK_BYTES``).

Each time ``auto`` passes over a kernel for a CUDA tensor (rules 2, 4, 6, or a recorded table preferring
another backend) it says why once per reason (a ``KernelFallbackWarning``). A named backend (``"triton"``,
``"cuda"``) is used or fails with a one-line error naming what is wrong; ``"torch"`` is always the torch path.
Under ``TRITON_INTERPRET=1``, ``backend="triton"`` also runs on CPU tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _backend

LOWRANK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the covariance kernels form fp64 inputs' products in fp32, as the torch reference does
COVARIANCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts for a matmul
CUDA_EXT_OPS = ("lowrank_linear", "lowrank_mlp")
CUDA_EXT_MAX_ROWS = 16


class KernelFallbackWarning(UserWarning):
    """``backend="auto"`` ran the torch path for CUDA tensors; the message says why."""


@dataclass(frozen=True)
class Choice:
    impl: str  # "torch" | "triton" | "cuda"
    cast_to: torch.dtype | None = None  # autocast: cast the floating operands to this dtype first
    reason: str = ""  # why a kernel was passed over ("" when none was)


_warned: set[tuple[str, str]] = set()


def _say_once(op: str, reason: str) -> None:
    if (op, reason) in _warned or torch.compiler.is_compiling():
        return
    _warned.add((op, reason))
    warnings.warn(f"{op}: backend='auto' runs the torch path: {reason}", KernelFallbackWarning, stacklevel=4)


# The predicates the rule reads, one function each (tests replace them to fake a GPU, an extension, ...).
def on_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``t``'s device, or None where it is off."""
    device = t.device.type
    if device == "cuda" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def triton_available() -> bool:
    return _backend.HAS_TRITON


def triton_interpret() -> bool:
    return _backend.triton_interpret()


def cuda_extension_loaded() -> bool:
    return _backend.cuda_extension() is not None


def small_m_choice(op: str, rows: int, shape: tuple[int, int, int], dtype: torch.dtype) -> str | None:
    """The backend ``benchmarks/cuda_results.py`` measured fastest for the nearest recorded shape, or None."""
    from ._cuda_ext import small_m_choice as recorded

    return recorded(op, rows, *shape, dtype)


def _operand_problem(x: torch.Tensor, operands: Sequence[torch.Tensor | None], supported) -> str | None:
    if x.dtype not in supported:
        return f"the kernels take {', '.join(str(d).removeprefix('torch.') for d in supported)}, not {x.dtype}"
    for t in operands:
        if t is None:
            continue
        if t.device != x.device:
            return f"operands on different devices ({x.device} and {t.device})"
        if t.dtype != x.dtype:
            return f"operands of mixed dtypes ({x.dtype} and {t.dtype}) outside autocast"
    return None


def choose(op: str, backend: str, x: torch.Tensor, operands: Sequence[torch.Tensor | None] = (), *,
           needs_grad: bool = False, rows: int | None = None,
           shape: tuple[int, int, int] | None = None) -> Choice:
    """Which implementation runs ``op`` (see the module docstring). ``operands``: every other tensor the
    kernel reads with ``x``'s dtype (weights, bias); ``rows``: ``x``'s rows once its leading dims are
    flattened; ``shape``: ``(in_features, out_features, rank)`` for the small-M table."""
    _backend.check_backend(op, backend)
    if backend == "torch":
        return Choice("torch")
    covariance = op.endswith("covariance_update")
    supported = COVARIANCE_DTYPES if covariance else LOWRANK_DTYPES
    cast_to = None if covariance else autocast_dtype(x)
    if cast_to is not None:
        floats = [t for t in (x, *operands) if t is not None and t.is_floating_point()]
        if all(t.dtype == cast_to for t in floats) or any(t.dtype not in AUTOCAST_CASTS for t in floats):
            cast_to = None  # nothing to cast, or an fp64 operand autocast would leave as it is
    if cast_to is not None:
        others = [t for t in operands if t is not None and t.device != x.device]
        problem = f"operands on different devices ({x.device} and {others[0].device})" if others else None
    else:
        problem = _operand_problem(x, operands, supported)
    x_dtype = cast_to or x.dtype

    if backend == "auto":
        if not on_cuda(x):
            return Choice("torch")
        if needs_grad:
            return _fallback(op, "a gradient is needed and the kernels are inference-only")
        if problem:
            return _fallback(op, problem)
        if op in CUDA_EXT_OPS and rows is not None and 0 < rows <= CUDA_EXT_MAX_ROWS and cuda_extension_loaded():
            recorded = small_m_choice(op, rows, shape, x_dtype) if shape is not None else None
            if recorded in (None, "cuda"):
                return Choice("cuda", cast_to)
            if recorded == "torch":
                return _fallback(op, "the recorded small-M table measured the torch path fastest here")
        if triton_available():
            return Choice("triton", cast_to)
        if op == "conv_covariance_update":
            return _fallback(op, "triton is not installed: im2col patches are formed on the GPU with F.unfold")
        return _fallback(op, "triton is not installed")

    if needs_grad:
        raise RuntimeError(f"{op}: backend={backend!r} is inference-only; use backend='torch' to train")
    if problem:
        raise ValueError(f"{op}: backend={backend!r}: {problem}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
        if not (on_cuda(x) or (x.device.type == "cpu" and triton_interpret())):
            raise RuntimeError(f"{op}: backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU "
                               f"tensors); got a tensor on {x.device}")
        return Choice("triton", cast_to)
    # backend == "cuda"
    if op not in CUDA_EXT_OPS:
        raise RuntimeError(f"{op}: the CUDA extension has no kernel for this op; use backend='triton' or 'torch'")
    if not cuda_extension_loaded():
        raise RuntimeError(f"{op}: backend='cuda' needs the compiled extension; build it with "
                           ".ci/build_cuda_ext.sh (UTILRANK_BUILD_CUDA=1 pip install -e . --no-build-isolation)")
    if not on_cuda(x):
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors; got a tensor on {x.device}")
    if rows is not None and rows > CUDA_EXT_MAX_ROWS:
        raise ValueError(f"{op}: backend='cuda' runs the small-M kernel, which takes at most "
                         f"{CUDA_EXT_MAX_ROWS} rows (tokens); x has {rows}. Use backend='triton' or 'torch'")
    return Choice("cuda", cast_to)


def _fallback(op: str, reason: str) -> Choice:
    _say_once(op, reason)
    return Choice("torch", reason=reason)


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
