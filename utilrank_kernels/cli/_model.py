"""The model and data options (``--model``, ``--checkpoint``, ``--data``, ``--num-classes``, ``--label-map``,
``--head-epochs``, ``--max-length``) resolved by ``models.load_model_and_data``; what it prints goes to the terminal,
a name that does not resolve is a usage error."""

from __future__ import annotations

import torch

from ..models import ModelAndData, ModelDataError, load_model_and_data
from ._options import UsageError


def model_and_data(args, device: torch.device) -> ModelAndData:
    """The model and data splits the options name (options a command lacks take their defaults)."""
    try:
        return load_model_and_data(
            args.model, args.data, checkpoint=args.checkpoint, num_classes=getattr(args, "num_classes", None),
            head_epochs=getattr(args, "head_epochs", 5), max_length=getattr(args, "max_length", None),
            label_map=getattr(args, "label_map", None), device=device,
            log=lambda line: print(line, flush=True))
    except ModelDataError as exc:
        raise UsageError(str(exc)) from exc
