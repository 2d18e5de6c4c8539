"""Triton kernel of the factored MLP ``y = act(x a1^T b1^T + bias1) a2^T b2^T + bias2`` (timm's ``Mlp``
with both layers factored), in one launch in which the hidden activations never leave the chip.

Each program owns ``BM`` rows and computes everything transposed (rank and hidden along the MMA's rows, its
``BM`` rows along the MMA's columns):

1. ``t1^T = a1 x^T`` over the K loop (``[BR1, BM]``, fp32 accumulate, rounded to the input dtype);
2. for each hidden tile: ``h^T = act(b1 t1^T + bias1)`` (``[BH, BM]``, rounded to the input dtype as the
   torch path rounds fc1's output), accumulated straight into ``t2^T += a2 h^T`` (``[BR2, BM]``, fp32):
   the ``hidden``-wide activations (4x the model width in a ViT) exist one ``BH`` tile at a time;
3. ``y^T = b2 t2^T + bias2`` over the output tiles.

Why transposed (from the TTGIR and SASS of Triton 3.8, ``benchmarks/tools/kernel_resources.py``): the weight
tiles are the A operands and the on-chip ``t1^T``, ``h^T``, ``t2^T`` the B operands, which wgmma reads from
shared memory. The previous orientation (``t1 b1^T``) kept ``t1`` as a register A operand beside the ``t2``
accumulator: at rank 256 that spilled (656 B, 164 LDL/STL per hidden tile on sm_90) unless the row block
shrank to 32 rows, which has no wgmma. And a dot that feeds another dot gets every warp along its rows
(sm_90: ``warpsPerCTA = [num_warps, 1]``, 16 rows a warp, 64 a warpgroup; sm_80: the layout of the ``t2``
dot), so 64-row tiles on 8 warps computed each hidden tile and its GELU twice. Here the chained dot's rows are
the hidden tile's: ``BH = 16 * num_warps`` (64 hidden rows a warpgroup) and no warp repeats another's work.

Offered (:func:`mlp_fused_refusal`: the ``auto`` path, and the measured choice's eligibility) for 16-bit
inputs (fp32 dots run on FMA and spilled), ranks up to 256 (wider ones spilled in every row tried), padding
that wastes at most a third of the tensor-core work, and at least one 64-row block per SM. Elsewhere the MLP
runs as two low-rank linears (``lowrank_linear``'s own paths: split-K at small M, output tiles spread over the
SMs), the hidden activations through memory. The tables are untuned (set without a GPU): tune them on one with
``benchmarks/kernels/lowrank.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import SMEM_OPTIN_BYTES, autotune, sm_count, smem_fits, smem_limit
from .lowrank_linear import (
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
    # Everything is computed transposed (rank and hidden along the MMA's M, the row block along its N), so
    # that the on-chip operands t1^T, h^T and t2^T are B operands, read from shared memory (see the module
    # docstring); the weights are the A operands, each tile read along its contiguous dimension.
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    o_r1 = tl.arange(0, BR1)
    m_r1 = o_r1 < R1
    o_r2 = tl.arange(0, BR2)
    m_r2 = o_r2 < R2
    o_xm = _row_offsets(o_m, L, stride_x0, stride_x1)

    # 1. t1^T = a1 x^T
    b_t1 = tl.zeros([BR1, BM], dtype=tl.float32)  # [BR1, BM]
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < K
        p_a1 = a1 + o_r1[:, None] * stride_a1r + o_k[None, :] * stride_a1k
        b_a1 = tl.load(p_a1, mask=m_r1[:, None] & m_k[None, :], other=0.0)  # [BR1, BK]
        p_x = x + o_xm[:, None] + o_k[None, :].to(tl.int64) * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_t1 = tl.dot(b_a1, tl.trans(b_x), b_t1, input_precision=PRECISION)
    b_t1c = b_t1.to(y.dtype.element_ty)  # [BR1, BM]

    # 2. hidden tiles: h^T = act(b1 t1^T + bias1); t2^T += a2 h^T. Padded hidden rows (o_h >= H) give
    # h = act(0) = 0 for every supported activation, and their a2 columns load as zeros anyway.
    b_t2 = tl.zeros([BR2, BM], dtype=tl.float32)  # [BR2, BM]
    for h0 in range(0, H, BH):
        o_h = h0 + tl.arange(0, BH)
        m_h = o_h < H
        p_b1 = b1 + o_h[:, None] * stride_b1h + o_r1[None, :] * stride_b1r
        b_b1 = tl.load(p_b1, mask=m_h[:, None] & m_r1[None, :], other=0.0)  # [BH, BR1]
        b_h = tl.dot(b_b1, b_t1c, input_precision=PRECISION)  # [BH, BM]
        if HAS_BIAS1:
            b_h += tl.load(bias1 + o_h, mask=m_h, other=0.0).to(tl.float32)[:, None]
        b_h = _activation(b_h, ACT).to(y.dtype.element_ty)
        p_a2 = a2 + o_r2[:, None] * stride_a2r + o_h[None, :] * stride_a2h
        b_a2 = tl.load(p_a2, mask=m_r2[:, None] & m_h[None, :], other=0.0)  # [BR2, BH]
        b_t2 = tl.dot(b_a2, b_h, b_t2, input_precision=PRECISION)
    b_t2c = b_t2.to(y.dtype.element_ty)  # [BR2, BM]

    # 3. y^T = b2 t2^T + bias2
    o_ym = o_m.to(tl.int64) * N
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < N
        p_b2 = b2 + o_n[:, None] * stride_b2n + o_r2[None, :] * stride_b2r
        b_b2 = tl.load(p_b2, mask=m_n[:, None] & m_r2[None, :], other=0.0)  # [BN, BR2]
        b_y = tl.dot(b_b2, b_t2c, input_precision=PRECISION)  # [BN, BM]
        if HAS_BIAS2:
            b_y += tl.load(bias2 + o_n, mask=m_n, other=0.0).to(tl.float32)[:, None]
        p_y = y + o_ym[None, :] + o_n[:, None]
        tl.store(p_y, b_y.to(y.dtype.element_ty), mask=m_n[:, None] & m_m[None, :])


# Autotune tables (data), by BR = max(BR1, BR2). The first row of each is what the interpreter and
# UTILRANK_TRITON_CONFIG=first run, on any target, so it obeys every rule below for every rank of its table; the
# launch prunes the other rows per target (_row_fits). Layout (module docstring): BH = 16 * num_warps, and where
# BR2 >= BM, BR2 >= 16 * num_warps. Registers: t2^T is BR2 * BM / (32 * num_warps) fp32 registers per thread;
# 128 compile without local memory on sm_90 (wgmma reads both operands from shared memory) but moved 2-42
# LDL/STL per hidden tile on sm_80 (mma.sync fragments take registers too), so rows above 64 are sm_90's.
# Shared memory is bound by the hidden loop's two weight tiles, BH * (BR1 + BR2) per stage. 16-bit only: with
# fp32 FMA dots every first row spilled 0.6-8 KB per thread inside its loops, so fp32 MLPs run as two fused
# linears. At BR = 256 one warpgroup per SM (4 warps, 149-169 KiB) leaves the tensor cores idle during the
# GELU; the 8-warp row overlaps two warpgroups, at one stage (two would be 256 KiB). Ranks above 256 have no
# table (mlp_fused_refusal).
_MLP_KEYS = ("BM", "BK", "BH", "BN", "num_warps", "num_stages")
_MLP_ROWS = {
    64: [(64, 64, 64, 64, 4, 3), (128, 64, 128, 64, 8, 3), (128, 64, 64, 64, 4, 3)],
    128: [(64, 64, 64, 64, 4, 2), (64, 32, 128, 64, 8, 2), (128, 32, 64, 64, 4, 2)],
    256: [(32, 32, 64, 64, 4, 2), (64, 64, 64, 64, 4, 2), (64, 32, 128, 64, 8, 1)],
}
MIN_BR = 64  # ranks pad to at least one warpgroup's 64 rows of wgmma
_T2_REGS_SM80 = 64  # t2^T registers per thread that compiled without local memory on sm_80
_MLP_KEY = ["M_KEY", "K", "H", "N", "R1", "R2"]


def mlp_rank(r: int) -> int:
    """The on-chip width of a rank in the fused MLP: a power of two (``tl.arange``), at least ``MIN_BR``."""
    return max(MIN_BR, padded_rank(r))


def _mlp_smem(config: triton.Config, br1: int, br2: int, element_size: int, hopper: bool) -> int:
    """Shared memory of one row: the largest of the three loops' staged operands (sm_80's pipeliner keeps
    ``num_stages - 1`` buffers, sm_90's ``num_stages``; one stage holds one weight tile at a time), plus what
    stays allocated through a loop (t1^T through the hidden loop, t2^T through the output loop, h^T in the
    hidden loop). Within 1 KiB of the compiled kernels' (kernel_resources.py)."""
    bm, bk, bh, bn = (config.kwargs[k] for k in ("BM", "BK", "BH", "BN"))
    stages = config.num_stages if hopper else max(1, config.num_stages - 1)
    weights = stages * bh * (br1 + br2) if config.num_stages > 1 else bh * max(br1, br2)
    return element_size * max(stages * (br1 + bm) * bk, br1 * bm + weights + bh * bm, br2 * bm + stages * br2 * bn)


def _row_fits(config: triton.Config, br2: int, hopper: bool) -> bool:
    """The layout and register rules of the tables (above) for a launch with this ``BR2``."""
    bm, warps = config.kwargs["BM"], config.num_warps
    layout = br2 < bm or br2 >= 16 * warps  # sm_80 puts the chained dots' warps along BR2 where BR2 >= BM
    return layout and (hopper or br2 * bm <= _T2_REGS_SM80 * 32 * warps)


def _mlp_prune(configs, named_args, **kwargs):
    x = named_args["x"]
    br1, br2 = kwargs["BR1"], kwargs["BR2"]
    hopper = (smem_limit(x) or 0) > SMEM_OPTIN_BYTES[80]
    configs = [c for c in configs if _row_fits(c, br2, hopper)] or configs[:1]
    return smem_fits(configs, lambda c: _mlp_smem(c, br1, br2, x.element_size(), hopper), x)


_MLP = {br: autotune(f"lowrank_mlp.fused[BR={br}]", _lowrank_mlp_fused_kernel, _MLP_KEYS, rows, key=_MLP_KEY,
                     prune_configs_by={"early_config_prune": _mlp_prune})
        for br, rows in _MLP_ROWS.items()}


# ---------------------------------------------------------------------------------------------
# where the fused MLP is offered
# ---------------------------------------------------------------------------------------------
FUSED_DTYPES = (torch.float16, torch.bfloat16)
FUSED_MIN_RANK_USE = 2 / 3  # useful / padded tensor-core work: r 192 -> 256 is 0.75, r 160 -> 256 is 0.63
_FUSED_MIN_BM = 64  # at least one 64-row block per SM (the rows of 32 are there for the smaller grids' sake)


def table_rank(r1: int, r2: int) -> int:
    """The table (``BR``) that ranks ``r1``, ``r2`` run from."""
    return max(mlp_rank(r1), mlp_rank(r2))


def rank_use(in_features: int, hidden: int, out_features: int, r1: int, r2: int) -> float:
    """The fraction of the fused kernel's tensor-core work that is not rank padding: the four GEMMs run at the
    padded ranks ``BR1 = mlp_rank(r1)`` (``x a1^T``, ``t1 b1^T``) and ``BR2`` (``h a2^T``, ``t2 b2^T``)."""
    br1, br2 = mlp_rank(r1), mlp_rank(r2)
    useful = r1 * (in_features + hidden) + r2 * (hidden + out_features)
    return useful / (br1 * (in_features + hidden) + br2 * (hidden + out_features))


def mlp_fused_refusal(rows: int, in_features: int, hidden: int, out_features: int, r1: int, r2: int,
                      dtype: torch.dtype, sms: int) -> str | None:
    """Why the fused MLP is no candidate for these shapes on a GPU with ``sms`` SMs (one line), or None where
    it is one. A pure function of the shapes, from the compiled code (``benchmarks/tools/kernel_resources.py``):
    tensor cores used, nothing spilled, the grid fills the SMs, the rank padding wastes little."""
    if dtype not in FUSED_DTYPES:
        return f"the fused MLP takes 16-bit inputs (fp32 dots run on FMA units and spilled); got {dtype}"
    br = table_rank(r1, r2)
    if br not in _MLP:
        return (f"ranks {r1}, {r2} pad to {br}: the hidden loop's weight tiles take {br // 4} KiB a stage; "
                f"the rows tried spilled inside it (t2^T: {br // 4} registers per thread at 32 rows)")
    use = rank_use(in_features, hidden, out_features, r1, r2)
    if use < FUSED_MIN_RANK_USE:
        return (f"ranks {r1}, {r2} padded to {mlp_rank(r1)}, {mlp_rank(r2)}: only {use:.0%} of the "
                f"tensor-core work is useful (at least {FUSED_MIN_RANK_USE:.0%})")
    programs = triton.cdiv(rows, _FUSED_MIN_BM)
    if programs < sms:
        return f"{rows} rows make at most {programs} programs of {_FUSED_MIN_BM} rows for {sms} SMs"
    return None


def mlp_fused_eligible(rows: int, in_features: int, hidden: int, out_features: int, r1: int, r2: int,
                       dtype: torch.dtype, sms: int) -> bool:
    """Whether the fused MLP is a candidate at all (:func:`mlp_fused_refusal` says why not)."""
    return mlp_fused_refusal(rows, in_features, hidden, out_features, r1, r2, dtype, sms) is None


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------
def lowrank_mlp_triton(
    x: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, bias1: torch.Tensor | None,
    a2: torch.Tensor, b2: torch.Tensor, bias2: torch.Tensor | None, activation: str | None = "gelu",
    *, path: str = "auto",
) -> torch.Tensor:
    """``fc2(act(fc1(x)))`` with both layers factored, as a fresh contiguous tensor of shape
    ``x.shape[:-1] + (out,)``. ``path``: "auto" (fused where :func:`mlp_fused_refusal` has no objection),
    "fused" (16-bit inputs, ranks up to 256) or "split" (two low-rank linears)."""
    check_operands("lowrank_mlp", x, a1, b1, bias1, a2, b2, bias2)
    r1, k = a1.shape
    hidden = b1.shape[0]
    r2 = a2.shape[0]
    n = b2.shape[0]
    code = activation_code(activation)
    x3, m, seq, (s0, s1, sk) = rows_view(x)
    br = table_rank(r1, r2)
    if path == "auto":
        eligible = mlp_fused_eligible(m, k, hidden, n, r1, r2, x.dtype, sm_count(x.device))
        path = "fused" if eligible else "split"
    if path == "split":  # two low-rank linears, each on its own path (by M): the hidden activations go to memory
        h = lowrank_linear_triton(x, a1, b1, bias1, activation)
        return lowrank_linear_triton(h, a2, b2, bias2, None)
    if path != "fused":
        raise ValueError(f"lowrank_mlp_triton: unknown path {path!r}")
    if br not in _MLP or x.dtype not in FUSED_DTYPES:  # the shape rules of mlp_fused_refusal that no row passes
        raise ValueError(f"lowrank_mlp_triton: no fused path: {mlp_fused_refusal(m, k, hidden, n, r1, r2, x.dtype, 0)}")
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
            PRECISION=dot_precision(x.dtype), BR1=mlp_rank(r1), BR2=mlp_rank(r2),
        )
    return y.view(*x.shape[:-1], n)
