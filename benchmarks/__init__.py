"""Benchmarks, studies and tools of utilrank-kernels; ``python benchmarks/run.py --list`` lists them."""
