"""utilrank_kernels: measure the utilized rank of every layer on its data, factor to it, run it fast."""

from .analysis import Statistics, analyze, collect_stats
from .compress import apply_plan, decompose, load_compressed, save_compressed
from .nn import LowRankConv2d, LowRankLinear

__version__ = "0.1.0"
__all__ = [
    "LowRankConv2d", "LowRankLinear", "Statistics", "analyze", "apply_plan", "collect_stats", "decompose",
    "load_compressed", "save_compressed",
]
