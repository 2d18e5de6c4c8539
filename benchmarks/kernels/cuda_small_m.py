"""Small-M results of the CUDA extension, and the dispatch table the runtime reads.

    .ci/build_cuda_ext.sh && python benchmarks/run.py cuda-small-m [--dtypes bfloat16,float16] [--no-vit]
    python benchmarks/run.py cuda-small-m --quick    # ViT-B shapes, bf16, M in {1, 16}: checks the script

1. Per call, for ViT-B/L layer shapes at ~50% parameters and M in {1, 4, 16}: the CUDA extension's
   one-launch kernel, the Triton kernel (``lowrank_linear(..., backend="triton")``) and the two-call
   torch path, ``auto`` (plus the dense ``F.linear`` for reference), and the same for the whole factored MLP
   (``graph_cases``; ``gpu_run.sh --call 2`` runs them at M 1, 8 and 16 with ViT-B/16's 50% ranks).
   Time per call is the median (p20, p80) of CUDA-graph replays of many calls, each call on its own
   copy of the weights, enough copies to overflow L2: the weights stream from DRAM, as in a model.
   Achieved bandwidth = bytes of the weights and x read and y written / time.
2. Batch-1 latency of ViT-B/16 (random init) under CUDA graphs: dense, and every ``nn.Linear`` of the
   blocks replaced by ``LowRankLinear.from_dense`` at the rank giving ~50% of its parameters.
3. ``"dispatch"``: per shape, M and dtype, the fastest backend, recorded for this device with
   ``ops._dispatch.write_small_m_table`` (the cache folder), where ``backend="auto"`` reads it.

Rows (``benchmarks.tools.rows.Row``, each against the torch path of the same run) and the table go to
``benchmarks/results/<device>_cuda-small-m.json``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from collections.abc import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.kernels.cases import Case, Impl, gpu_timer, measure_cases, time_graph
from benchmarks.tools.rows import Row, environment, first_line, result_path, write_rows
from utilrank_kernels.nn import LowRankLinear, set_backend
from utilrank_kernels.ops import lowrank_linear, lowrank_mlp
from utilrank_kernels.ops._cuda_ext import lowrank_linear_cuda, lowrank_mlp_cuda
from utilrank_kernels.ops._dispatch import (
    SMALL_M_TABLE_FORMAT,
    cuda_extension,
    triton_available,
    write_small_m_table,
)
from utilrank_kernels.ops.lowrank import apply_activation, lowrank_mlp_reference
from utilrank_kernels.timing import Timing

# (model, layer, in, out)
LAYERS = [
    ("vit_b", "qkv", 768, 2304), ("vit_b", "proj", 768, 768), ("vit_b", "fc1", 768, 3072),
    ("vit_b", "fc2", 3072, 768),
    ("vit_l", "qkv", 1024, 3072), ("vit_l", "proj", 1024, 1024), ("vit_l", "fc1", 1024, 4096),
    ("vit_l", "fc2", 4096, 1024),
]
MLPS = [("vit_b", 768, 3072), ("vit_l", 1024, 4096)]
MS = (1, 4, 16)
L2_OVERFLOW_BYTES = 256 << 20  # weight copies per timed graph: comfortably past any L2 (50-60 MB)
TIMING = ("per call: median (p20, p80) of 30 CUDA-graph replays of one call per weight copy, with enough copies "
          f"(<= {L2_OVERFLOW_BYTES >> 20} MiB) to stream the weights from DRAM")
RUNTIME_BACKENDS = ("cuda", "triton", "torch")  # what the small-M table may name


def half_rank(n_in: int, n_out: int, ratio: float = 0.5) -> int:
    """The rank whose factors hold ``ratio`` of the dense layer's parameters."""
    return max(1, int(ratio * n_in * n_out / (n_in + n_out)))


def _copies(weight_bytes: int, cap: int) -> int:
    """Weight copies per timed graph: enough to stream the weights from DRAM, at most ``cap``."""
    return max(2, min(cap, L2_OVERFLOW_BYTES // weight_bytes))


def nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _graph_impls(fns: dict[str, Callable], x: torch.Tensor, copies: list[tuple], moved: int,
                 cpu: frozenset[str]) -> dict[str, Impl]:
    """One ``Impl`` per function: ``fn(x, *copies[0])`` alone, and the graph of one call per copy."""
    return {name: Impl(lambda fn=fn: fn(x, *copies[0]), name in cpu,
                       [lambda fn=fn, w=w: fn(x, *w) for w in copies], {"bytes": moved})
            for name, fn in fns.items()}


CPU_IMPLS = frozenset({"torch", "torch-epilogue", "auto", "dense"})


def linear_impls(m: int, n_in: int, n_out: int, r: int, act: str | None, dtype: torch.dtype, device: str,
                 max_copies: int = 256) -> dict[str, Impl]:
    """The CUDA extension, Triton, the torch path (and its cuBLASLt epilogue for GELU), ``auto`` and the dense
    layer, each timed over its own copies of the weights."""
    kw = {"device": device, "dtype": dtype}
    x = torch.randn(m, n_in, **kw)
    copies = _copies((r * n_in + n_out * r + n_out) * x.element_size(), max_copies)
    ws = [(torch.randn(r, n_in, **kw) * n_in**-0.5, torch.randn(n_out, r, **kw) * r**-0.5,
           torch.randn(n_out, **kw)) for _ in range(copies)]
    y_bytes = m * n_out * x.element_size()
    fns = {"cuda": lambda x, a, b, bias: lowrank_linear_cuda(x, a, b, bias, act),
           "triton": lambda x, a, b, bias: lowrank_linear(x, a, b, bias, act, backend="triton"),
           "torch": lambda x, a, b, bias: apply_activation(F.linear(F.linear(x, a), b, bias), act),
           "auto": lambda x, a, b, bias: lowrank_linear(x, a, b, bias, act, backend="auto")}
    if act == "gelu":
        fns["torch-epilogue"] = lambda x, a, b, bias: torch._addmm_activation(bias, F.linear(x, a), b.t(),
                                                                              use_gelu=True)
    impls = _graph_impls(fns, x, ws, nbytes(x, *ws[0]) + y_bytes, CPU_IMPLS)
    dense = [(torch.randn(n_out, n_in, **kw), w[2]) for w in ws[:_copies(n_in * n_out * x.element_size(), max_copies)]]
    impls |= _graph_impls({"dense": lambda x, w, bias: apply_activation(F.linear(x, w, bias), act)}, x, dense,
                          nbytes(x, *dense[0]) + y_bytes, CPU_IMPLS)
    return impls


def mlp_impls(m: int, d: int, hidden: int, r1: int, r2: int, dtype: torch.dtype, device: str,
              max_copies: int = 128) -> dict[str, Impl]:
    kw = {"device": device, "dtype": dtype}
    x = torch.randn(m, d, **kw)
    copies = _copies((r1 * d + hidden * r1 + hidden + r2 * hidden + d * r2 + d) * x.element_size(), max_copies)
    ws = [(torch.randn(r1, d, **kw) * d**-0.5, torch.randn(hidden, r1, **kw) * r1**-0.5,
           torch.randn(hidden, **kw), torch.randn(r2, hidden, **kw) * hidden**-0.5,
           torch.randn(d, r2, **kw) * r2**-0.5, torch.randn(d, **kw)) for _ in range(copies)]
    fns = {"cuda": lambda x, *w: lowrank_mlp_cuda(x, *w, "gelu"),
           "triton": lambda x, *w: lowrank_mlp(x, *w, "gelu", backend="triton"),
           "torch": lambda x, *w: lowrank_mlp_reference(x, *w, "gelu"),
           "auto": lambda x, *w: lowrank_mlp(x, *w, "gelu", backend="auto")}
    impls = _graph_impls(fns, x, ws, nbytes(x, *ws[0]) + m * d * x.element_size(), CPU_IMPLS)
    dense = [(torch.randn(hidden, d, **kw), w[2], torch.randn(d, hidden, **kw), w[5])
             for w in ws[:_copies(2 * d * hidden * x.element_size(), max_copies)]]
    impls |= _graph_impls({"dense": lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)}, x,
                          dense, nbytes(x, *dense[0]) + m * d * x.element_size(), CPU_IMPLS)
    return impls


def graph_cases(layers: Sequence[tuple[str, int, int, int, str | None]], mlps: Sequence[tuple[str, int, int, int]],
                ms: Sequence[int], dtype: torch.dtype, device: str = "cuda", *, max_copies: int = 256) -> list[Case]:
    """Per layer ``(name, in, out, rank, activation)`` and MLP ``(name, width, hidden, rank)``, at each M: every
    backend as CUDA-graph replays, each row against the torch path (and its epilogue) of the same run."""
    name = str(dtype).removeprefix("torch.")
    cases = [Case("lowrank_linear", layer, name, {"m": m, "in_features": n_in, "out_features": n_out, "rank": r},
                  lambda m=m, n_in=n_in, n_out=n_out, r=r, act=act: linear_impls(m, n_in, n_out, r, act, dtype, device,
                                                                                max_copies),
                  ("torch", "torch-epilogue"), {"activation": act, "timing": TIMING})
             for layer, n_in, n_out, r, act in layers for m in ms]
    cases += [Case("lowrank_mlp", layer, name, {"m": m, "in_features": d, "hidden_features": hidden,
                                                "out_features": d, "rank": r, "rank2": r},
                   lambda m=m, d=d, hidden=hidden, r=r: mlp_impls(m, d, hidden, r, r, dtype, device,
                                                                   min(max_copies, 128)),
                   ("torch",), {"timing": TIMING})
              for layer, d, hidden, r in mlps for m in ms]
    return cases


def linear_rows(dtype: torch.dtype, layers=LAYERS, ms=MS) -> list[Row]:
    cases = graph_cases([(f"{model}.{layer}", n_in, n_out, half_rank(n_in, n_out), None)
                         for model, layer, n_in, n_out in layers], [], ms, dtype)
    return measure_cases(cases, gpu_timer)


def mlp_rows(dtype: torch.dtype, mlps=MLPS, ms=MS) -> list[Row]:
    cases = graph_cases([], [(f"{model}.mlp", d, hidden, half_rank(d, hidden)) for model, d, hidden in mlps], ms, dtype)
    return measure_cases(cases, gpu_timer)


def dispatch_table(rows: list[Row], device: str) -> dict:
    """Per op, M, shape and dtype, every backend's microseconds and the fastest."""
    cases: dict[tuple, dict] = {}
    for row in rows:
        if row.op in ("lowrank_linear", "lowrank_mlp") and row.timing:
            if row.impl not in RUNTIME_BACKENDS:
                continue
            s = row.shape
            key = (row.op, s["m"], s["in_features"], s["out_features"], s["rank"], row.dtype)
            cases.setdefault(key, {})[row.impl] = round(row.timing.median * 1e3, 3)
    entries = [{"op": op, "m": m, "in_features": n_in, "out_features": n_out, "rank": r, "dtype": dtype,
                "fastest": min(us, key=us.get), "us": us}
               for (op, m, n_in, n_out, r, dtype), us in sorted(cases.items())]
    return {"format": SMALL_M_TABLE_FORMAT, "device": device, "timing": "CUDA-graph replay, weights from DRAM",
            "entries": entries}


def _factored_vit(dense: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """A copy of ``dense`` with every block Linear as ``LowRankLinear`` at half its parameters (SVD factors)."""
    compressed = timm.create_model("vit_base_patch16_224", pretrained=False).to("cuda", dtype).eval()
    compressed.load_state_dict(dense.state_dict())
    replaced = 0
    for name, module in list(compressed.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name.startswith("blocks."):
                r = half_rank(child.in_features, child.out_features)
                u, s, vh = torch.linalg.svd(child.weight.float(), full_matrices=False)
                a = (s[:r, None].sqrt() * vh[:r]).to(dtype)
                b = (u[:, :r] * s[:r].sqrt()).to(dtype)
                setattr(module, child_name, LowRankLinear.from_dense(child, a, b))
                replaced += 1
    return compressed, replaced


def vit_rows(dtype: torch.dtype, backends: list[str]) -> list[Row]:
    """Batch-1 latency of ViT-B/16 under CUDA graphs: dense, and factored per backend against it."""

    def weight_bytes(model: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    def latency(model: nn.Module) -> Timing:
        with torch.no_grad():
            return time_graph([lambda: model(x)], reps=40)

    torch.manual_seed(0)
    dense = timm.create_model("vit_base_patch16_224", pretrained=False).to("cuda", dtype).eval()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=dtype)
    name, shape, dtype_name = "vit_base_patch16_224", {"batch_size": 1}, str(dtype).removeprefix("torch.")
    t_dense = latency(dense)
    rows = [Row(name, "dense", dtype_name, shape, t_dense, extra={"weight_bytes": weight_bytes(dense)})]
    print(f"{name} bs=1 {dtype_name}: dense {t_dense.median:.3f} ms")
    compressed, replaced = _factored_vit(dense, dtype)
    ratio = weight_bytes(compressed) / weight_bytes(dense)
    target = 1.2 * t_dense.median * ratio
    common = {"layers_factored": replaced, "param_ratio": 0.5, "weight_bytes": weight_bytes(compressed),
              "target_ms": target,
              "target_rule": "compressed <= 1.2 x dense latency x compressed weight bytes / dense weight bytes"}
    for backend in backends:
        set_backend(compressed, backend)
        try:
            timing, error = latency(compressed), None
        except Exception as exc:
            timing, error = None, first_line(exc)
        rows.append(Row(name, f"compressed-{backend}", dtype_name, shape, timing,
                        {"dense": t_dense} if timing else {},
                        {**common, "meets_target": timing.median <= target if timing else None}, error))
        print(f"  compressed ({backend}): " + (f"{timing.median:.3f} ms (target {target:.3f} ms, weight bytes "
                                                f"x{ratio:.3f})" if timing else error))
    return rows


VIT_NOTE = ("At batch 1 a ViT-B/16 layer sees M = 197 tokens, past the small-M kernels (M <= 16): the compressed "
            "model runs the Triton or torch path; the CUDA extension's kernels are for M <= 16 rows (token-level "
            "decoding, heads, small batches of pooled features).")


def m1_summary(rows: list[Row]) -> dict | None:
    """The issue's target: at M = 1 the fused op takes at most 0.6x the two-call torch path."""
    ratios = [1 / r.speedup("torch") for r in rows if r.op == "lowrank_linear" and r.shape["m"] == 1
              and r.impl == "cuda" and r.speedup("torch")]
    if not ratios:
        return None
    return {"target": 0.6, "worst": max(ratios), "geomean": math.exp(sum(map(math.log, ratios)) / len(ratios))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--no-vit", action="store_true")
    parser.add_argument("--quick", action="store_true", help="ViT-B shapes, bfloat16, M in {1, 16}, no ViT")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<device>_cuda-small-m.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda-small-m: needs a CUDA device; nothing was measured", file=sys.stderr)
        return 2
    if cuda_extension() is None:
        print("cuda-small-m: utilrank_kernels._C is not built; build it with .ci/build_cuda_ext.sh", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    layers, mlps, ms = LAYERS, MLPS, MS
    if args.quick:
        dtypes, ms, args.no_vit = [torch.bfloat16], (1, 16), True
        layers, mlps = [row for row in LAYERS if row[0] == "vit_b"], MLPS[:1]
    rows: list[Row] = []
    for dtype in dtypes:
        rows += linear_rows(dtype, layers, ms) + mlp_rows(dtype, mlps, ms)
    env = environment("cuda")
    table = dispatch_table(rows, env["device"])
    meta = {"python": platform.python_version(), "timing": TIMING, "dispatch": table,
            "m1_cuda_vs_torch": m1_summary(rows)}
    if not args.no_vit:
        rows += vit_rows(dtypes[0], ["torch", "auto"] + (["triton"] if triton_available() else []))
        meta["vit_note"] = VIT_NOTE
    out = write_rows(result_path("cuda-small-m", "cuda", args.out), "cuda-small-m", rows, env, **meta)
    print(f"wrote {out}; the dispatch table the runtime reads: {write_small_m_table(table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
