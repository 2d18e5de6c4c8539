"""The CPU covariance update's panel width: ``acc += X^T X`` by torch GEMMs over row panels of the
upper block triangle, against one full GEMM (the widths behind ``ops/covariance._panel_width``).

    python benchmarks/run.py gram-panels           # N = 4096 tokens, d from 256 to 3072

Prints one line per d: milliseconds per update for each panel width (median of interleaved rounds,
``timing.time_interleaved``), the full product's time, and how far the width the op chooses is from the best one.
"""

from __future__ import annotations

import argparse
import sys

import torch

import utilrank_kernels.ops.covariance as covariance
from utilrank_kernels.timing import Timing, time_interleaved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dims", default="256,384,512,768,1024,1536,3072")
    p.add_argument("--widths", default="64,128,192,256,384,512")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    chooses = covariance._panel_width
    print(f"{torch.get_num_threads()} threads, N = {args.tokens}; ms per update")
    for d in (int(v) for v in args.dims.split(",")):
        x = torch.randn(args.tokens, d)
        acc = torch.zeros(d, d, dtype=torch.float64)
        variants = {w: w for w in widths if w < d} | {"full": d}

        def update(width: int, x=x, acc=acc) -> None:
            covariance._panel_width = lambda _: width
            covariance._add_gram_(acc, x)

        times = time_interleaved({k: lambda w=w: update(w) for k, w in variants.items()}, warmup=1,
                                 iters=args.rounds)
        covariance._panel_width = chooses
        median = {k: Timing.of(v).median for k, v in times.items()}
        chosen = median[chooses(d)]
        cells = "  ".join(f"w{k} {v:.2f}" if k != "full" else f"full {v:.2f}" for k, v in median.items())
        print(f"d {d:5d}: {cells}  | chosen w{chooses(d)} {chosen / min(median.values()) - 1:+.0%} from the best, "
              f"full {median['full'] / chosen:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
