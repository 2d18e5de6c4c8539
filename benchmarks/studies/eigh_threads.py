"""fp64 eigendecomposition time on 1 thread against torch's default, per width: the rule behind
``analysis.subspace.SINGLE_THREAD_EIGH_BELOW``. Prints one line per width (median of 3 calls, ``timing.step_times``).

    python benchmarks/run.py eigh-threads [--sizes 64,256,1024]
"""

from __future__ import annotations

import argparse
import sys

import torch

from utilrank_kernels.timing import Timing, step_times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,256,512,1024,1536,2048,3072")
    args = p.parse_args(argv)
    default = torch.get_num_threads()
    print(f"threads: default {default}")
    for d in map(int, args.sizes.split(",")):
        c = torch.randn(d, d, dtype=torch.float64)
        c = c @ c.T
        times = {}
        for threads in dict.fromkeys((1, default)):
            torch.set_num_threads(threads)
            times[threads] = Timing.of(step_times(lambda c=c: torch.linalg.eigh(c), warmup=0, iters=3))
        torch.set_num_threads(default)
        print(f"d {d:>5}: " + ", ".join(f"{t} thread(s) {s.median / 1e3:.3f} s" for t, s in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
