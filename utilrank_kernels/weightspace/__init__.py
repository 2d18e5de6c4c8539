"""Weight space: synthesis (model soups, uniform and greedy; SWA; soups of compressed models), populations of
models (``population``), where they live (``regions``: PCA / t-SNE maps, distances, barrier heights) and
accuracy predicted from their weights (``predict``).

The spectra and heavy-tail metrics of single layers live in ``utilrank_kernels.analysis.esd`` and
``analysis.spectrum``; the ``soup``, ``spectrum``, ``regions`` and ``predict`` commands in
``utilrank_kernels.cli``.
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
from .population import DEFAULT_RECIPE, Member, Population, population_from_files, train_population
from .predict import loo_regression, model_metrics, predict_experiment, spearman
from .regions import barrier_height, embed, path_accuracy, regions_experiment, weight_vectors

__all__ = [
    "DEFAULT_RECIPE", "CompressedSoup", "GreedySoup", "Member", "Population", "average_state_dicts",
    "barrier_height", "check_compatible", "compressed_module", "compressed_soup", "dense_equivalent",
    "dense_state_dict", "embed", "greedy_compressed_soup", "greedy_soup", "load_soup", "loo_regression",
    "model_metrics", "path_accuracy", "planned_stats", "population_from_files", "predict_experiment", "refactor",
    "regions_experiment", "spearman", "state_dict_of", "strip_prefixes", "swa", "swa_average", "train_population",
    "uniform_soup", "weight_vectors",
]
