"""The CUDA extension's kernels behind ``backend="cuda"``: their Python entry points and fakes.

``utilrank_kernels._C`` (built from ``csrc/`` with ``UTILRANK_BUILD_CUDA=1``) registers, when loaded:

- ``torch.ops.utilrank_C.lowrank_linear_small_m(x, a, b, bias, activation)``: ``act(b (a x) + bias)``;
- ``torch.ops.utilrank_C.lowrank_mlp_small_m(x, a1, b1, bias1, a2, b2, bias2, activation)``: both
  factored layers of a ViT MLP, ``b2 (a2 act(b1 (a1 x) + bias1)) + bias2``;

each one cooperative launch for ``x`` of at most 16 rows (tokens), fp16/bf16/fp32, CUDA-graph safe.
This module holds the Python side: the two entry points the low-rank ops call and the fake (meta)
implementations that let ``torch.compile`` trace the ops (the C++ library names this module as their
home with ``set_python_module``). Whether the extension is loaded, and when ``auto`` picks it, is decided in
``ops/_dispatch.py``.
"""

from __future__ import annotations

import logging

import torch

from ._dispatch import SMALL_M_MAX_ROWS, cuda_extension, rows_of

logger = logging.getLogger(__name__)


def _check_rows(op: str, x: torch.Tensor) -> None:
    m = rows_of(x)
    if m > SMALL_M_MAX_ROWS:
        raise ValueError(
            f"{op}: backend='cuda' runs the small-M kernel, which takes at most {SMALL_M_MAX_ROWS} rows (tokens); "
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


def _register_fakes() -> None:
    try:
        torch.library.register_fake("utilrank_C::lowrank_linear_small_m")(_linear_fake)
        torch.library.register_fake("utilrank_C::lowrank_mlp_small_m")(_mlp_fake)
    except RuntimeError as exc:  # already registered (module reloaded)
        logger.debug("utilrank_C fake implementations not registered again: %s", exc)


# the fakes need the ops defined: registered once the extension is loaded (a missing build skips them)
if cuda_extension() is not None:
    _register_fakes()
