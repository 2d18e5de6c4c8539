"""Triton kernel of the factored MLP ``y = act(x a1^T b1^T + bias1) a2^T b2^T + bias2`` (timm's ``Mlp``
with both layers factored), in one launch in which the hidden activations never leave the chip.

Each program owns ``BM`` rows:

1. ``t1 = x a1^T`` over the K loop (``[BM, BR1]``, fp32 accumulate, rounded to the input dtype);
2. for each hidden tile: ``h = act(t1 b1^T + bias1)`` (``[BM, BH]``, rounded to the input dtype as the
   torch path rounds fc1's output), accumulated straight into ``t2 += h a2^T`` (``[BM, BR2]``, fp32):
   the ``hidden``-wide activations (4x the model width in a ViT) exist one ``BH`` tile at a time;
3. ``y = t2 b2^T + bias2`` over the output tiles.

With few rows (``M <= SMALL_M``) the MLP runs as two split-path low-rank linears (``lowrank_linear``'s
small-M path): there the hidden activations are ``M x hidden``, a few hundred KB at most, and the weights,
read once, dominate. Ranks too wide to hold ``t1`` and ``t2`` in registers (above 512), and fp32 inputs (see
the tables), run as two fused low-rank linears, the hidden activations through memory. The threshold and
the autotune tables are untuned (set without a GPU): tune them on one with ``benchmarks/kernels/lowrank.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from .lowrank_linear import (
    SMALL_M,
    _activation,
    _row_offsets,
    activation_code,
    check_operands,
    dot_precision,
    lowrank_linear_triton,
    m_key,
    padded_rank,
    rows_view,
)


@triton.jit
def _lowrank_mlp_fused_kernel(
    x, a1, b1, bias1, a2, b2, bias2, y,
    M, K, H, N, R1, R2, L,
    stride_x0, stride_x1, stride_xk,
    stride_a1r, stride_a1k, stride_b1h, stride_b1r, stride_a2r, stride_a2h, stride_b2n, stride_b2r,
    M_KEY,
    HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BR1: tl.constexpr, BR2: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
):
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_r1 = tl.arange(0, BR1)
    m_r1 = o_r1 < R1
    o_r2 = tl.arange(0, BR2)
    m_r2 = o_r2 < R2
    o_xm = _row_offsets(o_m, L, stride_x0, stride_x1)

    # 1. t1 = x a1^T
    b_t1 = tl.zeros([BM, BR1], dtype=tl.float32)  # [BM, BR1]
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        p_x = x + o_xm[:, None] + o_k[None, :].to(tl.int64) * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        p_a1 = a1 + o_r1[None, :] * stride_a1r + o_k[:, None] * stride_a1k
        b_a1 = tl.load(p_a1, mask=m_r1[None, :] & m_k[:, None], other=0.0)  # [BK, BR1]
        b_t1 = tl.dot(b_x, b_a1, b_t1, input_precision=PRECISION)
    b_t1c = b_t1.to(y.dtype.element_ty)  # [BM, BR1]

    # 2. hidden tiles: h = act(t1 b1^T + bias1); t2 += h a2^T. Padded hidden columns (o_h >= H) give
    # h = act(0) = 0 for every supported activation, and their a2 rows load as zeros anyway.
    b_t2 = tl.zeros([BM, BR2], dtype=tl.float32)  # [BM, BR2]
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)
        m_h = o_h < H
        p_b1 = b1 + o_h[None, :] * stride_b1h + o_r1[:, None] * stride_b1r
        b_b1 = tl.load(p_b1, mask=m_r1[:, None] & m_h[None, :], other=0.0)  # [BR1, BH]
        b_h = tl.dot(b_t1c, b_b1, input_precision=PRECISION)  # [BM, BH]
        if HAS_BIAS1:
            b_h += tl.load(bias1 + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
        b_h = _activation(b_h, ACT).to(y.dtype.element_ty)
        p_a2 = a2 + o_r2[None, :] * stride_a2r + o_h[:, None] * stride_a2h
        b_a2 = tl.load(p_a2, mask=m_r2[None, :] & m_h[:, None], other=0.0)  # [BH, BR2]
        b_t2 = tl.dot(b_h, b_a2, b_t2, input_precision=PRECISION)
    b_t2c = b_t2.to(y.dtype.element_ty)  # [BM, BR2]

    # 3. y = t2 b2^T + bias2
    o_ym = o_m.to(tl.int64) * N
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        p_b2 = b2 + o_n[None, :] * stride_b2n + o_r2[:, None] * stride_b2r
        b_b2 = tl.load(p_b2, mask=m_r2[:, None] & m_n[None, :], other=0.0)  # [BR2, BN]
        b_y = tl.dot(b_t2c, b_b2, input_precision=PRECISION)  # [BM, BN]
        if HAS_BIAS2:
            b_y += tl.load(bias2 + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        p_y = y + o_ym[:, None] + o_n[None, :]
        tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# Autotune tables (data), by max(BR1, BR2): t1 and t2 both live in registers (t2 accumulates over the hidden
# loop, so it is held whole, at a power-of-two width), so BM shrinks as the ranks grow. The first row of each
# is what the interpreter and UTILRANK_TRITON_CONFIG=first run. BM >= 64 (wgmma on sm_90) up to BR = 256; at
# 512 a 64-row t2 alone is 128 KB of registers per program, so BM is 32 (mma.sync on both targets). 16-bit
# only: with fp32 FMA dots every first row spilled 0.6-8 KB per thread inside its loops (sm_80 and sm_90,
# benchmarks/tools/kernel_resources.py), so fp32 MLPs run as two fused linears. 4-warp rows at BR = 128 spilled
# 24 B in the loop on sm_80.
_MLP_KEYS = ("BM", "BK", "BH", "BN", "num_warps", "num_stages")
_MLP_ROWS = {
    64: [(64, 64, 64, 64, 4, 3), (128, 64, 64, 64, 8, 3), (64, 64, 128, 128, 8, 3)],
    128: [(64, 32, 64, 64, 8, 2), (64, 32, 128, 64, 8, 3), (128, 32, 64, 64, 8, 2)],
    256: [(64, 32, 64, 64, 8, 2), (64, 32, 32, 64, 8, 2)],
    512: [(32, 32, 32, 64, 8, 2)],  # BH = 64: 168 KiB of shared memory, over A100's 163
}
_MLP = {br: autotune(f"lowrank_mlp.fused[BR={br}]", _lowrank_mlp_fused_kernel, _MLP_KEYS, rows,
                     key=["M_KEY", "K", "H", "N", "R1", "R2"])
        for br, rows in _MLP_ROWS.items()}


def lowrank_mlp_triton(
    x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
    a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, activation: str | None = "gelu",
    *, path: str = "auto",
) -> torch.Tensor:
    """``fc2(act(fc1(x)))`` with both layers factored, as a fresh contiguous tensor of shape
    ``x.shape[:-1] + (out,)``. ``path``: "auto", "fused" or "split" (two low-rank linears)."""
    check_operands("lowrank_mlp", x, a1, b1, bias1, a2, b2, bias2)
    r1, k = a1.shape
    hidden = b1.shape[0]
    r2 = a2.shape[0]
    n = b2.shape[0]
    code = activation_code(activation)
    x3, m, seq, (s0, s1, sk) = rows_view(x)
    br = max(64, padded_rank(r1), padded_rank(r2))
    fusable = br in _MLP and x.dtype != torch.float32
    if path == "auto":
        path = "fused" if m > SMALL_M and fusable else "split"
    if path == "split":  # two low-rank linears, each on its own path (by M): the hidden activations go to memory
        h = lowrank_linear_triton(x, a1, b1, bias1, activation)
        return lowrank_linear_triton(h, a2, b2, bias2, None)
    if path != "fused":
        raise ValueError(f"lowrank_mlp_triton: unknown path {path!r}")
    if not fusable:
        raise ValueError(f"lowrank_mlp_triton: the fused path takes 16-bit inputs and ranks up to {max(_MLP)}; "
                         f"got {x.dtype}, ranks {r1}, {r2}")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m and n:
        def grid(meta):
            return (triton.cdiv(m, meta["BM"]),)

        _MLP[br][grid](
            x3, a1, b1, y if bias1 is None else bias1.contiguous(), a2, b2,
            y if bias2 is None else bias2.contiguous(), y,
            m, k, hidden, n, r1, r2, seq, s0, s1, sk,
            a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
            a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1), m_key(m),
            HAS_BIAS1=bias1 is not None, HAS_BIAS2=bias2 is not None, ACT=code,
            PRECISION=dot_precision(x.dtype), BR1=padded_rank(r1), BR2=padded_rank(r2),
        )
    return y.view(*x.shape[:-1], n)
