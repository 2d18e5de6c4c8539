"""utilrank_kernels: measure the utilized rank of every layer on its data, factor to it, run it fast."""

from .analysis import Statistics, analyze, collect_stats

__version__ = "0.1.0"
__all__ = ["Statistics", "analyze", "collect_stats"]
