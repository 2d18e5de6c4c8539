"""Parameters and FLOPs of a model (attention included, on CPU too). Timing is ``timing.py``."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import flop_counter


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_formulas() -> dict:
    """The formulas ``count_flops`` adds to ``FlopCounterMode``'s for this call only (nothing is registered
    process-wide, so other code's FLOP counts do not depend on whether this package was imported): PyTorch
    counts SDPA's FLOPs on CUDA kernels only; CPU runs use the ``_for_cpu`` op."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return {}
    return {op: _sdpa_cpu_flop}  # the op packet, unwrapped: FlopCounterMode wraps and resolves overloads


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (a multiply-add counts 2), from FlopCounterMode."""
    was_training = model.training
    model.eval()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops()
