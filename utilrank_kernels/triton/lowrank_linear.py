"""Triton kernels of the factored linear ``y = act(x a^T b^T + bias)``.

``a``: ``(r, in)``, ``b``: ``(out, r)``. Two paths, chosen by ``M`` (the number of rows once the leading
dims are flattened):

- **fused** (``M > SMALL_M``): one launch. Each program owns ``BM`` rows (``BM >= 64``, so that sm_90
  runs both GEMMs on wgmma). It computes ``t = x a^T`` ``BR`` rank columns at a time (``BR`` of 16 to 64:
  the rank is padded to a multiple of ``BR``, not to a power of two, which cost r = 96, 192, 384, 768 a
  third more FLOPs), rounds each chunk to the input dtype into its own rows of a scratch ``t`` (``[M, r]``,
  written and read back by the same program, so from L2), then walks its output tiles with ``t b^T``
  (again ``BR`` rank columns at a time), bias and activation in the epilogue: one launch, ``t`` computed
  once per row block, the activation fused. Holding ``t`` whole in registers (the previous layout) forced
  ``BM`` down to 16-32 for ranks above 256, which on sm_90 never reaches wgmma, and made the fp32 rows
  spill 12 KB per thread (``benchmarks/tools/kernel_resources.py``). Where ``M / 64`` row blocks would leave SMs
  idle, the launcher splits each block's output tiles over ``n_split`` programs, each with its own copy of
  ``t`` (scratch ``[n_split, M, r]``, bounded by ``n_split * M <= 64 * SMs`` rows).
- **split** (``M <= SMALL_M``): with a handful of rows the fused
  kernel would run on ``M / BM`` programs, each streaming all of ``a`` and ``b`` through one SM. Here
  the first GEMM is a split-K "shrink" over ``(row blocks, rank tiles, K splits)`` programs that adds
  its partial products into a zeroed fp32 ``t`` (``[M, r]``, at most 64 x r: it stays in L2), and the
  second is a GEMM over ``(row blocks, output tiles)`` with bias and activation in the epilogue.

``SMALL_M`` and the autotune tables were set without a GPU to measure on: they are to be tuned on one
(``benchmarks/kernels/lowrank.py`` measures both paths through ``path=``).

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
def _activation(y, ACT: tl.constexpr):
    """``y`` is fp32. ``ACT`` is the index in ``ACTIVATIONS``: 1: ReLU, 2: GELU (erf), 3: GELU (tanh); 0: identity."""
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
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
    x, a, b, bias, t, y,
    M, N, K, R, L,
    stride_x0, stride_x1, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
    M_KEY,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
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
        b_y = _activation(b_y, ACT)
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
    b_y = _activation(b_y, ACT)
    p_y = y + o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# ---------------------------------------------------------------------------------------------
# autotune tables (data). The first row of each table is what UTILRANK_TRITON_CONFIG=first and the
# interpreter run; it must be valid for every shape the table serves. Untuned: set without a GPU.
# ---------------------------------------------------------------------------------------------
_FUSED_KEYS = ("BM", "BN", "BK", "BR", "num_warps", "num_stages")
# BR: rank columns per step of both GEMMs. BM >= 64 everywhere (wgmma on sm_90: 5-16 HGMMA per 16-bit
# compile). Shared memory of a row: stages x the larger loop's operand tiles, (BM BK + BK BR) or (BM BR +
# BR BN), x element size (the compiled kernels use at most that, plus 1 KiB on sm_90); rows over a device's
# limit are pruned at launch. Rows kept: no local memory in any loop on sm_80 or sm_90 (BN = 256 spilled
# 160 B in the loop on sm_80; fp32 on 4 warps with BR = 32, 8 B), benchmarks/results/sm80-sm90_kernel-resources-*.md.
# fp32: 64 x 64 tiles; on sm_90 the 64 x 128 and 128 x 64 ones moved 16-32 B in the loop (Triton 3.6 and
# 3.8) and 64 x 64 on 4 warps with BK = 32 8 B (3.6).
_FUSED_ROWS = {
    "16-bit": [(128, 128, 64, 64, 8, 3), (128, 64, 64, 64, 4, 3), (64, 128, 64, 64, 4, 3), (128, 128, 64, 32, 8, 4),
               (64, 64, 64, 32, 4, 3), (64, 128, 64, 16, 4, 4)],
    "fp32": [(64, 64, 32, 16, 8, 3), (64, 64, 32, 32, 8, 3), (64, 64, 16, 16, 4, 3)],
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


def _fused_smem(config: triton.Config, element_size: int) -> int:
    bm, bn, bk, br = (config.kwargs[k] for k in ("BM", "BN", "BK", "BR"))
    return config.num_stages * max(bm * bk + bk * br, bm * br + br * bn) * element_size


def _fused_prune(configs, named_args, **kwargs):
    x = named_args["x"]
    return smem_fits(configs, lambda c: _fused_smem(c, x.element_size()), x)


_FUSED = {kind: autotune(f"lowrank_linear.fused[{kind}]", _lowrank_linear_fused_kernel, _FUSED_KEYS, rows,
                         key=_KEY, prune_configs_by={"early_config_prune": _fused_prune})
          for kind, rows in _FUSED_ROWS.items()}
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


MAX_N_SPLIT = 8
_SPLIT_ROWS = 64  # the smallest BM of the fused tables


def fused_splits(m: int, device: torch.device) -> int:
    """Programs per row block of the fused path: enough that ``M / 64`` row blocks fill the SMs (at most
    ``MAX_N_SPLIT``; each recomputes its block's ``t``, a fraction ``r / N`` of the block's work)."""
    return max(1, min(MAX_N_SPLIT, sm_count(device) // triton.cdiv(m, _SPLIT_ROWS)))


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

    ``path``: "auto" (by ``M``, see the module docstring), "fused" or "split" (tests, benchmarks);
    ``n_split`` forces the fused path's output split (tests); None picks it."""
    check_operands("lowrank_linear", x, a, b, bias)
    r, k = a.shape
    n = b.shape[0]
    code = activation_code(activation)
    x3, m, seq, (s0, s1, sk) = rows_view(x)
    if path == "auto":
        path = "split" if m <= SMALL_M else "fused"
    if path == "split":
        return linear_epilogue(shrink(x, a), b, bias, activation).view(*x.shape[:-1], n)
    if path != "fused":
        raise ValueError(f"lowrank_linear_triton: unknown path {path!r}")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m and n:
        splits = n_split or fused_splits(m, x.device)
        t = torch.empty(splits * m, r, device=x.device, dtype=x.dtype)  # scratch: each program's rows of t

        def grid(meta):
            return triton.cdiv(m, meta["BM"]), splits

        _FUSED[dtype_kind(x.dtype)][grid](
            x3, a, b, _bias_arg(bias, y), t, y, m, n, k, r, seq, s0, s1, sk,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), m_key(m),
            HAS_BIAS=bias is not None, ACT=code, PRECISION=dot_precision(x.dtype),
        )
    return y.view(*x.shape[:-1], n)
