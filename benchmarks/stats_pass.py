"""The statistics pass against a plain forward pass over the same batches (issue 2's budget).

    python benchmarks/stats_pass.py                # built-in vit-digits, CPU
    python benchmarks/stats_pass.py --model vgg-digits

Each round times one plain forward pass over the batches and one statistics pass over the same
batches, alternating so that both see the same machine load; the ratio of medians is reported and
written to benchmarks/results/<device>-stats-pass.json.
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
from utilrank_kernels.models.loading import trained_builtin  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-digits")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    model = trained_builtin(args.model).eval()
    batches = [x for x, _ in DataLoader(load_data("digits").train, batch_size=args.batch_size)]

    def forward_pass():
        with torch.inference_mode():
            for x in batches:
                model(x)

    def stats_pass():
        collect_stats(model, batches, progress=False)

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
        "ratio": quantiles(st)["median"] / quantiles(fwd)["median"], **env,
    }
    print(f"{args.model} batch {args.batch_size} on {env['device']} ({env['threads']} threads): forward "
          f"{row['forward_s']['median'] * 1e3:.1f} ms, statistics pass {row['stats_s']['median'] * 1e3:.1f} ms "
          f"per epoch -> ratio {row['ratio']:.2f}x")
    out = Path(args.out or Path(__file__).parent / "results" /
               f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', env['device'])}-stats-pass.json")
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    rows = [r for r in rows if (r["model"], r["batch_size"]) != (args.model, args.batch_size)] + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"format": "utilrank.bench-stats/1", "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
