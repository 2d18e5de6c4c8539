"""Factored conv ``conv1x1_b(conv_a(x)) + bias`` on channels_last: cuDNN for the ``r``-filter conv, then the
1x1 conv as one Triton GEMM with the bias in its epilogue.

On channels_last the ``r``-channel intermediate is an ``[N*H*W, r]`` row-major matrix, so the 1x1 conv
is ``t b^T + bias`` over the pixels, written straight into an NHWC output. The issue asks to pick, by
measurement, between this and an implicit-GEMM Triton kernel that would also fuse the first conv; no
GPU was available when this was written, so only this variant exists. The output is always returned in
channels_last memory format (an NCHW-shaped view of the NHWC result).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .lowrank_linear import check_operands, linear_epilogue


def lowrank_conv2d_triton(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
    stride: Sequence[int], padding: Sequence[int] | str, dilation: Sequence[int],
) -> torch.Tensor:
    check_operands("lowrank_conv2d", x, a, b, bias)
    t = F.conv2d(x.contiguous(memory_format=torch.channels_last), a, None, stride, padding, dilation)
    n, r, h, w = t.shape
    # [N, H*W, r] rows: a view for either memory format the conv may have returned
    rows = t.permute(0, 2, 3, 1).reshape(n, h * w, r)
    y = linear_epilogue(rows, b.reshape(b.shape[0], r), bias)  # [N, H*W, out]
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)
