"""Datasets: the built-in ``digits`` (offline, from scikit-learn) and any ImageFolder directory."""

from .datasets import DataSplits, load_data

__all__ = ["DataSplits", "load_data"]
