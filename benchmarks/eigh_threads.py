"""fp64 eigendecomposition time on 1 thread against torch's default, per width: the rule behind
``analysis.subspace.SINGLE_THREAD_EIGH_BELOW``. Prints one line per width (median of 3)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="64,256,512,1024,1536,2048,3072")
    args = p.parse_args()
    default = torch.get_num_threads()
    print(f"threads: default {default}")
    for d in map(int, args.sizes.split(",")):
        c = torch.randn(d, d, dtype=torch.float64)
        c = c @ c.T
        times = {}
        for threads in dict.fromkeys((1, default)):
            torch.set_num_threads(threads)
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                torch.linalg.eigh(c)
                runs.append(time.perf_counter() - start)
            times[threads] = statistics.median(runs)
        torch.set_num_threads(default)
        print(f"d {d:>5}: " + ", ".join(f"{t} thread(s) {s:.3f} s" for t, s in times.items()))


if __name__ == "__main__":
    main()
