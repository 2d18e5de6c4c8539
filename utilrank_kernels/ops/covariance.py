"""Streaming second-moment updates: ``acc += X^T X`` over the tokens (or im2col patches) of a batch.

The torch path is the ground truth for tests and the CPU path: the per-batch product is formed in
fp32, only the upper block triangle of it (see ``_add_gram_``), and added into the fp64 accumulator,
so rounding does not grow with the number of batches. The Triton path
(``utilrank_kernels.triton.covariance``) plugs in behind the same ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import env
from .._kernel_args import conv_output_size, pair
from ._dispatch import check_backend, choose, through_op

_IM2COL_CHUNK_BYTES = int(env.get("UTILRANK_IM2COL_CHUNK_BYTES", str(64 << 20)))


def _check_acc(op: str, acc: torch.Tensor, d: int) -> None:
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] != d:
        raise ValueError(f"{op}: accumulator has shape {tuple(acc.shape)}, expected ({d}, {d})")
    if acc.dtype not in (torch.float64, torch.float32):
        raise ValueError(f"{op}: accumulator must be float64 (or float32), got {acc.dtype}")


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------
# The symmetric update in torch's own GEMM, one row panel of the upper block triangle at a time:
# panels of width w do (d + w) / 2d of the full product's work, at a GEMM efficiency that drops as the
# panels narrow. 128 up to d = 512 and 256 above were within 4% of the best width at every d from 256
# to 3072, where one full product took 1.25x-1.66x as long (benchmarks/studies/gram_panels.py, N = 4096, 2 cores).
# scipy's ssyrk (one triangle) was as fast in isolation but slower inside the pass: its threads and
# torch's OpenMP threads, which spin between ops, share the cores (benchmarks/models/stats_pass.py, vit-digits
# on 2 cores: 2.3x the forward with ssyrk).
def _panel_width(d: int) -> int:
    return 128 if d <= 512 else 256


def _add_gram_(acc: torch.Tensor, x: torch.Tensor, upper: bool = False) -> None:
    """``acc += x^T x`` for a 2-D ``x``; a symmetric ``acc`` stays exactly symmetric. ``upper``: the
    upper triangle only (``i <= j``), the lower one is left as it is."""
    d = x.shape[1]
    width = _panel_width(d)
    gram = x.new_empty(d, d)
    for start in range(0, d, width):
        stop = min(start + width, d)
        torch.mm(x[:, start:stop].T, x[:, start:], out=gram[start:stop, start:])
    # the panels fill the upper block triangle, and their diagonal blocks are GEMM results, symmetric
    # only up to rounding: keep the upper triangle (and mirror it)
    triangle = gram.triu()
    acc.add_(triangle if upper else triangle.add_(triangle.T.tril(-1)))


def mirror_upper_(acc: torch.Tensor) -> torch.Tensor:
    """Fills the strictly lower triangle of ``acc`` with the upper one, transposed, in place: what the
    updates made with ``upper=True`` leave to be done once, after the last batch. Idempotent."""
    acc.copy_(acc.triu().add_(acc.triu(1).mT))
    return acc


def covariance_update_reference(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                                upper: bool = False) -> None:
    x2d = x.reshape(-1, x.shape[-1])
    if mask is not None:
        x2d = x2d[mask.reshape(-1)]
    if x2d.shape[0] == 0:
        return
    _add_gram_(acc, x2d.to(torch.float32), upper)


def conv_covariance_update_reference(
    acc: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    upper: bool = False,
) -> None:
    """im2col in chunks of images so that the unfolded patches stay under a fixed memory budget."""
    n_img, channels, h, w = x.shape
    kh, kw = kernel_size
    k = channels * kh * kw
    out_h, out_w = conv_output_size((h, w), kernel_size, stride, padding, dilation)
    # patchify (a ViT's patch embedding): the patches tile the image, so one reshape gathers them, several
    # times faster than F.unfold on CPU
    tiles = tuple(stride) == (kh, kw) and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1)
    per_image = max(1, out_h * out_w * k * 4)
    chunk = max(1, _IM2COL_CHUNK_BYTES // per_image)
    for start in range(0, n_img, chunk):
        images = x[start : start + chunk]
        if tiles:
            patches = images[:, :, : out_h * kh, : out_w * kw].reshape(-1, channels, out_h, kh, out_w, kw)
            patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, k)  # (image, row, col) x (c, i, j)
        else:
            cols = F.unfold(images.float(), (kh, kw), dilation=dilation, padding=padding, stride=stride)
            patches = cols.transpose(1, 2).reshape(-1, k)  # [b, K, L] -> [b * L, K]
        covariance_update_reference(acc, patches, upper=upper)


# ---------------------------------------------------------------------------------------------
# custom ops and dispatch
# ---------------------------------------------------------------------------------------------
# Eager calls run the chosen implementation directly: the custom op's Python dispatch costs tens of
# microseconds a call, which the small layers of a statistics pass feel. Under torch.compile they go through
# the custom ops below (``impl``: "triton" or "torch", chosen by ops/_dispatch.py).
def _covariance_update_impl(acc, x, mask, impl: str, allow_tf32: bool, upper: bool) -> None:
    if impl == "triton":
        from ..triton.covariance import covariance_update_triton  # optional: triton, imported where it runs

        covariance_update_triton(acc, x, mask, allow_tf32=allow_tf32, upper=upper)
    else:
        covariance_update_reference(acc, x, mask, upper=upper)


def _conv_covariance_update_impl(acc, x, kernel_size, stride, padding, dilation, impl: str, upper: bool) -> None:
    if impl == "triton":
        from ..triton.covariance import conv_covariance_update_triton  # optional: triton

        conv_covariance_update_triton(acc, x, kernel_size, stride, padding, dilation, upper=upper)
    else:
        conv_covariance_update_reference(acc, x, kernel_size, stride, padding, dilation, upper=upper)


@torch.library.custom_op("utilrank::covariance_update", mutates_args={"acc"})
def _covariance_update_op(
    acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, impl: str, allow_tf32: bool, upper: bool = False
) -> None:
    _covariance_update_impl(acc, x, mask, impl, allow_tf32, upper)


@_covariance_update_op.register_fake
def _(acc, x, mask, impl, allow_tf32, upper=False) -> None:
    return None


@torch.library.custom_op("utilrank::conv_covariance_update", mutates_args={"acc"})
def _conv_covariance_update_op(
    acc: torch.Tensor,
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    impl: str,
    upper: bool = False,
) -> None:
    _conv_covariance_update_impl(acc, x, kernel_size, stride, padding, dilation, impl, upper)


@_conv_covariance_update_op.register_fake
def _(acc, x, kernel_size, stride, padding, dilation, impl, upper=False) -> None:
    return None


def covariance_update(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    allow_tf32: bool = False,
    upper: bool = False,
) -> None:
    """``acc += x^T x`` in place, summed over all leading dims of ``x`` (shape ``(..., d)``).

    ``mask`` (bool, shape ``x.shape[:-1]``) excludes tokens where it is False (padding). The
    per-batch product is accumulated in fp32 and added into ``acc`` (fp64 recommended).
    ``allow_tf32`` lets the Triton path use TF32 for fp32 inputs (faster, less exact; the default
    there is tf32x3, see ``utilrank_kernels/triton/covariance.py``). ``upper`` updates the upper
    triangle (``i <= j``) only, each off-diagonal entry written once instead of twice: for a pass
    of many updates, followed by one :func:`mirror_upper_` after the last.
    """
    check_backend("covariance_update", backend)
    if x.dim() < 1:
        raise ValueError("covariance_update: x must have at least one dimension (..., d)")
    _check_acc("covariance_update", acc, x.shape[-1])
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:-1])):
        raise ValueError(
            f"covariance_update: mask must be bool of shape {tuple(x.shape[:-1])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if acc.device != x.device:
        raise ValueError(f"covariance_update: acc is on {acc.device} but x is on {x.device}")
    if mask is not None and mask.device != x.device:
        # the Triton kernel reads the mask through a raw pointer: a host mask would fault on the GPU
        raise ValueError(f"covariance_update: mask is on {mask.device} but x is on {x.device}")
    impl = choose("covariance_update", backend, x).impl
    if through_op():
        _covariance_update_op(acc, x, mask, impl, allow_tf32, upper)
    else:
        _covariance_update_impl(acc, x, mask, impl, allow_tf32, upper)


def conv_covariance_update(
    acc: torch.Tensor,
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    backend: str = "auto",
    upper: bool = False,
) -> None:
    """``acc += P^T P`` for the im2col patches ``P`` (one row per output pixel) of a 2-D conv input.

    ``x`` is ``(N, C, H, W)`` in NCHW or channels_last memory; ``acc`` is ``(C*kh*kw)^2`` with the
    patch laid out as ``F.unfold`` does (channel-major, then kernel row, then kernel column), which
    matches ``conv.weight.reshape(out, -1)``. Padding is zero padding. ``upper`` as in
    :func:`covariance_update`.
    """
    check_backend("conv_covariance_update", backend)
    if x.dim() != 4:
        raise ValueError(f"conv_covariance_update: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    kh, kw = pair(kernel_size)
    _check_acc("conv_covariance_update", acc, x.shape[1] * kh * kw)
    if acc.device != x.device:
        raise ValueError(f"conv_covariance_update: acc is on {acc.device} but x is on {x.device}")
    geometry = [kh, kw], list(pair(stride)), list(pair(padding)), list(pair(dilation))
    impl = choose("conv_covariance_update", backend, x).impl
    if through_op():
        _conv_covariance_update_op(acc, x, *geometry, impl, upper)
    else:
        _conv_covariance_update_impl(acc, x, *geometry, impl, upper)


__all__ = [
    "conv_covariance_update",
    "conv_covariance_update_reference",
    "covariance_update",
    "covariance_update_reference",
    "mirror_upper_",
]

