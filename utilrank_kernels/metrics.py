"""The scores that drive the rank search and fill the reports: each a ``Metric``, ``metric(model, dataset) ->
float`` with higher better, passed to ``compress_model(metric=...)``; and which fine-tuning loss a model and its
data allow (``finetune_loss``).

- ``accuracy``: top-1 accuracy (``train.evaluate``), for a model with a classification head on labelled data.
- ``agreement`` (``TopOneAgreement``): the fraction of the split's examples whose top-1 class is the reference (the
  dense) model's: a classifier's accuracy against the dense model's own predictions, so it needs no labels (a vision
  model on an unlabelled folder). 1.0 is the dense model's own score.
- ``cosine`` (``OutputCosine``): the mean, over the split's examples, of the cosine similarity between the model's
  output embedding and a reference (the dense) model's on the same examples: for encoders without a task head
  and unlabelled text, and the logit cosine of a classifier. The embedding is the mean of ``last_hidden_state``
  over the ``attention_mask``'s tokens (sentence-transformers' mean pooling), else ``pooler_output``, else the
  output itself (logits, a timm model's tensor); ``pooling="pooler"`` prefers ``pooler_output``. 1.0 is the dense
  model's own score; a ``--tolerance`` of PP points allows a drop of PP/100 in mean cosine (or agreement).

Both label-free metrics compare with the reference's outputs, computed once per split and kept (``ReferenceMetric``).

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
from .models.hf import has_classification_head, is_hf_model
from .train import LOSSES, POOLINGS, evaluate, logits_of, output_embedding

Metric = Callable[[nn.Module, Dataset], float]
METRICS = ("accuracy", "agreement", "cosine")
FINETUNE_LOSSES = ("auto", *LOSSES)


def accuracy(device: torch.device | str = "cpu") -> Metric:
    return lambda model, dataset: evaluate(model, dataset, device=device)


@torch.no_grad()
def _rows(model: nn.Module, dataset: Dataset, row: Callable, *, device, batch_size: int, what: str) -> torch.Tensor:
    """``row(output, mask)`` of every batch of ``dataset``, in order, concatenated on the CPU."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            inputs, mask = model_input(batch, device)
            rows.append(row(call_model(model, inputs), mask).cpu())
    finally:
        model.train(was_training)
    if not rows:
        raise ValueError(f"{what}: the dataset is empty")
    return torch.cat(rows)


def embeddings(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu", batch_size: int = 256,
               pooling: str = "mean") -> torch.Tensor:
    """``[N, d]`` fp32 output embeddings of every example of ``dataset``, in order."""
    return _rows(model, dataset, lambda out, mask: output_embedding(out, mask, pooling).float(), device=device,
                 batch_size=batch_size, what="output cosine")


def predictions(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
                batch_size: int = 256) -> torch.Tensor:
    """``[N]`` top-1 classes (the argmax of the logits) of every example of ``dataset``, in order."""
    return _rows(model, dataset, lambda out, mask: logits_of(out).argmax(-1), device=device, batch_size=batch_size,
                 what="top-1 agreement")


class ReferenceMetric:
    """``Metric``: a model's per-example rows (``rows``) compared with ``reference``'s (``compare``). The reference's
    rows are computed once per dataset and kept (``reference`` must not change meanwhile; ``compress_model`` leaves
    the dense model as it is)."""

    def __init__(self, reference: nn.Module, *, device: torch.device | str = "cpu", batch_size: int = 256):
        self.reference, self.device, self.batch_size = reference, device, batch_size
        self._reference_rows: dict[int, tuple[Dataset, torch.Tensor]] = {}  # id -> (dataset kept alive, rows)

    def rows(self, model: nn.Module, dataset: Dataset) -> torch.Tensor:
        raise NotImplementedError

    def compare(self, rows: torch.Tensor, reference: torch.Tensor) -> float:
        raise NotImplementedError

    def reference_rows(self, dataset: Dataset) -> torch.Tensor:
        key = id(dataset)
        if key not in self._reference_rows:
            self._reference_rows[key] = (dataset, self.rows(self.reference, dataset))
        return self._reference_rows[key][1]

    def __call__(self, model: nn.Module, dataset: Dataset) -> float:
        return self.compare(self.rows(model, dataset), self.reference_rows(dataset))


class OutputCosine(ReferenceMetric):
    """Mean cosine similarity of a model's output embeddings (logits for a classifier) to ``reference``'s."""

    def __init__(self, reference: nn.Module, *, device: torch.device | str = "cpu", batch_size: int = 256,
                 pooling: str = "mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
        super().__init__(reference, device=device, batch_size=batch_size)
        self.pooling = pooling

    def rows(self, model: nn.Module, dataset: Dataset) -> torch.Tensor:
        return embeddings(model, dataset, device=self.device, batch_size=self.batch_size, pooling=self.pooling)

    def reference_embeddings(self, dataset: Dataset) -> torch.Tensor:
        return self.reference_rows(dataset)

    def compare(self, rows: torch.Tensor, reference: torch.Tensor) -> float:
        return F.cosine_similarity(rows, reference, dim=-1).mean().item()


class TopOneAgreement(ReferenceMetric):
    """The fraction of examples whose top-1 class is ``reference``'s top-1 class."""

    def rows(self, model: nn.Module, dataset: Dataset) -> torch.Tensor:
        return predictions(model, dataset, device=self.device, batch_size=self.batch_size)

    def compare(self, rows: torch.Tensor, reference: torch.Tensor) -> float:
        return (rows == reference).double().mean().item()


def has_labels(dataset: Dataset) -> bool:
    """Whether examples are ``(inputs, label)`` pairs (images, ``.tsv`` text) rather than bare inputs."""
    return len(dataset) > 0 and isinstance(dataset[0], (tuple, list)) and len(dataset[0]) >= 2


def _head_problem(model: nn.Module) -> str | None:
    if not has_classification_head(model):
        return f"{type(model).__name__} has no classification head (an encoder)"
    return None


def _label_problem(data, split: str) -> str | None:
    if not has_labels(getattr(data, split)):
        return f"--data {data.name} has no labels (labelled text is a .tsv file of LABEL<TAB>TEXT lines)"
    return None


def accuracy_problem(model: nn.Module, data) -> str | None:
    """Why top-1 accuracy, and training on labels, cannot be had for ``model`` on ``data`` (None if it can)."""
    return _head_problem(model) or _label_problem(data, "val")


def finetune_loss(choice: str, model: nn.Module, data) -> str:
    """The fine-tuning loss (``train.LOSSES``) for ``choice`` on ``model`` and ``data`` (its train split):
    ``auto`` is ``labels`` where the model has a head and the data labels, else ``logits`` (distillation from the
    dense model's class logits) where it has a head, else ``embedding`` (never ``hidden``: the output embedding plus
    every layer's hidden states, asked for by name). A ``ValueError`` says why an explicit choice cannot run (labels
    without labels or head, logits without a head, hidden states of a model that is not a Hugging Face one)."""
    if choice not in FINETUNE_LOSSES:
        raise ValueError(f"fine-tuning loss {choice!r}: choose one of {', '.join(FINETUNE_LOSSES)}")
    head, labels = _head_problem(model), _label_problem(data, "train")
    if choice == "auto":
        return "labels" if not (head or labels) else "logits" if not head else "embedding"
    if choice == "labels" and (head or labels):
        raise ValueError(f"fine-tuning on labels: {head or labels}; distil from the dense model instead "
                         f"(--distill {'logits' if not head else 'embedding'} or auto), or pass --finetune-epochs 0")
    if choice == "logits" and head:
        raise ValueError(f"distillation on logits: {head}, so its output has no class logits; use --distill "
                         "embedding")
    if choice == "hidden" and not is_hf_model(model):
        raise ValueError(f"distillation on hidden states: {type(model).__name__} is not a Hugging Face model, whose "
                         "output_hidden_states it reads; use --distill logits or embedding")
    return choice


def select_metric(name: str | None, model: nn.Module, data, device: torch.device | str = "cpu") -> tuple[str, Metric]:
    """``(name, metric)`` for ``--metric NAME`` (``None``: accuracy where the model has a classification head and
    the data labels, cosine to ``model`` otherwise); a ``ValueError`` says why accuracy (or agreement, which needs
    a head) cannot be measured."""
    problem = accuracy_problem(model, data)
    name = name or ("cosine" if problem else "accuracy")
    if name not in METRICS:
        raise ValueError(f"--metric {name}: choose one of {', '.join(METRICS)}")
    if name == "accuracy":
        if problem:
            raise ValueError(f"--metric accuracy: {problem}; use --metric cosine"
                             + ("" if _head_problem(model) else " or agreement"))
        return name, accuracy(device)
    if name == "agreement":
        head = _head_problem(model)
        if head:
            raise ValueError(f"--metric agreement: {head}, so it predicts no class; use --metric cosine")
        return name, TopOneAgreement(model, device=device)
    return name, OutputCosine(model, device=device)
