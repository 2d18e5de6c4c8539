"""Weight-space synthesis: model soups (uniform, greedy), SWA, and soups of compressed models.

The weight-space analysis (spectra, heavy-tail metrics) lives in ``utilrank_kernels.analysis.spectrum``;
the ``utilrank soup`` and ``utilrank spectrum`` commands in ``utilrank_kernels.cli``.
"""

from .average import (
    GreedySoup,
    average_state_dicts,
    check_compatible,
    greedy_soup,
    load_soup,
    state_dict_of,
    strip_prefixes,
    swa,
    swa_average,
    uniform_soup,
)
from .compressed import (
    CompressedSoup,
    compressed_module,
    compressed_soup,
    dense_equivalent,
    dense_state_dict,
    greedy_compressed_soup,
    planned_stats,
    refactor,
)

__all__ = [
    "CompressedSoup", "GreedySoup", "average_state_dicts", "check_compatible", "compressed_module",
    "compressed_soup", "dense_equivalent", "dense_state_dict", "greedy_compressed_soup", "greedy_soup",
    "load_soup", "planned_stats", "refactor", "state_dict_of", "strip_prefixes", "swa", "swa_average",
    "uniform_soup",
]
