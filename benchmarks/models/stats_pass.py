"""The statistics pass against a plain forward pass over the same batches (issue 2's budget).

    python benchmarks/run.py stats-pass                # built-in vit-digits, CPU
    python benchmarks/run.py stats-pass --model vgg-digits

Each round times one plain forward pass over the batches and one statistics pass over the same
batches, alternating so that both see the same machine load (``timing.time_interleaved``); the ratio of
medians is reported and written to ``benchmarks/results/<device>_stats-pass.json`` (seconds; read by
``readme-table``). As in ``utilrank bench``, glibc keeps freed
memory for reuse (``--release-memory`` turns that off): otherwise which large activations get
page-faulted in anew depends on the allocator's history, and single runs differ by 1.5x.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.data import DataLoader

from benchmarks.tools.rows import environment, result_path
from utilrank_kernels._files import write_json
from utilrank_kernels.analysis import collect_stats
from utilrank_kernels.data import load_data
from utilrank_kernels.models.loading import trained_builtin
from utilrank_kernels.timing import Timing, keep_freed_memory, quantiles_ms, time_interleaved

FORMAT = "utilrank.bench-stats/1"


def seconds(times: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of ``times`` (seconds), in seconds."""
    return {k: v / 1e3 for k, v in Timing.of(times).as_dict().items()}


def spread(values: list[float]) -> dict[str, float]:
    """Median, p20 and p80 of unitless ``values`` (Timing's quantiles)."""
    return dict(zip(("median", "p20", "p80"), (q / 1e3 for q in quantiles_ms(values)), strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-digits")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--release-memory", action="store_true", help="let glibc return freed memory to the OS")
    p.add_argument("--no-overlap", action="store_true", help="run the updates in the forward's thread")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    keep_freed = not args.release_memory and keep_freed_memory()

    model = trained_builtin(args.model).eval()
    batches = [x for x, _ in DataLoader(load_data("digits").train, batch_size=args.batch_size)]

    def forward_pass():
        with torch.inference_mode():
            for x in batches:
                model(x)

    def stats_pass():
        collect_stats(model, batches, progress=False, overlap=False if args.no_overlap else None)

    times = time_interleaved({"forward": forward_pass, "statistics": stats_pass}, warmup=1, iters=args.rounds)
    fwd, st = times["forward"], times["statistics"]
    env = environment("cpu")
    row = {
        "model": args.model, "batch_size": args.batch_size, "batches": len(batches),
        "forward_s": seconds(fwd), "stats_s": seconds(st),
        "ratio": Timing.of(st).median / Timing.of(fwd).median, "malloc_keep_freed": keep_freed,
        "overlap": not args.no_overlap,
        "round_ratio": spread([s / f for s, f in zip(st, fwd, strict=True)]), **env,
    }
    print(f"{args.model} batch {args.batch_size} on {env['device']} "
          f"({'overlapped' if row['overlap'] else 'inline'} updates): forward "
          f"{row['forward_s']['median'] * 1e3:.1f} ms, statistics pass {row['stats_s']['median'] * 1e3:.1f} ms "
          f"per epoch -> ratio {row['ratio']:.2f}x (rounds: p20 {row['round_ratio']['p20']:.2f}, "
          f"p80 {row['round_ratio']['p80']:.2f})")
    out = result_path("stats-pass", "cpu", args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    key = (args.model, args.batch_size, row["overlap"])
    rows = [r for r in rows if (r["model"], r["batch_size"], r.get("overlap", False)) != key] + [row]
    write_json(out, {"format": FORMAT, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
