"""Parameters, FLOPs (attention included, on CPU too) and latency of a model: one place for each."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils import flop_counter


def _register_cpu_attention_flops() -> None:
    """PyTorch counts SDPA's FLOPs on CUDA kernels only; CPU runs use the ``_for_cpu`` op."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention_flops()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (a multiply-add counts 2), from FlopCounterMode."""
    was_training = model.training
    model.eval()
    with flop_counter.FlopCounterMode(display=False) as counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops()


def step_times(fn, *, warmup: int = 10, iters: int = 40, device: torch.device | None = None,
               max_seconds: float | None = None) -> list[float]:
    """Seconds per call of ``fn``: timm's benchmark protocol (10 warm-up, 40 timed calls).

    ``max_seconds`` stops the timed calls early (after at least 5) for slow models where a summary
    needs a median, not a benchmark."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        if max_seconds is not None and len(times) >= 5 and sum(times) > max_seconds:
            break
    return times


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, *, warmup: int = 3, iters: int = 40,
               max_seconds: float = 3.0) -> float:
    """Median milliseconds of one forward pass on ``example`` (within a time budget)."""
    model.eval()
    times = step_times(lambda: model(example), warmup=warmup, iters=iters, device=example.device,
                       max_seconds=max_seconds)
    return 1e3 * statistics.median(times)
