"""Small-M results of the CUDA extension, and the dispatch table the runtime reads.

    .ci/build_cuda_ext.sh && python benchmarks/run.py cuda-small-m [--dtypes bfloat16,float16] [--no-vit]
    python benchmarks/run.py cuda-small-m --quick    # ViT-B shapes, bf16, M in {1, 16}: checks the script

1. Per call, for ViT-B/L layer shapes at ~50% parameters and M in {1, 4, 16}: the CUDA extension's
   one-launch kernel, the Triton kernel (``lowrank_linear(..., backend="triton")``) and the two-call
   torch path (plus the dense ``F.linear`` for reference), and the same for the whole factored MLP.
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
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

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
          f"(<= {L2_OVERFLOW_BYTES >> 20} MiB) to stream the weights from DRAM; eager_us: a Python loop of 200 "
          "calls (launch overheads included)")


def half_rank(n_in: int, n_out: int, ratio: float = 0.5) -> int:
    """The rank whose factors hold ``ratio`` of the dense layer's parameters."""
    return max(1, int(ratio * n_in * n_out / (n_in + n_out)))


def time_graph(calls: list, reps: int = 30) -> Timing:
    """Per-call time of ``calls`` (closures) captured into one CUDA graph and replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls[:3]:  # warm-up (Triton autotuning, lazy init) off the capturing stream
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    seconds = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / len(calls))
    return Timing.of(seconds)


def time_eager(fn, iters: int = 200) -> float:
    """Microseconds per call of a plain Python loop (launch overheads included)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def measure(name: str, make_call: Callable[[int], Callable], copies: int) -> tuple[Timing | None, dict, str | None]:
    """``(timing, {"eager_us"}, None)``, or ``(None, {}, error)`` for a backend that cannot run this case
    (recorded, not fatal)."""
    try:
        timing = time_graph([make_call(i) for i in range(copies)])
        return timing, {"eager_us": time_eager(make_call(0))}, None
    except Exception as exc:
        print(f"  {name}: {first_line(exc, 160)}", file=sys.stderr)
        return None, {}, first_line(exc)


def bind_copies(fn, x: torch.Tensor, copies: list[tuple]):
    """``make(i)``: a closure calling ``fn(x, *copies[i % len(copies)])``."""

    def make(i: int):
        w = copies[i % len(copies)]
        return lambda: fn(x, *w)

    return make


def nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def backend_rows(op: str, label: str, dtype: torch.dtype, shape: dict, backends: dict, extra: dict) -> list[Row]:
    """One row per backend (``backends``: name -> (make_call, copies, bytes moved)), each against the torch
    path measured here."""
    measured = {name: measure(f"{label} M={shape['m']} {name}", make, copies)
                for name, (make, copies, _) in backends.items()}
    torch_path = measured["torch"][0]
    rows = []
    for name, (timing, eager, error) in measured.items():
        moved = backends[name][2]
        baselines = {"torch": torch_path} if name != "torch" and timing and torch_path else {}
        rows.append(Row(op, name, str(dtype).removeprefix("torch."), shape, timing, baselines,
                        {**extra, **eager, "bytes": moved,
                         "gbps": moved / (timing.median * 1e-3) / 1e9 if timing else None}, error))
    print(f"{label:10s} M={shape['m']:2d} r={shape['rank']} {rows[0].dtype}: "
          + "  ".join(f"{r.impl}={r.timing.median * 1e3:.2f}" if r.timing else f"{r.impl}=n/a" for r in rows)
          + " us")
    return rows


def linear_rows(dtype: torch.dtype, layers=LAYERS, ms=MS) -> list[Row]:
    kw = {"device": "cuda", "dtype": dtype}
    rows = []
    for model, layer, n_in, n_out in layers:
        r = half_rank(n_in, n_out)
        for m in ms:
            x = torch.randn(m, n_in, **kw)
            copies = max(2, min(256, L2_OVERFLOW_BYTES // ((r * n_in + n_out * r + n_out) * x.element_size())))
            ws = [(torch.randn(r, n_in, **kw) * n_in**-0.5, torch.randn(n_out, r, **kw) * r**-0.5,
                   torch.randn(n_out, **kw)) for _ in range(copies)]
            dense_copies = max(2, min(256, L2_OVERFLOW_BYTES // (n_in * n_out * x.element_size())))
            dense = [(torch.randn(n_out, n_in, **kw),) for _ in range(dense_copies)]
            y_bytes = m * n_out * x.element_size()
            moved = nbytes(x, *ws[0]) + y_bytes
            fns = {"cuda": lowrank_linear_cuda,
                   "triton": lambda x, a, b, bias: lowrank_linear(x, a, b, bias, backend="triton"),
                   "torch": lambda x, a, b, bias: F.linear(F.linear(x, a), b, bias)}
            backends = {name: (bind_copies(fn, x, ws), copies, moved) for name, fn in fns.items()}
            backends["dense"] = (bind_copies(F.linear, x, dense), dense_copies, nbytes(x, dense[0][0]) + y_bytes)
            shape = {"m": m, "in_features": n_in, "out_features": n_out, "rank": r}
            rows += backend_rows("lowrank_linear", f"{model}.{layer}", dtype, shape, backends,
                                 {"model": model, "layer": layer})
            del ws, dense
    return rows


def mlp_rows(dtype: torch.dtype, mlps=MLPS, ms=MS) -> list[Row]:
    kw = {"device": "cuda", "dtype": dtype}

    def torch_mlp(x, a1, b1, bias1, a2, b2, bias2):
        return F.linear(F.linear(F.gelu(F.linear(F.linear(x, a1), b1, bias1)), a2), b2, bias2)

    rows = []
    for model, d, hidden in mlps:
        r1, r2 = half_rank(d, hidden), half_rank(hidden, d)
        for m in ms:
            x = torch.randn(m, d, **kw)
            w_bytes = (r1 * d + hidden * r1 + hidden + r2 * hidden + d * r2 + d) * x.element_size()
            copies = max(2, min(128, L2_OVERFLOW_BYTES // w_bytes))
            ws = [(torch.randn(r1, d, **kw) * d**-0.5, torch.randn(hidden, r1, **kw) * r1**-0.5,
                   torch.randn(hidden, **kw), torch.randn(r2, hidden, **kw) * hidden**-0.5,
                   torch.randn(d, r2, **kw) * r2**-0.5, torch.randn(d, **kw)) for _ in range(copies)]
            moved = nbytes(x, *ws[0]) + m * d * x.element_size()
            fns = {"cuda": lambda x, *w: lowrank_mlp_cuda(x, *w, "gelu"),
                   "triton": lambda x, *w: lowrank_mlp(x, *w, "gelu", backend="triton"), "torch": torch_mlp}
            backends = {name: (bind_copies(fn, x, ws), copies, moved) for name, fn in fns.items()}
            shape = {"m": m, "in_features": d, "hidden_features": hidden, "out_features": d, "rank": r1,
                     "rank2": r2}
            rows += backend_rows("lowrank_mlp", f"{model}.mlp", dtype, shape, backends, {"model": model})
            del ws
    return rows


def dispatch_table(rows: list[Row], device: str) -> dict:
    """Per op, M, shape and dtype, every backend's microseconds and the fastest."""
    cases: dict[tuple, dict] = {}
    for row in rows:
        if row.op in ("lowrank_linear", "lowrank_mlp") and row.impl != "dense" and row.timing:
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
