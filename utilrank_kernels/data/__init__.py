"""Datasets: the built-in ``digits`` (offline, from scikit-learn), any ImageFolder directory, and text files
(``text:FILE``, tokenized by a Hugging Face model folder's tokenizer)."""

from .datasets import DataSplits, load_data, load_imagefolder_splits
from .text import load_text_splits

__all__ = ["DataSplits", "load_data", "load_imagefolder_splits", "load_text_splits"]
