"""The scores that drive the rank search and fill the reports: each a ``Metric``, ``metric(model, dataset) ->
float`` with higher better, passed to ``compress_model(metric=...)``.

- ``accuracy``: top-1 accuracy (``train.evaluate``), for a model with a classification head on labelled data.
- ``cosine`` (``OutputCosine``): the mean, over the split's examples, of the cosine similarity between the model's
  output embedding and a reference (the dense) model's on the same examples: for encoders without a task head
  and unlabelled text. The embedding is the mean of ``last_hidden_state`` over the ``attention_mask``'s tokens
  (sentence-transformers' mean pooling), else ``pooler_output``, else the output itself (logits, a timm model's
  tensor); ``pooling="pooler"`` prefers ``pooler_output``. 1.0 is the dense model's own score; a ``--tolerance``
  of PP points allows a drop of PP/100 in mean cosine.

Why the mean and not BERT's pooler by default: the pooler is one Linear + tanh of the first token, so it sees
little of what a cut does to the other tokens (and sentence-transformers never use it): on all-MiniLM-L6-v2 the
SVD cut that takes the mean-pooled cosine to 0.60 leaves the pooler's at 0.83
(benchmarks/studies/text_encoder_methods.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.batch import call_model, model_input
from .models.hf import has_classification_head
from .train import evaluate, logits_of

Metric = Callable[[nn.Module, Dataset], float]
METRICS = ("accuracy", "cosine")
POOLINGS = ("mean", "pooler")


def accuracy(device: torch.device | str = "cpu") -> Metric:
    return lambda model, dataset: evaluate(model, dataset, device=device)


def output_embedding(output, attention_mask: torch.Tensor | None = None, pooling: str = "mean") -> torch.Tensor:
    """``[B, d]``: the mean of ``last_hidden_state`` over the ``attention_mask`` (all tokens without one), else
    ``pooler_output``, else the output tensor or ``logits``; ``pooling="pooler"`` takes ``pooler_output`` first."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if isinstance(output, torch.Tensor):
        return output.flatten(1)
    pooled = getattr(output, "pooler_output", None)
    if pooling == "pooler" and pooled is not None:
        return pooled
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        if attention_mask is None:
            return hidden.mean(1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    return pooled if pooled is not None else logits_of(output)


@torch.no_grad()
def embeddings(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu", batch_size: int = 256,
               pooling: str = "mean") -> torch.Tensor:
    """``[N, d]`` fp32 output embeddings of every example of ``dataset``, in order."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            inputs, mask = model_input(batch, device)
            rows.append(output_embedding(call_model(model, inputs), mask, pooling).float().cpu())
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError("output cosine: the dataset is empty")
    return torch.cat(rows)


class OutputCosine:
    """``Metric``: mean cosine similarity of a model's output embeddings to ``reference``'s on the same split.
    The reference's embeddings are computed once per dataset and kept (``reference`` must not change meanwhile;
    ``compress_model`` leaves the dense model as it is)."""

    def __init__(self, reference: nn.Module, *, device: torch.device | str = "cpu", batch_size: int = 256,
                 pooling: str = "mean"):
        self.reference, self.device, self.batch_size, self.pooling = reference, device, batch_size, pooling
        self._reference_rows: dict[int, tuple[Dataset, torch.Tensor]] = {}  # id -> (dataset kept alive, rows)

    def reference_embeddings(self, dataset: Dataset) -> torch.Tensor:
        key = id(dataset)
        if key not in self._reference_rows:
            rows = embeddings(self.reference, dataset, device=self.device, batch_size=self.batch_size,
                              pooling=self.pooling)
            self._reference_rows[key] = (dataset, rows)
        return self._reference_rows[key][1]

    def __call__(self, model: nn.Module, dataset: Dataset) -> float:
        reference = self.reference_embeddings(dataset)
        rows = embeddings(model, dataset, device=self.device, batch_size=self.batch_size, pooling=self.pooling)
        return F.cosine_similarity(rows, reference, dim=-1).mean().item()


def has_labels(dataset: Dataset) -> bool:
    """Whether examples are ``(inputs, label)`` pairs (images, ``.tsv`` text) rather than bare inputs."""
    return len(dataset) > 0 and isinstance(dataset[0], (tuple, list)) and len(dataset[0]) >= 2


def accuracy_problem(model: nn.Module, data) -> str | None:
    """Why top-1 accuracy, and training on labels, cannot be had for ``model`` on ``data`` (None if it can)."""
    if not has_classification_head(model):
        return f"{type(model).__name__} has no classification head (an encoder)"
    if not has_labels(data.val):
        return f"--data {data.name} has no labels (labelled text is a .tsv file of LABEL<TAB>TEXT lines)"
    return None


def select_metric(name: str | None, model: nn.Module, data, device: torch.device | str = "cpu") -> tuple[str, Metric]:
    """``(name, metric)`` for ``--metric NAME`` (``None``: accuracy where the model has a classification head and
    the data labels, cosine to ``model`` otherwise); a ``ValueError`` says why accuracy cannot be measured."""
    problem = accuracy_problem(model, data)
    name = name or ("cosine" if problem else "accuracy")
    if name not in METRICS:
        raise ValueError(f"--metric {name}: choose one of {', '.join(METRICS)}")
    if name == "accuracy":
        if problem:
            raise ValueError(f"--metric accuracy: {problem}; use --metric cosine")
        return name, accuracy(device)
    return name, OutputCosine(model, device=device)
