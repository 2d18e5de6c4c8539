"""ViT-B/16 at 50% and 35% of its parameters against dense, in eager PyTorch, torch.compile and onnxruntime,
at batch 1 and 32 on the CPU (issue 17's real-size evidence).

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/run.py vit-b-engines
    python benchmarks/run.py vit-b-engines --model vit-digits --ratios 0.5 --batch-sizes 2 --iters 3   # a smoke run

Random weights (timing depends on the ranks, not on the values): every Linear/Conv2d factored by
``bench.cut_to_ratio`` (SVD factors at the rank keeping R of its parameters, rounded down to a multiple of
16, MLPs fused), timed by ``bench.bench`` exactly as ``utilrank bench --engine eager,compile,onnxruntime``
times it: per engine, dense and compressed interleaved; onnxruntime runs each model's checked ONNX export.
Rows (``utilrank bench``'s, timm's fields) go to ``benchmarks/results/<device>_<model>-engines.json`` with the
machine's load average before and after (a shared machine distorts timings: run it when ``uptime`` shows the
machine idle), and ``python benchmarks/run.py readme-table`` puts them in the README table.

Protocol: 3 warm-up steps per model, then up to 40 interleaved rounds within ``--max-seconds`` per
configuration (at least 5 rounds). On a 2-core CPU a ViT-B step at batch 32 takes 4-8 s, so batch 32
gets 5-10 rounds and batch 1 all 40; with compiling and exporting, the whole run takes about 30-40 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import timm
import torch

from benchmarks.tools.rows import result_path
from utilrank_kernels.bench import ENGINES, bench, cut_to_ratio, input_size, write_rows
from utilrank_kernels.models import BUILTIN_MODELS, build_builtin
from utilrank_kernels.timing import THP_HINT, cpu_thp_alloc, device_label, keep_freed_memory


def floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def dense_model(name: str) -> torch.nn.Module:
    """A built-in, or a timm model with random weights (seed 0), in eval mode."""
    if name in BUILTIN_MODELS:
        return build_builtin(name).eval()
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--ratios", type=floats, default=[0.5, 0.35], help="parameter fractions (default: 0.5,0.35)")
    p.add_argument("--batch-sizes", type=ints, default=[1, 32])
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="timed rounds per configuration end after this long (at least 5 rounds)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_<model>-engines.json")
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if not cpu_thp_alloc():
        print(THP_HINT)
    keep_freed = keep_freed_memory()
    label = device_label("cpu")
    out = result_path(f"{args.model}-engines", "cpu", args.out)

    dense = dense_model(args.model)
    shape = input_size(dense, args.model)
    started, load_before = time.time(), os.getloadavg()[0]
    print(f"{args.model} on {label}; engines {', '.join(engines)}; batch sizes {args.batch_sizes}; load average "
          f"{load_before:.2f}")
    rows = []
    for ratio in args.ratios:
        compressed, plan = cut_to_ratio(dense, ratio, 16, args.model)
        print(f"-- {ratio:.0%} of the parameters: {len(plan.layers)} layers factored")
        rows += bench(dense, compressed, model_name=args.model, input_shape=shape, batch_sizes=args.batch_sizes,
                      engines=engines, device="cpu", warmup=args.warmup, iters=args.iters,
                      max_seconds=args.max_seconds, log=print,
                      extra={"param_ratio": ratio, "rank_multiple": 16, "malloc_keep_freed": keep_freed,
                             "script": "benchmarks/models/vit_b_engines.py",
                             "loadavg_before": round(os.getloadavg()[0], 2)})
        del compressed
    load_after = os.getloadavg()[0]
    for row in rows:
        row["loadavg_after"] = round(load_after, 2)
    written = write_rows(rows, out)
    print(f"wrote {', '.join(map(str, written))} in {(time.time() - started) / 60:.1f} min; load average "
          f"{load_before:.2f} before, {load_after:.2f} after")
    failed = [r for r in rows if "error" in r]
    for r in failed:
        print(f"failed: {r['engine']} {r['variant']} batch {r['batch_size']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
