"""The batch adapter: the one place that knows what a batch may be. A tensor, a mapping of tensors (a tokenizer's
``BatchEncoding``, a dict: the model is called with ``**batch``, Hugging Face style) or a tuple/list whose first
element is either (``(inputs, labels)``). A mapping's ``attention_mask`` is the padding mask (any integer or bool
dtype, nonzero = a real token): without it a padded batch's statistics count its pad tokens."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

ModelInput = torch.Tensor | Mapping[str, torch.Tensor]


def _split_batch(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def model_input(batch, device: torch.device | str) -> tuple[ModelInput, torch.Tensor | None]:
    """The model's input of ``batch`` on ``device``, and the bool token mask it carries (None for a tensor)."""
    x = _split_batch(batch)
    if isinstance(x, Mapping):
        x = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        mask = x.get("attention_mask")
        return x, None if mask is None else token_mask(mask)
    return x.to(device, non_blocking=True), None


def call_model(model: nn.Module, inputs: ModelInput):
    """``model(**inputs)`` for a mapping, ``model(inputs)`` for a tensor."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def token_mask(mask: torch.Tensor) -> torch.Tensor:
    """A padding mask as bool (an integer ``attention_mask``: nonzero is a real token)."""
    return mask if mask.dtype == torch.bool else mask != 0
