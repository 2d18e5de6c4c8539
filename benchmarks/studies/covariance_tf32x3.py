"""The fp32 covariance kernels' error against fp64, per way of forming the products: IEEE fp32 on the FMA
units, TF32 and tf32x3 on the tensor cores (``tl.dot(..., input_precision=...)``), emulated bit by bit in
torch: the CPU interpreter does not round to TF32, so the kernels themselves cannot show it without a GPU.

    python benchmarks/run.py covariance-tf32x3                 # d 768, 4096 tokens, ViT-like inputs
    python benchmarks/run.py covariance-tf32x3 --tokens 1024   # shorter chunks (what a split sums)

One chunk of ``--tokens`` rows, summed in fp32 as one program of the kernel sums its rows (one split; the
fp64 accumulator adds chunks without further loss), against the fp64 product of the same fp32 values:

- ``fp32 FFMA``: Triton's FMA dot, ``c = fma(a_k, b_k, c)`` row after row (one rounding per row).
- ``tf32``: ``cvt.rna`` operands (11 significant bits, products exact), summed 8 rows per MMA step.
- ``tf32x3``: Triton's rewrite (``F32DotTC``): ``a = a_big + a_small`` with ``a_big = cvt.rna.tf32(a)``,
  the tensor core reading ``a_small`` as TF32 too (its low 13 bits dropped). Triton 3.8 (its TTGIR) sums
  each ``BLOCK_K`` rows from zero, ``p = dot(a_big, b_big, dot(a_big, b_small, dot(a_small, b_big, 0)))``,
  and adds ``p`` into ``c`` with one fp32 add (``per-block``); older Triton chained the three dots on ``c``
  itself (``chained``).

The tensor cores' accumulation is modelled two ways: each 8-row step's exact sum rounded to fp32 to nearest
(``rn``), or toward zero (``rz``: what Fasi et al., "Numerical behavior of NVIDIA tensor cores", PeerJ CS
2021, measured on V100/T4/A100; a pessimistic model of Hopper's). Inputs: LayerNorm-like activations
(``ln``, the fc1/qkv inputs of a ViT: per-token normalized, correlated channels, per-channel gain and bias,
a few channels 20x larger, as ViTs' "massive activations") and GELU outputs (``gelu``, the fc2 input).
Printed per input and method: the relative Frobenius error of ``C``, the largest error of an entry relative
to ``sqrt(C_ii C_jj)``, the largest relative error on the diagonal and of the eigenvalues (relative to the
largest), and the ratio of the Frobenius error to the FFMA path's.
"""

from __future__ import annotations

import argparse
import sys

import torch

MMA_K = 8  # rows per TF32 MMA step (mma.m16n8k8, wgmma k = 8)


def tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """``cvt.rna.tf32.f32``: round to 10 stored mantissa bits, ties away from zero (finite inputs)."""
    bits = x.view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF  # add half an ulp of the 13 dropped bits, then drop them
    return rounded.view(torch.float32)


def tf32_trunc(x: torch.Tensor) -> torch.Tensor:
    """What the tensor core reads from an fp32 register holding a TF32 operand: the low 13 bits ignored."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def round_fp32(x64: torch.Tensor, mode: str) -> torch.Tensor:
    """fp64 -> fp32 to nearest (``rn``) or toward zero (``rz``)."""
    r = x64.float()
    if mode == "rz":
        over = r.double().abs() > x64.abs()  # rounded away from zero: step one ulp back
        r = torch.where(over, torch.nextafter(r, torch.zeros_like(r)), r)
    return r


def gram_ffma(x: torch.Tensor) -> torch.Tensor:
    """fp32 FMA chain over the rows: each step's exact product plus ``c``, rounded once."""
    c = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)
    x64 = x.double()
    for k in range(x.shape[0]):
        c = (c.double() + torch.outer(x64[k], x64[k])).float()
    return c


def _mma_steps(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """``c += a^T b`` over the rows of ``a``, ``b`` (TF32 values: exact products) in MMA steps."""
    for k in range(0, a.shape[0], MMA_K):
        c = round_fp32(c.double() + a[k : k + MMA_K].double().T @ b[k : k + MMA_K].double(), mode)
    return c


def gram_tf32(x: torch.Tensor, mode: str) -> torch.Tensor:
    big = tf32_rna(x)
    return _mma_steps(torch.zeros(x.shape[1], x.shape[1]), big, big, mode)


def gram_tf32x3(x: torch.Tensor, mode: str, per_block: bool = True, block_k: int = 32) -> torch.Tensor:
    big = tf32_rna(x)
    small = tf32_trunc(x - big)  # x - big is exact in fp32
    c = torch.zeros(x.shape[1], x.shape[1])
    for k in range(0, x.shape[0], block_k):
        rows = slice(k, k + block_k)
        p = torch.zeros_like(c) if per_block else c
        p = _mma_steps(p, small[rows], big[rows], mode)
        p = _mma_steps(p, big[rows], small[rows], mode)
        p = _mma_steps(p, big[rows], big[rows], mode)
        c = c + p if per_block else p  # fp32 add, to nearest
    return c


def activations(kind: str, tokens: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Synthetic ViT-like layer inputs (fp32)."""
    latent = torch.randn(tokens, 64, generator=gen) @ torch.randn(64, d, generator=gen) / 8
    z = latent + 0.5 * torch.randn(tokens, d, generator=gen)  # correlated channels, a decaying spectrum
    if kind == "ln":
        z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
        gain = 1 + 0.3 * torch.randn(d, generator=gen)
        bias = 0.1 * torch.randn(d, generator=gen)
        massive = torch.randperm(d, generator=gen)[:6]
        gain[massive] *= 20
        bias[massive] += 2
        return z * gain + bias
    return torch.nn.functional.gelu(z - 0.5)


def errors(c: torch.Tensor, ref: torch.Tensor, ref_eig: torch.Tensor) -> dict:
    diff = c.double() - ref
    scale = torch.outer(ref.diagonal(), ref.diagonal()).sqrt()
    eig = torch.linalg.eigvalsh(c.double())
    return {"frob": (diff.norm() / ref.norm()).item(), "entry": (diff.abs() / scale).max().item(),
            "diag": (diff.diagonal().abs() / ref.diagonal()).max().item(),
            "eig": ((eig - ref_eig).abs().max() / ref_eig.abs().max()).item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--inputs", default="ln,gelu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"d {args.dim}, {args.tokens} tokens in one fp32 chunk; errors against the fp64 product of the same "
          "fp32 values")
    print(f"{'input':<6} {'method':<22} {'rel Frobenius':>13} {'max entry':>10} {'max diag':>10} {'max eig':>10} "
          f"{'vs FFMA':>8}")
    for kind in args.inputs.split(","):
        x = activations(kind, args.tokens, args.dim, torch.Generator().manual_seed(args.seed))
        ref = x.double().T @ x.double()
        ref_eig = torch.linalg.eigvalsh(ref)
        methods = {"fp32 FFMA": lambda x=x: gram_ffma(x)}
        for mode in ("rn", "rz"):
            methods[f"tf32 {mode}"] = lambda x=x, m=mode: gram_tf32(x, m)
        for mode in ("rn", "rz"):
            methods[f"tf32x3 per-block {mode}"] = lambda x=x, m=mode: gram_tf32x3(x, m)
            methods[f"tf32x3 chained {mode}"] = lambda x=x, m=mode: gram_tf32x3(x, m, per_block=False)
        base = None
        for name, fn in methods.items():
            e = errors(fn(), ref, ref_eig)
            base = base or e["frob"]
            print(f"{kind:<6} {name:<22} {e['frob']:>13.3e} {e['entry']:>10.3e} {e['diag']:>10.3e} {e['eig']:>10.3e} "
                  f"{e['frob'] / base:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
