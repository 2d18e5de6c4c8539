"""Where ViT-B/16's CPU time goes, dense against factored (issue 17: why the realized fraction stays
below 0.9): eager PyTorch at batch 32, ``torch.profiler`` self time and ``FlopCounterMode`` FLOPs per
operator class, for the same models ``benchmarks/models/vit_b_engines.py`` times (``bench.cut_to_ratio``).

    python benchmarks/run.py vit-b-breakdown                  # 50% and 35% of the parameters, ~5 min
    python benchmarks/run.py vit-b-breakdown --model vit-digits --batch-size 4 --steps 1   # a smoke run

The realized fraction is (dense time / compressed time) / (dense FLOPs / compressed FLOPs). Two
counterfactuals split its shortfall: the fraction if the factored GEMMs ran at the dense GEMMs' GFLOP/s
(what thin GEMMs lose per FLOP), and if the operators that do no multiply-adds (norms, GELU, adds,
copies) took no time (what factoring cannot shrink). Rows go to
``benchmarks/results/<device>_<model>-breakdown.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter

from benchmarks.models.vit_b_engines import dense_model, floats
from benchmarks.tools.rows import environment, result_path
from utilrank_kernels._files import write_json
from utilrank_kernels.bench import cut_to_ratio, input_size
from utilrank_kernels.measure import flop_formulas
from utilrank_kernels.timing import Timing

# operator classes (aten op names): the GEMMs factoring changes, attention (untouched), the patch embedding,
# and the rest: norms, activations, adds, copies (no multiply-adds)
GEMM_OPS = {"addmm", "mm", "bmm", "baddbmm", "matmul", "linear"}
ATTENTION_OPS = ("scaled_dot_product", "softmax")
CONV_OPS = ("convolution", "conv2d")


def op_class(name: str) -> str:
    """``aten::addmm`` (profiler) or ``aten.mm.default`` (FlopCounterMode) -> ``gemm`` | ``attention`` |
    ``conv`` | ``other``."""
    op = re.split(r"::|\.", name.removeprefix("aten::").removeprefix("aten."))[0]
    if op in GEMM_OPS:
        return "gemm"
    if any(k in op for k in ATTENTION_OPS):
        return "attention"
    if any(k in op for k in CONV_OPS):
        return "conv"
    return "other"


def _class_ms(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Milliseconds of one forward pass per operator class (profiler self time of the aten ops)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    ms: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ms[op_class(event.key)] += event.self_cpu_time_total / 1e3
    return ms


def _class_gflop(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    with flop_counter.FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        model(x)
    gflop: dict[str, float] = defaultdict(float)
    for op, flops in counter.get_flop_counts()["Global"].items():
        gflop[op_class(str(op))] += flops / 1e9
    return dict(gflop)


@torch.inference_mode()
def profile_pair(models: dict[str, torch.nn.Module], x: torch.Tensor, steps: int) -> dict[str, tuple]:
    """``{name: ({class: ms per step}, {class: GFLOP per step}, wall ms per step)}``, the models profiled in
    alternation (a drifting machine slows them alike) after two warm-up steps each; the wall time is the
    median of as many unprofiled steps, to check that the profile adds up to the real step."""
    for model in models.values():
        for _ in range(2):  # allocator, oneDNN primitives, page faults of the first buffers
            model(x)
    ms = {name: defaultdict(float) for name in models}
    walls: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            for k, v in _class_ms(model, x).items():
                ms[name][k] += v / steps
            started = time.perf_counter()
            model(x)
            walls[name].append(time.perf_counter() - started)
    return {name: (dict(ms[name]), _class_gflop(model, x), Timing.of(walls[name]).median)
            for name, model in models.items()}


def summarize(ratio: float, dense: tuple, comp: tuple) -> dict:
    """``dense`` and ``comp``: ``({class: ms}, {class: GFLOP}[, wall ms])`` of one step."""
    (dms, dgf), (cms, cgf) = dense[:2], comp[:2]
    td, tc = sum(dms.values()), sum(cms.values())
    fd, fc = sum(dgf.values()), sum(cgf.values())
    realized = (td / tc) / (fd / fc)
    # counterfactual 1: the factored GEMMs at the dense GEMMs' throughput
    tc_gemm_at_dense_rate = tc - cms.get("gemm", 0) + cgf.get("gemm", 0) / (dgf["gemm"] / dms["gemm"])
    # counterfactual 2: operators without multiply-adds cost nothing in either model
    free = lambda ms: sum(v for k, v in ms.items() if k != "other")  # noqa: E731
    return {
        "param_ratio": ratio, "dense_ms": dms, "compressed_ms": cms, "dense_gflop": dgf, "compressed_gflop": cgf,
        "speedup": td / tc, "flop_ratio": fd / fc, "realized_fraction": realized,
        "gemm_gflops_per_s": {"dense": 1e3 * dgf["gemm"] / dms["gemm"], "compressed": 1e3 * cgf["gemm"] / cms["gemm"]},
        "wall_ms": {"dense": dense[2], "compressed": comp[2]} if len(dense) > 2 else None,
        "realized_if_gemms_at_dense_rate": (td / tc_gemm_at_dense_rate) / (fd / fc),
        "realized_if_other_ops_free": (free(dms) / free(cms)) / (fd / fc),
        "other_share": {"dense": dms.get("other", 0) / td, "compressed": cms.get("other", 0) / tc},
    }


def print_row(s: dict) -> None:
    print(f"-- {s['param_ratio']:.0%} of the parameters: speedup {s['speedup']:.2f}x of FLOP ratio "
          f"{s['flop_ratio']:.2f}x: realized {s['realized_fraction']:.2f}")
    print(f"   {'class':<10}{'dense ms':>10}{'comp ms':>10}{'dense GF':>10}{'comp GF':>10}")
    for k in sorted(set(s["dense_ms"]) | set(s["compressed_ms"])):
        print(f"   {k:<10}{s['dense_ms'].get(k, 0):>10.1f}{s['compressed_ms'].get(k, 0):>10.1f}"
              f"{s['dense_gflop'].get(k, 0):>10.2f}{s['compressed_gflop'].get(k, 0):>10.2f}")
    if s["wall_ms"]:
        print(f"   profiled step {sum(s['dense_ms'].values()):.0f} / {sum(s['compressed_ms'].values()):.0f} ms, "
              f"unprofiled {s['wall_ms']['dense']:.0f} / {s['wall_ms']['compressed']:.0f} ms (dense / compressed)")
    g = s["gemm_gflops_per_s"]
    print(f"   GEMM throughput: dense {g['dense']:.0f}, factored {g['compressed']:.0f} GFLOP/s; realized "
          f"{s['realized_if_gemms_at_dense_rate']:.2f} if the factored GEMMs ran at the dense rate, "
          f"{s['realized_if_other_ops_free']:.2f} if the ops without multiply-adds were free "
          f"(they are {s['other_share']['dense']:.0%} of dense time, {s['other_share']['compressed']:.0%} of "
          "compressed)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--ratios", type=floats, default=[0.5, 0.35], help="parameter fractions (default: 0.5,0.35)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3,
                   help="profiled (and as many unprofiled) forward passes per model (default: 3)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_<model>-breakdown.json")
    args = p.parse_args(argv)
    out = result_path(f"{args.model}-breakdown", "cpu", args.out)
    dense = dense_model(args.model)
    x = torch.randn(args.batch_size, *input_size(dense, args.model))
    load_before, started = os.getloadavg()[0], time.time()
    print(f"{args.model}, eager, batch {args.batch_size}, {torch.get_num_threads()} threads; load average "
          f"{load_before:.2f}")
    rows = []
    for ratio in args.ratios:
        compressed, _ = cut_to_ratio(dense, ratio, 16, args.model)
        got = profile_pair({"dense": dense, "compressed": compressed}, x, args.steps)
        rows.append(summarize(ratio, got["dense"], got["compressed"]))
        print_row(rows[-1])
        del compressed
    doc = {"model": args.model, "batch_size": args.batch_size, "engine": "eager", **environment("cpu"),
           "steps": args.steps, "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
           "command": "python benchmarks/run.py vit-b-breakdown "
                      + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    write_json(out, doc)
    print(f"wrote {out} in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
