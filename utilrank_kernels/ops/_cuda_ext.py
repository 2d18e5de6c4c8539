"""The CUDA extension's kernels behind ``backend="cuda"``, and the measured small-M dispatch table.

``utilrank_kernels._C`` (built from ``csrc/`` with ``UTILRANK_BUILD_CUDA=1``) registers, when loaded:

- ``torch.ops.utilrank_C.lowrank_linear_small_m(x, a, b, bias, activation)``: ``act(b (a x) + bias)``;
- ``torch.ops.utilrank_C.lowrank_mlp_small_m(x, a1, b1, bias1, a2, b2, bias2, activation)``: both
  factored layers of a ViT MLP, ``b2 (a2 act(b1 (a1 x) + bias1)) + bias2``;

each one cooperative launch for ``x`` of at most 16 rows (tokens), fp16/bf16/fp32, CUDA-graph safe.
This module holds the Python side: the two entry points the dispatcher calls, the fake (meta)
implementations that let ``torch.compile`` trace the ops (the C++ library names this module as their
home with ``set_python_module``), and :func:`small_m_table`.

Dispatch by measurement: ``benchmarks/cuda_results.py`` times the CUDA kernel, the Triton kernel and
the two-call torch path on ViT shapes and records, per device, which was fastest for each shape and
M in ``benchmarks/results/<device>-cuda.json`` (key ``"dispatch"``). :func:`small_m_choice` reads that
table. Without a recorded table for the device there is no choice: ``backend="auto"`` does not pick
the CUDA extension on a guess.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch

from .. import env
from ._backend import cuda_extension, logger

MAX_M = 16  # rows (tokens) the small-M kernels take
TABLE_FORMAT = "utilrank.small_m_table/1"
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SCHEMAS = {
    "lowrank_linear_small_m": "utilrank_C::lowrank_linear_small_m(Tensor x, Tensor a, Tensor b, "
    "Tensor? bias=None, str? activation=None) -> Tensor",
    "lowrank_mlp_small_m": "utilrank_C::lowrank_mlp_small_m(Tensor x, Tensor a1, Tensor b1, Tensor? bias1, "
    'Tensor a2, Tensor b2, Tensor? bias2, str? activation="gelu") -> Tensor',
}


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _check_rows(op: str, x: torch.Tensor) -> None:
    m = _rows(x)
    if m > MAX_M:
        raise ValueError(
            f"{op}: backend='cuda' runs the small-M kernel, which takes at most {MAX_M} rows (tokens); "
            f"x has {m} (shape {tuple(x.shape)}). Use backend='triton' or 'torch' for larger batches"
        )


def _require(op: str, x: torch.Tensor) -> None:
    if cuda_extension() is None:
        raise RuntimeError(f"{op}: backend='cuda' needs the compiled extension; build it with .ci/build_cuda_ext.sh")
    if not x.is_cuda:
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors; got a tensor on {x.device}")


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def lowrank_linear_cuda(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``act(x a^T b^T + bias)`` for ``x`` of shape ``(..., in)`` with at most 16 rows, one launch."""
    _require("lowrank_linear", x)
    _check_rows("lowrank_linear", x)
    return torch.ops.utilrank_C.lowrank_linear_small_m(
        x.contiguous(), a.contiguous(), b.contiguous(), _c(bias), activation
    )


def lowrank_mlp_cuda(
    x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
    a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, activation: str | None = "gelu",
) -> torch.Tensor:
    """``act(x a1^T b1^T + bias1) a2^T b2^T + bias2`` for at most 16 rows, one launch."""
    _require("lowrank_mlp", x)
    _check_rows("lowrank_mlp", x)
    return torch.ops.utilrank_C.lowrank_mlp_small_m(
        x.contiguous(), a1.contiguous(), b1.contiguous(), _c(bias1),
        a2.contiguous(), b2.contiguous(), _c(bias2), activation,
    )


# ------------------------------------------------------------------------------------------------
# Fake implementations (shapes only) for torch.compile / FakeTensor / meta tensors.
# ------------------------------------------------------------------------------------------------
def _linear_fake(x, a, b, bias=None, activation=None):
    torch._check(x.shape[-1] == a.shape[1])
    torch._check(b.shape[1] == a.shape[0])
    return x.new_empty((*x.shape[:-1], b.shape[0]))


def _mlp_fake(x, a1, b1, bias1, a2, b2, bias2, activation="gelu"):
    torch._check(x.shape[-1] == a1.shape[1])
    torch._check(b2.shape[1] == a2.shape[0])
    return x.new_empty((*x.shape[:-1], b2.shape[0]))


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return
    try:
        torch.library.register_fake("utilrank_C::lowrank_linear_small_m")(_linear_fake)
        torch.library.register_fake("utilrank_C::lowrank_mlp_small_m")(_mlp_fake)
    except RuntimeError as exc:  # already registered (module reloaded)
        logger.debug("utilrank_C fake implementations not registered again: %s", exc)
    _FAKES_REGISTERED = True


if cuda_extension() is not None:
    _register_fakes()


# ------------------------------------------------------------------------------------------------
# The measured dispatch table.
# ------------------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: the device part of result file names."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def table_path(device_name: str) -> Path:
    override = env.get("UTILRANK_SMALL_M_TABLE")
    return Path(override) if override else RESULTS_DIR / f"{device_slug(device_name)}-cuda.json"


@functools.cache
def small_m_table(device_name: str | None = None) -> dict | None:
    """The small-M dispatch table recorded for a device (default: the current CUDA device), or None.

    Read from ``$UTILRANK_SMALL_M_TABLE`` or ``benchmarks/results/<device>-cuda.json`` (written by
    ``benchmarks/cuda_results.py``): ``{"format": "utilrank.small_m_table/1", "device": str,
    "entries": [{"op", "m", "in_features", "out_features", "rank", "dtype", "fastest",
    "us": {backend: microseconds}}]}``. None without a table: then nothing picks "cuda" automatically.
    """
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    path = table_path(device_name)
    try:
        table = json.loads(path.read_text()).get("dispatch")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or not table.get("entries"):
        logger.debug("%s holds no small-M dispatch table", path)
        return None
    return table


def small_m_choice(
    op: str, m: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype,
    available: tuple[str, ...] = ("cuda", "triton", "torch"), device_name: str | None = None,
) -> str | None:
    """The backend measured fastest, among ``available``, for the recorded shape nearest to this one.

    Entries of the same op and dtype are considered; the nearest has the closest M (preferring the
    next larger), then the closest weight size (log ratio of ``rank * (in + out)``). None when the
    device has no table, no entry matches, or M is beyond the small-M range."""
    if m < 1 or m > MAX_M:
        return None
    table = small_m_table(device_name)
    if table is None:
        return None
    dtype_name = str(dtype).removeprefix("torch.")
    entries = [e for e in table["entries"] if e.get("op") == op and e.get("dtype") == dtype_name]
    if not entries:
        return None
    size = rank * (in_features + out_features)

    def distance(e: dict) -> tuple[float, float]:
        dm = e["m"] - m
        e_size = max(e["rank"] * (e["in_features"] + e["out_features"]), 1)
        return (dm if dm >= 0 else 2 * -dm, abs(math.log(e_size / max(size, 1))))

    best = min(entries, key=distance)
    times = {k: v for k, v in best.get("us", {}).items() if k in available and v is not None}
    return min(times, key=times.get) if times else None
