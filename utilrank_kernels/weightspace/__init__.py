"""Weight space: synthesis (model soups, uniform and greedy; SWA; soups of compressed models), populations of
models (``population``), where they live (``regions``: PCA / t-SNE maps, distances, barrier heights) and
accuracy predicted from their weights (``predict``).

The spectra and heavy-tail metrics of single layers live in ``utilrank_kernels.analysis.esd`` and
``analysis.spectrum``; the ``soup``, ``spectrum``, ``regions`` and ``predict`` commands in
``utilrank_kernels.cli``.
"""

from .average import GreedySoup, greedy_soup, load_soup, swa, uniform_soup
from .compressed import CompressedSoup, compressed_soup, greedy_compressed_soup

__all__ = ["CompressedSoup", "GreedySoup", "compressed_soup", "greedy_compressed_soup", "greedy_soup", "load_soup",
           "swa", "uniform_soup"]
