"""Triton kernels of the factored linear ``y = act(x a^T b^T + bias)``.

``a``: ``(r, in)``, ``b``: ``(out, r)``. Two paths; ``path="auto"`` picks by the grid (:func:`fused_fills`):

- **fused**: one launch. Each program owns ``BM`` rows (``BM >= 64``, so that sm_90 runs both GEMMs on
  wgmma), computes their ``t = x a^T`` and walks its output tiles with ``t b^T``, bias and activation in
  the epilogue. Where the rank fits the one-pass tables (16-bit: up to 256; fp32: up to 64), all rank
  columns of ``t`` come from one pass over ``x`` (the rank as one power-of-two block or two, r = 192 as
  128 + 64) and stay on chip for the second GEMM. Wider ranks take the chunked kernel: ``BR`` rank
  columns at a time (``x`` read once per chunk), ``t`` through a scratch buffer (``[n_split, M, r]``, L2).
  Compiled for ViT-B/16 fc1 / fc2 at batch 64 (r = 192, bf16, sm_90, Triton 3.8, first rows;
  ``benchmarks/run.py kernel-resources``), the main loops issued per warp 2,918 / 2,878 SASS instructions
  per 128 x 128 output tile in the chunked kernel (``x`` read 3 times; the erf GELU 2,050 of fc1's), and
  issue 1,482 / 1,536 per 128 x 128 outputs in the one-pass one. Where ``M / BM`` row blocks would leave
  SMs idle, a block's output tiles are split over ``n_split`` programs (:func:`fused_splits`), each
  computing its own ``t``.
- **split**: where the fused grid would not fill the SMs (M 197 at batch 1: 4 row blocks for 132 SMs),
  the first GEMM is a split-K "shrink" over ``(row blocks, rank tiles, K splits)`` programs that adds its
  partial products into a zeroed fp32 ``t`` (``[M, r]``, small: it stays in L2), and the second is a GEMM
  over ``(row blocks, output tiles)`` with bias and activation in the epilogue.

The grid rule and the autotune tables were set without a GPU to measure on: the measured backend choice
times both paths (``path=``), and ``benchmarks/kernels/lowrank.py`` measures them.

Rows are addressed through two strides (``x`` seen as ``[B, L, K]``), so a transposed, sliced or
permuted 2-D/3-D ``x`` is read in place; a higher-rank ``x`` is first reshaped to 3-D (a copy only
where its strides cannot be merged). The output is a fresh contiguous tensor of ``x``'s dtype.

Rounding follows the torch two-call path: ``t`` is accumulated in fp32 and rounded to the input dtype
before the second GEMM, whose fp32 result gets the bias and activation before the final rounding.
fp32 inputs use IEEE dots unless ``torch.set_float32_matmul_precision`` allows TF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._kernel_args import ACTIVATIONS, check_activation
from ._autotune import autotune, sm_count, smem_fits

SMALL_M = 64
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# shared device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gelu_erf(y, OUT16: tl.constexpr):
    """``y Phi(y)`` (GELU, erf form) in fp32 from one ``exp2`` and a polynomial: ``q = Phi(-|y|) = 2^P(s)``,
    ``s = min(|y| / L, 1)``, ``P`` a Chebyshev fit of ``log2 Phi(-L s)``; ``y Phi(y) = y q`` for ``y < 0``
    (relative accuracy kept in the negative tail), ``y (1 - q)`` otherwise (``GELU(inf) = inf``). For fp32
    outputs (``OUT16`` False) ``L = 8`` and degree 12: within 2^-16 of the result, relative, beyond |y| = 8
    ``|y| Phi(-8) = 6e-16 |y|`` absolute. For 16-bit outputs, which round to 2^-9 (bf16) or 2^-12 (fp16),
    ``L = 7`` and degree 8: within 1.6e-5 relative (1/60 of an fp16 ulp), beyond |y| = 7 ``1.3e-12 |y|``.

    Why: ``0.5 y (1 + erf(y / sqrt 2))`` with libdevice's ``erff``, which picks its polynomial's coefficients
    per element (predicated moves), compiles to 33 SASS instructions per element on sm_80 and sm_90; this to
    18 (degree 12) or 14 (degree 8) (Triton 3.8, 64 elements per thread). torch's own fp32 ``F.gelu`` is off
    by 1.2e-6 absolute against fp64, its ``1 + erf`` cancelling in the negative tail."""
    if OUT16:
        s = tl.minimum(tl.abs(y) * 0.14285714285714285, 1.0)
        p = 0.44991281628608704
        p = p * s - 3.146822929382324
        p = p * s + 9.675636291503906
        p = p * s - 17.532176971435547
        p = p * s + 21.25552749633789
        p = p * s - 18.709590911865234
        p = p * s - 22.43963050842285
        p = p * s - 8.060086250305176
        p = p * s - 0.9999774694442749
    else:
        s = tl.minimum(tl.abs(y) * 0.125, 1.0)
        p = -5.268813610076904
        p = p * s + 35.711639404296875
        p = p * s - 107.93296813964844
        p = p * s + 191.07928466796875
        p = p * s - 217.37899780273438
        p = p * s + 160.47801208496094
        p = p * s - 66.75115966796875
        p = p * s - 3.047898530960083
        p = p * s + 29.117603302001953
        p = p * s - 26.925647735595703
        p = p * s - 29.385833740234375
        p = p * s - 9.20893383026123
        p = p * s - 0.999999463558197
    q = tl.math.exp2(p)
    return y * tl.where(y < 0.0, q, 1.0 - q)


@triton.jit
def _activation(y, ACT: tl.constexpr, OUT16: tl.constexpr = False):
    """``y`` is fp32. ``ACT`` is the index in ``ACTIVATIONS``: 1: ReLU, 2: GELU (erf), 3: GELU (tanh); 0: identity.
    ``OUT16``: the result is rounded to a 16-bit type next, so the erf GELU may take its shorter polynomial."""
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = _gelu_erf(y, OUT16)
    elif ACT == 3:
        # 0.5 y (1 + tanh(u)) == y sigmoid(2u): no tanh needed, and exact in fp32 for large |u|
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * u)
    return y


@triton.jit
def _row_offsets(o_m, L, stride_0, stride_1):
    """Element offsets of rows ``o_m`` of an ``[B, L, K]`` view; int64 so that large inputs do not wrap."""
    return (o_m // L).to(tl.int64) * stride_0 + (o_m % L).to(tl.int64) * stride_1


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lowrank_linear_fused_kernel(
    x, a, b, bias, y,
    M, N, K, R, L,
    stride_x0, stride_x1, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    M_KEY,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One pass over ``x``: all ``R`` rank columns of ``t = x a^T`` at once, as a block of ``R1`` columns and
    (``R2 > 0``) one of ``R2`` (powers of two, :func:`rank_blocks`: r = 192 is 128 + 64, not 256), kept on
    chip for the second GEMM over this program's output tiles (every ``n_s``-th one from ``i_s``)."""
    i_m, i_s, n_s = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_xm = _row_offsets(o_m, L, stride_x0, stride_x1)
    o_r1 = tl.arange(0, R1)
    m_r1 = o_r1 < R

    # 1. t = x a^T: padded rank columns load zeros from a, so they are zero in t
    b_t1 = tl.zeros([BM, R1], dtype=tl.float32)  # [BM, R1]
    if R2 > 0:
        o_r2 = R1 + tl.arange(0, R2)
        m_r2 = o_r2 < R
        b_t2 = tl.zeros([BM, R2], dtype=tl.float32)  # [BM, R2]
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        p_x = x + o_xm[:, None] + o_k[None, :].to(tl.int64) * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        p_a1 = a + o_r1[None, :] * stride_ar + o_k[:, None] * stride_ak
        b_a1 = tl.load(p_a1, mask=m_r1[None, :] & m_k[:, None], other=0.0)  # [BK, R1]
        b_t1 = tl.dot(b_x, b_a1, b_t1, input_precision=PRECISION)
        if R2 > 0:
            p_a2 = a + o_r2[None, :] * stride_ar + o_k[:, None] * stride_ak
            b_a2 = tl.load(p_a2, mask=m_r2[None, :] & m_k[:, None], other=0.0)  # [BK, R2]
            b_t2 = tl.dot(b_x, b_a2, b_t2, input_precision=PRECISION)
    # rounded to the input dtype, as the two-call path rounds its intermediate
    b_t1c = b_t1.to(y.dtype.element_ty)
    if R2 > 0:
        b_t2c = b_t2.to(y.dtype.element_ty)

    # 2. y = act(t b^T + bias), this program's share of the output tiles
    o_ym = o_m.to(tl.int64) * N
    for n0 in range(i_s * BN, N, BN * n_s):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        p_b1 = b + o_n[None, :] * stride_bn + o_r1[:, None] * stride_br
        b_b1 = tl.load(p_b1, mask=m_r1[:, None] & m_n[None, :], other=0.0)  # [R1, BN]
        b_y = tl.dot(b_t1c, b_b1, input_precision=PRECISION)  # [BM, BN]
        if R2 > 0:
            p_b2 = b + o_n[None, :] * stride_bn + o_r2[:, None] * stride_br
            b_b2 = tl.load(p_b2, mask=m_r2[:, None] & m_n[None, :], other=0.0)  # [R2, BN]
            b_y = tl.dot(b_t2c, b_b2, b_y, input_precision=PRECISION)
        if HAS_BIAS:
            b_y += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        b_y = _activation(b_y, ACT, y.dtype.element_ty != tl.float32)
        p_y = y + o_ym[:, None] + o_n[None, :]
        tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _lowrank_linear_chunked_kernel(
    x, a, b, bias, t, y,
    M, N, K, R, L,
    stride_x0, stride_x1, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    M_KEY,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """Ranks too wide to hold whole: ``BR`` rank columns per step of both GEMMs (the rank padded to a
    multiple of ``BR``), each chunk of ``t`` rounded into this program's rows of the scratch ``t``
    (``[n_split, M, R]``, written and read back by the same program, so from L2)."""
    i_m, i_s, n_s = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_xm = _row_offsets(o_m, L, stride_x0, stride_x1)
    # this program's copy of its rows of t: [n_split, M, R], rounded to the input dtype
    p_tm = t + (i_s * M + o_m).to(tl.int64)[:, None] * R  # [BM, 1]

    # 1. t = x a^T, BR rank columns at a time; padded rank columns load zeros from a and are never stored
    for r0 in range(0, R, BR):
        o_r = r0 + tl.arange(0, BR)
        m_r = o_r < R
        b_t = tl.zeros([BM, BR], dtype=tl.float32)  # [BM, BR]
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            p_x = x + o_xm[:, None] + o_k[None, :].to(tl.int64) * stride_xk
            b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            p_a = a + o_r[None, :] * stride_ar + o_k[:, None] * stride_ak
            b_a = tl.load(p_a, mask=m_r[None, :] & m_k[:, None], other=0.0)  # [BK, BR]
            b_t = tl.dot(b_x, b_a, b_t, input_precision=PRECISION)
        # rounded to the input dtype, as the two-call path rounds its intermediate
        tl.store(p_tm + o_r[None, :], b_t.to(t.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])
    # every thread's chunks of t are visible to every other thread of the program
    tl.debug_barrier()

    # 2. y = act(t b^T + bias), this program's share of the output tiles
    o_ym = o_m.to(tl.int64) * N
    for n0 in range(i_s * BN, N, BN * n_s):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        b_y = tl.zeros([BM, BN], dtype=tl.float32)  # [BM, BN]
        for r0 in range(0, R, BR):
            o_r = r0 + tl.arange(0, BR)
            m_r = o_r < R
            b_tc = tl.load(p_tm + o_r[None, :], mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
            p_b = b + o_n[None, :] * stride_bn + o_r[:, None] * stride_br
            b_b = tl.load(p_b, mask=m_r[:, None] & m_n[None, :], other=0.0)  # [BR, BN]
            b_y = tl.dot(b_tc, b_b, b_y, input_precision=PRECISION)
        if HAS_BIAS:
            b_y += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        b_y = _activation(b_y, ACT, y.dtype.element_ty != tl.float32)
        p_y = y + o_ym[:, None] + o_n[None, :]
        tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _shrink_splitk_kernel(
    x, a, t,
    M, K, R, L,
    stride_x0, stride_x1, stride_xk, stride_ar, stride_ak,
    M_KEY,
    PRECISION: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """``t += x[:, ks] a[:, ks]^T`` for this program's K slice ``ks``; ``t``: fp32 ``[M, R]``, zeroed by the
    caller."""
    i_m, i_r, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_xm = _row_offsets(o_m, L, stride_x0, stride_x1)

    # K slices are whole BK blocks, so that no block straddles two programs
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_start = i_s * k_per
    k_end = tl.minimum(k_start + k_per, K)
    b_t = tl.zeros([BM, BR], dtype=tl.float32)  # [BM, BR]
    for k0 in range(k_start, k_end, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_end
        p_x = x + o_xm[:, None] + o_k[None, :].to(tl.int64) * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        p_a = a + o_r[None, :] * stride_ar + o_k[:, None] * stride_ak
        b_a = tl.load(p_a, mask=m_r[None, :] & m_k[:, None], other=0.0)  # [BK, BR]
        b_t = tl.dot(b_x, b_a, b_t, input_precision=PRECISION)
    p_t = t + o_m.to(tl.int64)[:, None] * R + o_r[None, :]
    tl.atomic_add(p_t, b_t, mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _linear_epilogue_kernel(
    t, w, bias, y,
    M, N, K, L,
    stride_t0, stride_t1, stride_tk, stride_wn, stride_wk,
    M_KEY,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``y = act(t w^T + bias)`` for ``t`` ``[M, K]`` (rows through two strides, any float dtype: rounded
    to ``w``'s dtype before the dot) and ``w`` ``[N, K]``; ``y`` contiguous ``[M, N]`` of ``w``'s dtype."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_tm = _row_offsets(o_m, L, stride_t0, stride_t1)

    b_y = tl.zeros([BM, BN], dtype=tl.float32)  # [BM, BN]
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        p_t = t + o_tm[:, None] + o_k[None, :].to(tl.int64) * stride_tk
        b_t = tl.load(p_t, mask=m_m[:, None] & m_k[None, :], other=0.0).to(w.dtype.element_ty)  # [BM, BK]
        p_w = w + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk
        b_w = tl.load(p_w, mask=m_n[None, :] & m_k[:, None], other=0.0)  # [BK, BN]
        b_y = tl.dot(b_t, b_w, b_y, input_precision=PRECISION)
    if HAS_BIAS:
        b_y += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_y = _activation(b_y, ACT, y.dtype.element_ty != tl.float32)
    p_y = y + o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# ---------------------------------------------------------------------------------------------
# autotune tables (data). The first row of each table is what UTILRANK_TRITON_CONFIG=first and the
# interpreter run; it must be valid for every shape the table serves. Untuned: set without a GPU.
# ---------------------------------------------------------------------------------------------
# fused (one pass): by dtype kind and rank width (the table of the narrowest width >= R1 + R2): t's fp32
# accumulator is BM x (R1 + R2), then rounded to the input dtype for the second GEMM. BM >= 64 (wgmma on
# sm_90). Shared memory of a row, W = R1 + R2, x element size: the K loop's stages x (BM BK + BK W), or the
# output loop's stages x W BN plus BM W (sm_90 stages t in shared memory for wgmma), whichever is more, plus
# 9 KiB: at or above what Triton 3.8 allocated for every row at r = 24, 48, 96 and 192 on sm_80 and sm_90
# (up to 9 KiB above the two loops' operands); rows over a device's limit are pruned at launch (on A100,
# the 128 x 128 x 32 and 64 x 128 x 32 rows of W = 256 at r = 192, which use 128 KiB there). Rows kept:
# no local memory in any loop on sm_80 or sm_90 at ViT-B/16 shapes, Triton 3.6 and 3.8 (W = 256: 64 x 64 x 64
# on 4 warps moved 24 B in its K loop on sm_80, 128 x 128 x 64 on 8 warps at 2 stages 16 B; benchmarks/run.py
# kernel-resources). W = 256 starts with 128 x 64 tiles: 152 / 178
# registers on sm_90 / sm_80 (128 x 128: 198 / 245); its 64 x 64 x 32 row fits twice per SM (81 KiB, 152
# registers on sm_90), 197 programs at M 12608 instead of 99.
_FUSED_KEYS = ("BM", "BN", "BK", "num_warps", "num_stages")
_FUSED_ROWS = {
    ("16-bit", 64): [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)],
    ("16-bit", 128): [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 64, 4, 3)],
    ("16-bit", 256): [(128, 64, 64, 8, 3), (128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 64, 32, 4, 3)],
    ("fp32", 32): [(64, 64, 32, 8, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 3)],
    ("fp32", 64): [(64, 64, 32, 8, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 3)],
}
# chunked: ranks wider than the fused tables take BR rank columns per step of both GEMMs, t through a
# scratch buffer (L2). BM >= 64 everywhere (wgmma on sm_90: 5-16 HGMMA per 16-bit compile). Shared memory
# of a row: stages x the larger loop's operand tiles, (BM BK + BK BR) or (BM BR + BR BN), x element size (the
# compiled kernels use at most that, plus 1 KiB on sm_90). Rows kept: no local memory in any loop on sm_80
# or sm_90 (BN = 256 spilled 160 B in the loop on sm_80; fp32 on 4 warps with BR = 32, 8 B),
# benchmarks/results/sm80-sm90_kernel-resources-*.md. fp32: 64 x 64 tiles; on sm_90 the 64 x 128 and 128 x 64
# ones moved 16-32 B in the loop (Triton 3.6 and 3.8) and 64 x 64 on 4 warps with BK = 32 8 B (3.6). Triton 3.6
# also moved local memory in the loop for 128 x 64 x 64 / BR 64 on 4 warps (16-bit, sm_80) and fp32 BR = 32 on
# 8 warps (sm_90): dropped.
_CHUNKED_KEYS = ("BM", "BN", "BK", "BR", "num_warps", "num_stages")
_CHUNKED_ROWS = {
    "16-bit": [(128, 128, 64, 64, 8, 3), (64, 128, 64, 64, 4, 3), (128, 128, 64, 32, 8, 4), (64, 64, 64, 32, 4, 3),
               (64, 128, 64, 16, 4, 4)],
    "fp32": [(64, 64, 32, 16, 8, 3), (64, 64, 16, 16, 4, 3)],
}
_SHRINK_KEYS = ("BM", "BR", "BK", "SPLIT_K", "num_warps", "num_stages")
# split-K is the point: with M <= 64 rows the parallelism has to come from K and r. fp32 keeps the rows
# that did not spill in the loop on sm_80 (64 x 64 and 16 x 128 tiles on 4 warps spilled 40-536 B).
_SHRINK_ROWS = {
    "16-bit": [(16, 64, 64, 4, 4, 3), (16, 64, 128, 8, 4, 3), (16, 128, 64, 8, 4, 3), (32, 64, 64, 4, 4, 3),
               (64, 64, 64, 2, 4, 3), (16, 32, 128, 16, 4, 3), (64, 128, 64, 1, 8, 3), (16, 64, 64, 1, 4, 3)],
    "fp32": [(16, 64, 64, 4, 4, 3), (16, 32, 128, 16, 4, 3), (16, 64, 64, 1, 4, 3)],
}
_EPILOGUE_KEYS = ("BM", "BN", "BK", "num_warps", "num_stages")
# by (M class, dtype kind); rows kept where no loop moves local memory on sm_80 or sm_90 (fp32 tiles of
# 64 x 64 on 4 warps spilled 0.5 KB per thread in the loop on sm_80; 128 x 256 16-bit tiles, 104 B; fp32
# 16 x 32 x 128 on 4 warps, 88 B with 22 LDL/STL in the loop on sm_80 under Triton 3.8)
_EPILOGUE_ROWS = {
    ("small", "16-bit"): [(16, 64, 64, 4, 3), (16, 128, 64, 4, 4), (16, 32, 128, 4, 3), (32, 64, 64, 4, 3),
                          (64, 64, 64, 4, 3), (16, 256, 64, 8, 3)],
    ("small", "fp32"): [(16, 64, 64, 4, 3), (16, 64, 32, 4, 3), (32, 64, 32, 8, 3)],
    ("large", "16-bit"): [(64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 64, 4, 3),
                          (64, 64, 64, 4, 4)],
    ("large", "fp32"): [(128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 3)],
}
_KEY = ["M_KEY", "N", "K", "R"]


def _fused_smem(config: triton.Config, width: int, element_size: int) -> int:
    bm, bn, bk, stages = config.kwargs["BM"], config.kwargs["BN"], config.kwargs["BK"], config.num_stages
    return max(stages * (bm * bk + bk * width), stages * width * bn + bm * width) * element_size + 9 * 1024


def _chunked_smem(config: triton.Config, element_size: int) -> int:
    bm, bn, bk, br = (config.kwargs[k] for k in ("BM", "BN", "BK", "BR"))
    return config.num_stages * max(bm * bk + bk * br, bm * br + br * bn) * element_size


def _fused_prune(configs, named_args, **kwargs):
    x = named_args["x"]
    width = kwargs["R1"] + kwargs["R2"]
    return smem_fits(configs, lambda c: _fused_smem(c, width, x.element_size()), x)


def _chunked_prune(configs, named_args, **kwargs):
    x = named_args["x"]
    return smem_fits(configs, lambda c: _chunked_smem(c, x.element_size()), x)


_FUSED = {(kind, width): autotune(f"lowrank_linear.fused[{kind},W={width}]", _lowrank_linear_fused_kernel,
                                  _FUSED_KEYS, rows, key=_KEY, prune_configs_by={"early_config_prune": _fused_prune})
          for (kind, width), rows in _FUSED_ROWS.items()}
_CHUNKED = {kind: autotune(f"lowrank_linear.chunked[{kind}]", _lowrank_linear_chunked_kernel, _CHUNKED_KEYS, rows,
                           key=_KEY, prune_configs_by={"early_config_prune": _chunked_prune})
            for kind, rows in _CHUNKED_ROWS.items()}
# the autotuner runs the kernel once per candidate: t has to be zeroed before each of those runs
_SHRINK = {kind: autotune(f"lowrank_linear.shrink[{kind}]", _shrink_splitk_kernel, _SHRINK_KEYS, rows,
                          key=["M_KEY", "K", "R"], reset_to_zero=["t"])
           for kind, rows in _SHRINK_ROWS.items()}
_EPILOGUE = {(size, kind): autotune(f"lowrank_linear.epilogue[{size},{kind}]", _linear_epilogue_kernel,
                                    _EPILOGUE_KEYS, rows, key=["M_KEY", "N", "K"])
             for (size, kind), rows in _EPILOGUE_ROWS.items()}


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def padded_rank(r: int) -> int:
    """The on-chip width of a rank held whole in registers (the fused MLP's ``t1``, ``t2``): ``tl.arange``
    needs a power of two, ``tl.dot`` at least 16."""
    return max(16, triton.next_power_of_2(r))


def dtype_kind(dtype: torch.dtype) -> str:
    """Which table a kernel's rows come from: 16-bit inputs run on tensor cores, fp32 ones (IEEE by
    default) on the FMA units, which want smaller tiles."""
    return "fp32" if dtype == torch.float32 else "16-bit"


def rank_blocks(r: int) -> tuple[int, int]:
    """``(R1, R2)``: the fused kernel's rank blocks, powers of two of at least 16 with ``R1 + R2 >= r``, one
    block (``R2 = 0``) where two would not be narrower: 192 -> (128, 64), 96 -> (64, 32), 200 -> (256, 0)."""
    rp = triton.cdiv(max(r, 1), 16) * 16
    r1 = triton.next_power_of_2(rp)
    if r1 == rp:
        return r1, 0
    r1 //= 2
    r2 = max(16, triton.next_power_of_2(rp - r1))
    return (r1, r2) if r2 < r1 else (2 * r1, 0)


def fused_width(r: int, dtype: torch.dtype) -> int | None:
    """The narrowest fused table (its rank width) that holds rank ``r`` whole, or None: the chunked kernel's."""
    r1, r2 = rank_blocks(r)
    kind = dtype_kind(dtype)
    return min((w for k, w in _FUSED if k == kind and w >= r1 + r2), default=None)


MAX_N_SPLIT = 8
SPLIT_WORK = 0.5  # the most extra work the output split may add: each split recomputes its block's t
_SPLIT_ROWS = 64  # rows per block in the grid rule (wgmma's smallest M) and the chunked kernel's scratch


def max_splits(k: int, n: int) -> int:
    """Programs per row block the fused path may use: each extra one recomputes the block's ``t``, ``K / (K + N)``
    of the block's FLOPs, so fc1-like shapes (N = 4K) may split in 3, fc2-like ones (K = 4N) not at all."""
    return max(1, min(MAX_N_SPLIT, int(1 + SPLIT_WORK * (k + n) / max(k, 1))))


def fused_splits(m: int, k: int, n: int, bm: int, device: torch.device) -> int:
    """Programs per row block of ``bm`` rows: as many as fill the SMs once (``blocks x splits <= SMs``: a
    second partial wave would cost a whole program's time) within :func:`max_splits`; at least 1."""
    return max(1, min(max_splits(k, n), sm_count(device) // triton.cdiv(m, bm)))


def fused_fills(m: int, k: int, n: int, device: torch.device) -> bool:
    """The grid rule of ``path="auto"``: the fused path only where its grid, 64-row blocks times the most
    splits allowed, has a program for every SM. Elsewhere (M 197 at batch 1 on a 132-SM H100: 4 blocks x
    3 splits = 12 programs) the split path spreads the work over K slices, rank tiles and output tiles."""
    return triton.cdiv(m, _SPLIT_ROWS) * max_splits(k, n) >= sm_count(device)


def m_key(m: int) -> int:
    """Autotune bucket of the row count: one tuning per power of two, not per batch size."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def dot_precision(dtype: torch.dtype) -> str | None:
    """IEEE fp32 dots unless torch allows TF32 for fp32 matmuls; None (Triton's default) otherwise."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return None


def activation_code(activation: str | None) -> int:
    check_activation(activation)
    return ACTIVATIONS.index(activation)


def rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, tuple[int, int, int]]:
    """``x`` (``(..., K)``) as ``[B, L, K]`` rows: ``(tensor, M, L, (stride_0, stride_1, stride_k))``.

    2-D and 3-D inputs are read in place whatever their strides; higher ranks are reshaped to 3-D,
    which copies only where the leading strides cannot be merged."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        m = x.shape[0]
        return x, m, max(m, 1), (0, x.stride(0), x.stride(1))
    x3 = x if x.dim() == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3, x3.shape[0] * x3.shape[1], max(x3.shape[1], 1), tuple(x3.stride())


def check_operands(op: str, x: torch.Tensor, *weights: torch.Tensor | None) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: triton path supports {SUPPORTED_DTYPES}, got {x.dtype}")
    for w in weights:
        if w is None:
            continue
        if w.dtype != x.dtype:
            raise ValueError(f"{op}: all operands must share x's dtype {x.dtype}; got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{op}: all operands must be on {x.device}; got {w.device}")


def _bias_arg(bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return y if bias is None else bias.contiguous()  # y stands in for an absent bias: never read


def shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x a^T`` in fp32 as ``[M, r]`` by the split-K kernel (``x`` of shape ``(..., K)``)."""
    x3, m, seq, (s0, s1, sk) = rows_view(x)
    r, k = a.shape
    t = torch.zeros(m, r, device=x.device, dtype=torch.float32)
    if m == 0 or r == 0:
        return t

    def grid(meta):
        return triton.cdiv(m, meta["BM"]), triton.cdiv(r, meta["BR"]), meta["SPLIT_K"]

    _SHRINK[dtype_kind(x.dtype)][grid](x3, a, t, m, k, r, seq, s0, s1, sk, a.stride(0), a.stride(1), m_key(m),
                  PRECISION=dot_precision(x.dtype))
    return t


def linear_epilogue(t: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                    activation: str | None = None) -> torch.Tensor:
    """``act(t w^T + bias)`` (``t``: ``(..., K)``, any float dtype; ``w``: ``(N, K)``), contiguous,
    of ``w``'s dtype, shaped ``t.shape[:-1] + (N,)``."""
    t3, m, seq, (s0, s1, sk) = rows_view(t)
    n, k = w.shape
    y = torch.empty(m, n, device=w.device, dtype=w.dtype)
    if m and n:
        def grid(meta):
            return triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"])

        kernel = _EPILOGUE["small" if m <= SMALL_M else "large", dtype_kind(w.dtype)]
        kernel[grid](t3, w, _bias_arg(bias, y), y, m, n, k, seq, s0, s1, sk, w.stride(0), w.stride(1),
                     m_key(m), HAS_BIAS=bias is not None, ACT=activation_code(activation),
                     PRECISION=dot_precision(w.dtype))
    return y.view(*t.shape[:-1], n)


def lowrank_linear_triton(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                          activation: str | None = None, *, path: str = "auto",
                          n_split: int | None = None) -> torch.Tensor:
    """``act(x a^T b^T + bias)`` as a fresh contiguous tensor of shape ``x.shape[:-1] + (out,)``.

    ``path``: "fused" (one launch: the one-pass kernel where the rank fits its tables, else the chunked
    one), "split" (split-K shrink, then a GEMM with the epilogue) or "auto" (:func:`fused_fills`, the grid
    rule); the measured backend choice times "fused" against "split". ``n_split`` forces the fused path's
    programs per row block (tests); None: :func:`fused_splits`."""
    check_operands("lowrank_linear", x, a, b, bias)
    r, k = a.shape
    n = b.shape[0]
    code = activation_code(activation)
    x3, m, seq, (s0, s1, sk) = rows_view(x)
    if path == "auto":
        path = "fused" if m > SMALL_M and fused_fills(m, k, n, x.device) else "split"
    if path == "split":
        return linear_epilogue(shrink(x, a), b, bias, activation).view(*x.shape[:-1], n)
    if path != "fused":
        raise ValueError(f"lowrank_linear_triton: unknown path {path!r} (auto, fused or split)")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if not (m and n):
        return y.view(*x.shape[:-1], n)
    args = (m, n, k, r, seq, s0, s1, sk, a.stride(0), a.stride(1), b.stride(0), b.stride(1), m_key(m))
    meta = {"HAS_BIAS": bias is not None, "ACT": code, "PRECISION": dot_precision(x.dtype)}
    width = fused_width(r, x.dtype)
    if width is not None:  # t on chip: the grid can follow the row's BM
        def grid(config):
            bm = config["BM"]
            return triton.cdiv(m, bm), n_split or fused_splits(m, k, n, bm, x.device)

        r1, r2 = rank_blocks(r)
        _FUSED[dtype_kind(x.dtype), width][grid](x3, a, b, _bias_arg(bias, y), y, *args, **meta, R1=r1, R2=r2)
    else:  # t through a scratch buffer, one copy per program of a row block: its size fixes the split first
        splits = n_split or fused_splits(m, k, n, _SPLIT_ROWS, x.device)
        t = torch.empty(splits * m, r, device=x.device, dtype=x.dtype)

        def grid(config):
            return triton.cdiv(m, config["BM"]), splits

        _CHUNKED[dtype_kind(x.dtype)][grid](x3, a, b, _bias_arg(bias, y), t, y, *args, **meta)
    return y.view(*x.shape[:-1], n)
