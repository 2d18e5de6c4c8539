"""The statistics pass against a plain forward pass over the same batches (issue 2's budget).

    python benchmarks/stats_pass.py                # built-in vit-digits, CPU
    python benchmarks/stats_pass.py --model vgg-digits

Each round times one plain forward pass over the batches and one statistics pass over the same
batches, alternating so that both see the same machine load; the ratio of medians is reported and
written to benchmarks/results/<device>-stats-pass.json. As in ``utilrank bench``, glibc keeps freed
memory for reuse (``--release-memory`` turns that off): otherwise which large activations get
page-faulted in anew depends on the allocator's history, and single runs differ by 1.5x.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, quantiles  # noqa: E402

from utilrank_kernels.analysis import collect_stats  # noqa: E402
from utilrank_kernels.data import load_data  # noqa: E402
from utilrank_kernels.timing import keep_freed_memory  # noqa: E402
from utilrank_kernels.models.loading import trained_builtin  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-digits")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--release-memory", action="store_true", help="let glibc return freed memory to the OS")
    p.add_argument("--no-overlap", action="store_true", help="run the updates in the forward's thread")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    keep_freed = not args.release_memory and keep_freed_memory()

    model = trained_builtin(args.model).eval()
    batches = [x for x, _ in DataLoader(load_data("digits").train, batch_size=args.batch_size)]

    def forward_pass():
        with torch.inference_mode():
            for x in batches:
                model(x)

    def stats_pass():
        collect_stats(model, batches, progress=False, overlap=False if args.no_overlap else None)

    forward_pass(), stats_pass()  # warm-up
    fwd, st = [], []
    for _ in range(args.rounds):
        for fn, times in ((forward_pass, fwd), (stats_pass, st)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    env = environment("cpu")
    row = {
        "model": args.model, "batch_size": args.batch_size, "batches": len(batches),
        "forward_s": quantiles(fwd), "stats_s": quantiles(st),
        "ratio": quantiles(st)["median"] / quantiles(fwd)["median"], "malloc_keep_freed": keep_freed,
        "overlap": not args.no_overlap,
        "round_ratio": quantiles([s / f for s, f in zip(st, fwd, strict=True)]), **env,
    }
    print(f"{args.model} batch {args.batch_size} on {env['device']} ({env['threads']} threads, "
          f"{'overlapped' if row['overlap'] else 'inline'} updates): forward "
          f"{row['forward_s']['median'] * 1e3:.1f} ms, statistics pass {row['stats_s']['median'] * 1e3:.1f} ms "
          f"per epoch -> ratio {row['ratio']:.2f}x (rounds: p20 {row['round_ratio']['p20']:.2f}, "
          f"p80 {row['round_ratio']['p80']:.2f})")
    out = Path(args.out or Path(__file__).parent / "results" /
               f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', env['device'])}-stats-pass.json")
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    key = (args.model, args.batch_size, row["overlap"])
    rows = [r for r in rows if (r["model"], r["batch_size"], r.get("overlap", False)) != key] + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"format": "utilrank.bench-stats/1", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
