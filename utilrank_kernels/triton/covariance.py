"""Triton kernels for the data pass: ``acc += X^T X`` as a symmetric rank-k update.

Two kernels share one scheme:

- ``_syrk_kernel``: ``X`` is the ``(N, d)`` token matrix, read through its strides (up to two
  leading dims, so a transposed or sliced ``(B, T, d)`` input needs no copy); a token mask is applied
  in the load (masked rows read as zero), so padding is never gathered away.
- ``_conv_syrk_kernel``: ``X`` is the im2col patch matrix of a conv input, formed on the fly from the
  NCHW or channels_last tensor (implicit im2col): no unfolded tensor ever exists.

The grid is ``(tile pairs i <= j, splits)``. Only the upper-triangle tile pairs of the ``d x d``
result are computed (half the work of a GEMM). With ``upper=True`` (the statistics pass) each tile is
added into ``acc`` once, above the diagonal, and the lower triangle is filled once after the last batch
(``ops.covariance.mirror_upper_``, called by ``analysis.collect``); otherwise each off-diagonal tile is
also added, transposed, below it (every off-diagonal entry written twice).

Splits along N (``_num_splits``): none where the tile pairs alone fill the SMs (``tiles >= SMs``; d 3072
in 128-wide tiles is 300 pairs): each program adds its tile with a plain read-modify-write, no atomics,
deterministic. Fewer pairs (d 768: 21) are split to fill the SMs: each split sums its chunk of rows in
fp32 and adds it into the fp64 ``acc`` with fp64 atomic adds, which then touch fewer than ``SMs`` tiles
(under 17 MB at 128-wide tiles on 132 SMs: inside L2). Rounding never accumulates across chunks or
batches (fp32 within a chunk, fp64 across); with splits, the order of the atomic adds varies from run to
run (differences at the 1e-16 level).

Products: 16-bit inputs on the tensor cores (exact products, fp32 sums). fp32 inputs (the default
statistics pass) run ``tl.dot(..., input_precision="tf32x3")`` instead of the FMA loop: three TF32
tensor-core products per step (``a = a_big + a_small``, ``a_big`` rounded to TF32, ``a_small * b_small``
dropped); TF32 tensor cores run 7x the FMA rate (H100: 495 against 67 TFLOP/s), so three products still
win. Its error against fp64, emulated bit by bit on the CPU (the interpreter does not round to TF32;
``python benchmarks/run.py covariance-tf32x3``), one chunk of 4096 ViT-like activations at d 768
(LayerNorm outputs with a few massive channels; GELU outputs): relative Frobenius error 1.5-2.0e-7, against
1.0-1.2e-6 for the fp32 FMA loop and 1.3-4.9e-5 for plain TF32 (``allow_tf32``), whether the tensor cores
round their fp32 sums to nearest or toward zero. Triton (since late 2024, triton-lang/triton#4934; the
TTGIR of 3.8 shows it) sums each step's three products from zero and adds them to the accumulator with one
fp32 add, so the long sum rounds as the FMA loop's does, over BLOCK_K (32) times fewer additions; chaining
the three products on the accumulator, as Triton did before, would have been 27x worse than the FMA loop
under truncating accumulation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._kernel_args import conv_output_size
from ._autotune import autotune, sm_count

# Rows of dot products that cost as much as one tile's fp64 epilogue, for the split count below one wave of
# tiles; both scale with BD^2, so the ratio holds for every tile size. Estimated from H100 per-SM rates, not
# yet measured: the epilogue sends 2 x BD^2 x 8 B to L2 at ~40 GB/s, a row costs 2 x BD^2 flops at ~7.5 bf16
# TFLOP/s (about 1500 rows; 1024 as Triton reaches ~2/3 of peak) or, for fp32, ~1.25 tf32x3 TFLOP/s (three
# TF32 products at 3.75; about 170 rows at 2/3 of it; the FMA loop it replaced, ~0.5 TFLOP/s: about 100).
# Retune them with benchmarks/kernels/covariance.py.
_EPILOGUE_ROWS_TENSOR_CORE = 1024
_EPILOGUE_ROWS_FP32 = 128
_MIN_ROWS_PER_SPLIT = 256
_MAX_SPLITS = 128
_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# BLOCK_D (square output tile), BLOCK_K (rows per step), num_warps, num_stages; one table for 16-bit inputs
# and one for fp32 (tf32x3: three TF32 products on the tensor cores, see the module docstring), both on the
# tensor cores (HMMA; wgmma on sm_90 from 64-wide tiles). The first row of each is what the interpreter and
# UTILRANK_TRITON_CONFIG=first run. Rows are kept only where the compiled kernel moves no local memory inside
# its loop and fits 163 KiB of shared memory on sm_80 and sm_90, in every dtype of its table
# (benchmarks/results/sm80-sm90_kernel-resources-triton*.md): 128-wide tiles on 4 warps spilled 0.5-1.8 KB per
# thread, in the loop on sm_80. Shared memory of a row: stages x 2 x BLOCK_K x BLOCK_D x element size (16-bit),
# plus the two TF32 halves of one operand step for tf32x3 (fp32 64/32/4 warps: 57 KiB on sm_90).
# tf32x3 needs more registers than the FMA loop it replaced (64/32/4 warps on sm_80: 246): fp32 64/64/4 warps
# and 32/128/4 warps (120 and 47 LDL/STL in the loop on sm_80) and 128/32/8 warps (75) spill; 128/16/8 warps
# (254 registers on sm_80, 186 on sm_90) and 64/32/8 warps do not.
_SYRK_ROWS = {
    "16-bit": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 128, 4, 3), (32, 64, 4, 3)],
    "fp32": [(64, 32, 4, 3), (128, 16, 8, 3), (64, 32, 8, 3), (32, 64, 4, 3)],
}
# the conv kernel also forms its patch addresses in the loop: 128-wide tiles spill there with BLOCK_K = 64,
# and so does 64 x 64 on 4 warps (26-111 LDL/STL in the loop on sm_80 and sm_90, Triton 3.6 and 3.8); under
# Triton 3.6 on sm_80, 64 x 32 on 4 warps (16-bit, 112 B of stack) and fp32 32 x 64 on 8 warps (16 B) did too
_CONV_ROWS = {
    "16-bit": [(128, 32, 8, 3), (32, 64, 4, 3)],
    # fp32 (tf32x3) on 8 warps: 120-255 registers; on 4 warps (FMA loop): 255 and 48-192 B of stack, in the
    # loop, on sm_80
    "fp32": [(64, 32, 8, 3), (32, 32, 4, 3)],
}
_KEYS = ("BLOCK_D", "BLOCK_K", "num_warps", "num_stages")


def _prune_tiles(configs, named_args, **kwargs):
    """Tiles wider than the (power-of-two rounded) dimension only add padding work."""
    d = named_args["d"]
    fits = [c for c in configs if c.kwargs["BLOCK_D"] <= max(32, triton.next_power_of_2(d))]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_D"])]


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile_pair(i_t):
    """Upper-triangle tile pair ``(i_m, i_n)``, ``i_m <= i_n``, of linear index
    ``i_t = i_n (i_n + 1) / 2 + i_m``: consecutive programs share the column block ``i_n``, so its
    rows of X are read from L2."""
    i_n = ((tl.sqrt(8.0 * i_t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    # the fp32 square root may land one off next to a perfect square
    i_n = tl.where(i_n * (i_n + 1) // 2 > i_t, i_n - 1, i_n)
    i_n = tl.where((i_n + 1) * (i_n + 2) // 2 <= i_t, i_n + 1, i_n)
    i_m = i_t - i_n * (i_n + 1) // 2
    return i_m, i_n


@triton.jit
def _split_rows(n_rows, BLOCK_K: tl.constexpr):
    """Row range ``[start, end)`` of this program's split, in whole BLOCK_K steps."""
    i_s, n_s = tl.program_id(1), tl.num_programs(1)
    rows = tl.cdiv(tl.cdiv(n_rows, BLOCK_K), n_s) * BLOCK_K
    start = i_s * rows
    end = tl.minimum(start + rows, n_rows)
    return start, end


@triton.jit
def _halves(v):
    """The two halves ``(v[:n/2], v[n/2:])`` of a 1-D block."""
    n: tl.constexpr = v.shape[0]
    return tl.split(tl.permute(tl.reshape(v, [2, n // 2]), [1, 0]))


@triton.jit
def _column_halves(b):
    """The two column halves ``(b[:, :n/2], b[:, n/2:])`` of a 2-D block."""
    m: tl.constexpr = b.shape[0]
    n: tl.constexpr = b.shape[1]
    return tl.split(tl.permute(tl.reshape(b, [m, 2, n // 2]), [0, 2, 1]))


@triton.jit
def _add_piece(acc_ptr, b_c, o_m, o_n, m_m, m_n, idx_m, idx_n, stride_a0, stride_a1,
               MIRROR: tl.constexpr, PERMUTED: tl.constexpr):
    """``acc[idx_m, idx_n] += b_c`` where ``o_m <= o_n``, and with MIRROR ``acc[idx_n, idx_m] += b_c``
    where ``o_m < o_n`` (``b_c``: ``[BD, W]`` fp32). Without MIRROR the entry goes above the diagonal
    of ``acc``: where the columns are PERMUTED (``idx`` not increasing with ``o``), at
    ``(min(idx_m, idx_n), max(idx_m, idx_n))``."""
    b_c = b_c.to(acc_ptr.dtype.element_ty)
    m_c = m_m[:, None] & m_n[None, :]
    m_up = m_c & (o_m[:, None] <= o_n[None, :])  # [BD, W]
    # 32-bit offsets (the launcher checks that acc has fewer than 2^31 elements): int64 address tiles
    # are what made this epilogue spill
    if PERMUTED and not MIRROR:
        row = tl.minimum(idx_m[:, None], idx_n[None, :])  # [BD, W]
        col = tl.maximum(idx_m[:, None], idx_n[None, :])  # [BD, W]
        p_c = acc_ptr + (row * stride_a0 + col * stride_a1)  # [BD, W]
    else:
        p_c = acc_ptr + (idx_m[:, None] * stride_a0 + idx_n[None, :] * stride_a1)  # [BD, W]
    if tl.num_programs(1) == 1:
        # this program is the only writer of its tile
        tl.store(p_c, tl.load(p_c, mask=m_up, other=0.0) + b_c, mask=m_up)
    else:
        tl.atomic_add(p_c, b_c, mask=m_up, sem="relaxed")
    if MIRROR:
        # the mirror stores the same registers through transposed addresses (no tl.trans of the tile)
        m_lo = m_c & (o_m[:, None] < o_n[None, :])  # [BD, W]
        p_ct = acc_ptr + (idx_n[None, :] * stride_a0 + idx_m[:, None] * stride_a1)  # [BD, W]
        if tl.num_programs(1) == 1:
            tl.store(p_ct, tl.load(p_ct, mask=m_lo, other=0.0) + b_c, mask=m_lo)
        else:
            tl.atomic_add(p_ct, b_c, mask=m_lo, sem="relaxed")


@triton.jit
def _add_tile(acc_ptr, b_c, o_m, o_n, m_m, m_n, idx_m, idx_n, stride_a0, stride_a1,
              MIRROR: tl.constexpr, PERMUTED: tl.constexpr = False):
    """``acc[idx_m, idx_n] += b_c`` on and above the diagonal; with MIRROR, the same values below it too.

    A diagonal tile's dot product is not bitwise symmetric (its two halves sum the same products in
    different orders), so only its upper half is used. Without MIRROR (the statistics pass) each
    off-diagonal tile is written once and the lower triangle is filled once, after the last batch
    (``ops.covariance.mirror_upper_``); with it, every off-diagonal tile is written twice. The fp64
    read-modify-write goes in column quarters: a whole 128 x 128 tile held its fp64 values, its
    fp32 sums and its addresses at once and spilled 1.3-2.1 KB per thread (benchmarks/tools/kernel_resources.py).
    """
    b_0, b_1 = _column_halves(b_c)  # [BD, BD / 2] each
    o_n0, o_n1 = _halves(o_n)
    m_n0, m_n1 = _halves(m_n)
    idx_n0, idx_n1 = _halves(idx_n)
    _add_half(acc_ptr, b_0, o_m, o_n0, m_m, m_n0, idx_m, idx_n0, stride_a0, stride_a1, MIRROR, PERMUTED)
    _add_half(acc_ptr, b_1, o_m, o_n1, m_m, m_n1, idx_m, idx_n1, stride_a0, stride_a1, MIRROR, PERMUTED)


@triton.jit
def _add_half(acc_ptr, b_c, o_m, o_n, m_m, m_n, idx_m, idx_n, stride_a0, stride_a1,
              MIRROR: tl.constexpr, PERMUTED: tl.constexpr):
    b_0, b_1 = _column_halves(b_c)  # [BD, BD / 4] each
    o_n0, o_n1 = _halves(o_n)
    m_n0, m_n1 = _halves(m_n)
    idx_n0, idx_n1 = _halves(idx_n)
    _add_piece(acc_ptr, b_0, o_m, o_n0, m_m, m_n0, idx_m, idx_n0, stride_a0, stride_a1, MIRROR, PERMUTED)
    _add_piece(acc_ptr, b_1, o_m, o_n1, m_m, m_n1, idx_m, idx_n1, stride_a0, stride_a1, MIRROR, PERMUTED)


@triton.jit
def _syrk_kernel(
    x_ptr, mask_ptr, acc_ptr,
    n_rows, d, R1,
    stride_x0, stride_x1, stride_xd, stride_a0, stride_a1,
    n_bucket,
    HAS_MASK: tl.constexpr, TWO_LEVEL: tl.constexpr, INPUT_PRECISION: tl.constexpr, MIRROR: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # token r sits at x_ptr + (r // R1) * stride_x0 + (r % R1) * stride_x1 (TWO_LEVEL) or
    # x_ptr + r * stride_x1: two leading dims of any strides are read in place
    i_m, i_n = _tile_pair(tl.program_id(0))
    start, end = _split_rows(n_rows, BLOCK_K)

    o_m = i_m * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = i_n * BLOCK_D + tl.arange(0, BLOCK_D)
    m_m = o_m < d
    m_n = o_n < d
    p_m = x_ptr + o_m[None, :].to(tl.int64) * stride_xd  # [1, BD]
    p_n = x_ptr + o_n[None, :].to(tl.int64) * stride_xd  # [1, BD]

    b_c = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < end
        if HAS_MASK:
            # masked tokens read as zero rows: nothing is gathered
            m_k = m_k & (tl.load(mask_ptr + o_k, mask=m_k, other=0) != 0)
        if TWO_LEVEL:
            o_row = (o_k // R1).to(tl.int64) * stride_x0 + (o_k % R1).to(tl.int64) * stride_x1
        else:
            o_row = o_k.to(tl.int64) * stride_x1
        b_a = tl.load(p_m + o_row[:, None], mask=m_k[:, None] & m_m[None, :], other=0.0)  # [BK, BD]
        b_b = tl.load(p_n + o_row[:, None], mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BD]
        b_c = tl.dot(tl.trans(b_a), b_b, b_c, input_precision=INPUT_PRECISION)  # [BD, BD]

    _add_tile(acc_ptr, b_c, o_m, o_n, m_m, m_n, o_m, o_n, stride_a0, stride_a1, MIRROR)


@triton.jit
def _patch_columns(o_k, C, stride_xc, stride_xh, stride_xw,
                   KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                   TAP_MAJOR: tl.constexpr):
    """For kernel column ``o_k``: its input offset, kernel-tap displacement ``(dh, dw)`` and its
    index in the F.unfold layout ``c * KH * KW + i * KW + j``.

    TAP_MAJOR orders the columns ``tap * C + c`` instead, so that consecutive columns are consecutive
    channels: contiguous in channels_last memory. The F.unfold index is where the tile is stored.
    """
    if TAP_MAJOR:
        tap = o_k // C
        c = o_k % C
        idx = c * (KH * KW) + tap
    else:
        c = o_k // (KH * KW)
        tap = o_k % (KH * KW)
        idx = o_k
    dh = (tap // KW) * DH
    dw = (tap % KW) * DW
    # within one image: 32-bit (the launcher checks that an image has fewer than 2^31 elements)
    off = c * stride_xc + dh * stride_xh + dw * stride_xw
    return off, dh, dw, idx


@triton.jit
def _inside(i, n):
    """``0 <= i < n`` in one unsigned compare."""
    return i.to(tl.uint32, bitcast=True) < n.to(tl.uint32)


@triton.jit
def _patch_tile(p_img, off_k, dh, dw, m_k, off_p, ih0, iw0, m_p, H, W, PIXEL_FAST: tl.constexpr):
    """One operand tile of the patch matrix, zero outside the image (zero padding): ``[BD, BK]``
    (pixels along the fast axis) if PIXEL_FAST, else ``[BK, BD]``. ``p_img``: each pixel's image
    (64-bit pointers, one per pixel); ``off_k``, ``off_p``: 32-bit offsets within an image. Two 64-bit
    address tiles (and six compares per element) spilled inside the loop (benchmarks/tools/kernel_resources.py)."""
    if PIXEL_FAST:
        m = m_k[:, None] & m_p[None, :]
        m = m & _inside(dh[:, None] + ih0[None, :], H) & _inside(dw[:, None] + iw0[None, :], W)
        return tl.load(p_img[None, :] + (off_k[:, None] + off_p[None, :]), mask=m, other=0.0)  # [BD, BK]
    else:
        m = m_p[:, None] & m_k[None, :]
        m = m & _inside(ih0[:, None] + dh[None, :], H) & _inside(iw0[:, None] + dw[None, :], W)
        return tl.load(p_img[:, None] + (off_p[:, None] + off_k[None, :]), mask=m, other=0.0)  # [BK, BD]


@triton.jit
def _conv_syrk_kernel(
    x_ptr, acc_ptr,
    n_rows, d, C, H, W, OH, OW,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_a0, stride_a1,
    n_bucket,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TAP_MAJOR: tl.constexpr, PIXEL_FAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, MIRROR: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # rows are output pixels r = (n * OH + oh) * OW + ow; columns are kernel taps (c, i, j); the
    # patch element is x[n, c, oh * SH - PH + i * DH, ow * SW - PW + j * DW], zero outside the image
    i_m, i_n = _tile_pair(tl.program_id(0))
    start, end = _split_rows(n_rows, BLOCK_K)

    o_m = i_m * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = i_n * BLOCK_D + tl.arange(0, BLOCK_D)
    m_m = o_m < d
    m_n = o_n < d
    # the column parts of the addresses are fixed for the whole loop
    off_m, dh_m, dw_m, idx_m = _patch_columns(o_m, C, stride_xc, stride_xh, stride_xw,
                                              KH, KW, DH, DW, TAP_MAJOR)
    off_n, dh_n, dw_n, idx_n = _patch_columns(o_n, C, stride_xc, stride_xh, stride_xw,
                                              KH, KW, DH, DW, TAP_MAJOR)

    b_c = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        o_p = k0 + tl.arange(0, BLOCK_K)
        m_p = o_p < end
        i_img = o_p // (OH * OW)
        o_hw = o_p % (OH * OW)
        ih0 = (o_hw // OW) * SH - PH
        iw0 = (o_hw % OW) * SW - PW
        p_img = x_ptr + i_img.to(tl.int64) * stride_xn  # [BK]
        off_p = ih0 * stride_xh + iw0 * stride_xw  # [BK]
        b_a = _patch_tile(p_img, off_m, dh_m, dw_m, m_m, off_p, ih0, iw0, m_p, H, W, PIXEL_FAST)
        b_b = _patch_tile(p_img, off_n, dh_n, dw_n, m_n, off_p, ih0, iw0, m_p, H, W, PIXEL_FAST)
        if PIXEL_FAST:
            b_c = tl.dot(b_a, tl.trans(b_b), b_c, input_precision=INPUT_PRECISION)  # [BD, BD]
        else:
            b_c = tl.dot(tl.trans(b_a), b_b, b_c, input_precision=INPUT_PRECISION)  # [BD, BD]

    # tap-major columns are stored at their F.unfold index: a permutation of the tile's order
    _add_tile(acc_ptr, b_c, o_m, o_n, m_m, m_n, idx_m, idx_n, stride_a0, stride_a1, MIRROR, TAP_MAJOR)


# tuning runs the kernel several times on the live accumulator: restore it in between
_SYRK = {kind: autotune(f"covariance.syrk[{kind}]", _syrk_kernel, _KEYS, rows,
                        key=["d", "n_bucket", "HAS_MASK", "TWO_LEVEL", "INPUT_PRECISION", "MIRROR"],
                        prune_configs_by={"early_config_prune": _prune_tiles}, restore_value=["acc_ptr"])
         for kind, rows in _SYRK_ROWS.items()}
_CONV_SYRK = {kind: autotune(f"covariance.conv_syrk[{kind}]", _conv_syrk_kernel, _KEYS, rows,
                             key=["d", "n_bucket", "C", "KH", "KW", "SH", "SW", "TAP_MAJOR", "PIXEL_FAST",
                                  "INPUT_PRECISION", "MIRROR"],
                             prune_configs_by={"early_config_prune": _prune_tiles}, restore_value=["acc_ptr"])
              for kind, rows in _CONV_ROWS.items()}


def _table(x: torch.Tensor) -> str:
    return "16-bit" if x.element_size() == 2 else "fp32"


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _num_splits(tiles: int, n_rows: int, epilogue_rows: int, device: torch.device) -> int:
    """Splits along N: none where the tile pairs alone fill the SMs; below that, enough to fill them.

    The rule: with ``tiles >= SMs`` every program owns its tile and adds it into the accumulator with a
    plain read-modify-write: no atomics, deterministic. Fewer tiles than SMs would leave SMs idle, so
    ``s`` splits are chosen by cost: ``ceil(tiles * s / SMs)`` waves, each of ``ceil(N / s)`` rows of
    dot products plus one epilogue, which costs about as much as ``epilogue_rows`` rows. The splits meet
    with fp64 atomic adds, which then touch fewer than ``SMs`` tiles: at most 132 x 128 x 128 x 8 B =
    17 MB on an H100, inside its L2 (50 MiB; A100: 40 MiB), so no atomic goes over an accumulator larger
    than L2. d = 384, N = 8192, 16-bit input on 132 SMs: 6 tiles of 128 take 22 splits (one wave);
    d = 3072 (300 tiles) takes none.
    """
    slots = sm_count(device)
    if tiles >= slots:
        return 1
    s_max = max(1, min(_MAX_SPLITS, n_rows // _MIN_ROWS_PER_SPLIT))

    def cost(s: int) -> int:
        return math.ceil(tiles * s / slots) * (math.ceil(n_rows / s) + epilogue_rows)

    return min(range(1, s_max + 1), key=lambda s: (cost(s), s))


def _grid(d: int, n_rows: int, epilogue_rows: int, device: torch.device, splits: int | None):
    def grid(meta):
        n_t = triton.cdiv(d, meta["BLOCK_D"])
        tiles = n_t * (n_t + 1) // 2
        return tiles, splits or _num_splits(tiles, n_rows, epilogue_rows, device)

    return grid


def _collapse(sizes: Sequence[int], strides: Sequence[int]) -> tuple[list[int], list[int]]:
    """The fewest dims addressing the same elements in the same row-major order (size-1 dims
    dropped, dims merged where ``stride[i] == size[i+1] * stride[i+1]``)."""
    out_sizes: list[int] = []
    out_strides: list[int] = []
    for size, stride in zip(sizes, strides, strict=True):
        if size == 1:
            continue
        if out_sizes and out_strides[-1] == size * stride:
            out_sizes[-1] *= size
            out_strides[-1] = stride
        else:
            out_sizes.append(size)
            out_strides.append(stride)
    return out_sizes, out_strides


def _check_acc_size(acc: torch.Tensor) -> None:
    if acc.numel() >= 2**31:  # the kernels address acc with 32-bit offsets
        raise ValueError(f"covariance (Triton): a {tuple(acc.shape)} accumulator has 2^31 elements or more; "
                         "use backend='torch'")


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(x: torch.Tensor, allow_tf32: bool = False) -> str:
    """fp32 inputs: tf32x3 on the tensor cores (TF32 with ``allow_tf32``); 16-bit inputs: their own products."""
    if x.dtype != torch.float32:
        return "ieee"
    return "tf32" if allow_tf32 else "tf32x3"


def _epilogue_rows(precision: str, x: torch.Tensor) -> int:
    return _EPILOGUE_ROWS_FP32 if x.dtype == torch.float32 and precision != "tf32" else _EPILOGUE_ROWS_TENSOR_CORE


def covariance_update_triton(
    acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, allow_tf32: bool = False, *,
    upper: bool = False, splits: int | None = None,
) -> None:
    """``acc += x^T x`` summed over the leading dims of ``x`` (``(..., d)``); rows where ``mask`` is
    False are skipped. ``acc`` is ``(d, d)`` fp64 (or fp32). ``upper``: only the upper triangle
    (``i <= j``) of ``acc`` is updated, the lower one is left as it is. fp32 inputs run as tf32x3 on
    the tensor cores, TF32 with ``allow_tf32``. ``splits`` forces the number of chunks along N
    (tests); None picks it (``_num_splits``).
    """
    d = x.shape[-1]
    n_rows = x.numel() // d if d else 0
    if n_rows == 0 or d == 0:
        return
    _check_acc_size(acc)
    if x.dtype not in _DOT_DTYPES:
        # e.g. fp64 input: the torch reference also forms the product in fp32
        x = x.to(torch.float32)
    sizes, strides = _collapse(x.shape[:-1], x.stride()[:-1])
    if len(sizes) > 2:
        # three or more leading dims that do not merge: one copy, as reshape would make
        x = x.reshape(n_rows, d)
        sizes, strides = [n_rows], [x.stride(0)]
    if len(sizes) == 2:
        two_level, r1, stride_x0, stride_x1 = True, sizes[1], strides[0], strides[1]
    else:
        two_level, r1, stride_x0, stride_x1 = False, n_rows, 0, strides[0] if strides else d
    # a copy only if the mask itself is strided (N bytes, never the tokens); x stands in for no mask, never read
    mask_arg = mask.reshape(-1).view(torch.uint8) if mask is not None else x
    precision = _precision(x, allow_tf32)
    with _device_guard(x):
        _SYRK[_table(x)][_grid(d, n_rows, _epilogue_rows(precision, x), x.device, splits)](
            x, mask_arg, acc,
            n_rows, d, r1,
            stride_x0, stride_x1, x.stride(-1), acc.stride(0), acc.stride(1),
            triton.next_power_of_2(n_rows),
            HAS_MASK=mask is not None, TWO_LEVEL=two_level, INPUT_PRECISION=precision, MIRROR=not upper,
        )


def _conv_layout(x: torch.Tensor, kw: int, stride_w: int, dilation_w: int, out_w: int) -> tuple[bool, bool]:
    """``(tap_major, pixel_fast)``: the column order and the tile orientation whose fast (lane) axis
    walks the longest contiguous run of ``x``. NCHW 3x3 stride 1: pixels (runs of OW). ViT's 16x16
    stride-16 patchify in NCHW: kernel columns (runs of 16). channels_last: channels (runs of C, or
    KW * C where the taps of a kernel row are adjacent)."""
    _, channels, _, _ = x.shape
    _, sc, _, sw = x.stride()
    run_pixels = out_w if sw == 1 and stride_w == 1 else 1
    run_channel_major = kw if sw == 1 and dilation_w == 1 else 1
    run_tap_major = channels * (kw if sw == channels and dilation_w == 1 else 1) if sc == 1 else 1
    tap_major = run_tap_major > run_channel_major
    pixel_fast = run_pixels > max(run_tap_major, run_channel_major)
    return tap_major, pixel_fast


def conv_covariance_update_triton(
    acc: torch.Tensor,
    x: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    *,
    upper: bool = False,
    splits: int | None = None,
    layout: tuple[bool, bool] | None = None,
) -> None:
    """``acc += P^T P`` for the im2col patches ``P`` of ``x`` (``(N, C, H, W)``, any strides), with
    the patch laid out as F.unfold does; ``upper`` as in :func:`covariance_update_triton`. ``splits``
    and ``layout`` (``(tap_major, pixel_fast)``) force the split count and the load orientation
    (tests); None picks them."""
    n_img, channels, h, w = x.shape
    kh, kw = (int(v) for v in kernel_size)
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    out_h, out_w = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    d = channels * kh * kw
    n_rows = n_img * max(out_h, 0) * max(out_w, 0)
    if n_rows == 0 or d == 0:
        return
    _check_acc_size(acc)
    if sum((size - 1) * abs(st) for size, st in zip(x.shape[1:], x.stride()[1:], strict=True)) >= 2**31:
        raise ValueError(f"conv_covariance_update (Triton): one image of {tuple(x.shape[1:])} spans 2^31 elements "
                         "or more; use backend='torch'")
    if x.dtype not in _DOT_DTYPES:
        x = x.to(torch.float32)
    tap_major, pixel_fast = layout if layout is not None else _conv_layout(x, kw, sw, dw, out_w)
    precision = _precision(x)
    with _device_guard(x):
        _CONV_SYRK[_table(x)][_grid(d, n_rows, _epilogue_rows(precision, x), x.device, splits)](
            x, acc,
            n_rows, d, channels, h, w, out_h, out_w,
            *x.stride(), acc.stride(0), acc.stride(1),
            triton.next_power_of_2(n_rows),
            KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
            TAP_MAJOR=tap_major, PIXEL_FAST=pixel_fast, INPUT_PRECISION=precision, MIRROR=not upper,
        )


__all__ = ["conv_covariance_update_triton", "covariance_update_triton"]
