"""One streaming pass over the data: per-layer input second moments ``C_in = sum_t x_t x_t^T``.

Forward pre-hooks on every analyzable layer feed ``covariance_update`` (``nn.Linear``, any leading
dims) or ``conv_covariance_update`` (``nn.Conv2d`` with groups=1, implicit im2col) into ``Statistics``.

On CPU the updates run on a second thread while the forward goes on (``overlap``), each with half of
torch's threads: a forward of small layers scales poorly over threads, so two streams of half the
threads beat one stream of all of them (`python benchmarks/run.py stats-pass`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._kernel_args import conv_output_size
from ..data.batch import call_model, model_input, token_mask
from ..layers import FilterFn, find_layers
from ..ops import conv_covariance_update, covariance_update, mirror_upper_
from .stats import LayerStats, Statistics

logger = logging.getLogger(__name__)


def _empty_layer_stats(name: str, module: nn.Module, device: torch.device) -> LayerStats:
    weight = module.weight
    out_features, in_features = weight.shape[0], weight[0].numel()
    conv = None
    if isinstance(module, nn.Conv2d):
        conv = {"kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "in_channels": module.in_channels,
                "padding_mode": module.padding_mode}
    cov = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
    return LayerStats(name, "conv2d" if conv else "linear", in_features, out_features, cov, 0, conv)


class NonFiniteInputError(RuntimeError):
    pass


# Layer inputs waiting for the overlap thread stay alive; past this many bytes the forward waits.
_OVERLAP_MAX_BYTES = 512 << 20


class ModifiedInputError(RuntimeError):
    pass


class _Collector:
    """Owns the hooks of one pass; ``mask`` is the current batch's token mask (or None). With
    ``overlap`` the updates run in submission order on one worker thread, and ``finish_batch`` waits
    for them."""

    def __init__(self, modules: dict[str, nn.Module], stats: Statistics, backend: str, stats_device,
                 overlap: bool = False):
        self.stats, self.backend, self.stats_device = stats, backend, stats_device
        self.mask: torch.Tensor | None = None
        self.batch_index = 0
        self.pending: list[tuple[str, int | torch.Tensor]] = []
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="utilrank-stats") if overlap else None
        self.in_flight: deque[tuple[Future, int]] = deque()
        self.in_flight_bytes = 0
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self.worker is not None:
            self.worker.shutdown(wait=True, cancel_futures=True)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs) -> None:
            x = inputs[0].detach()
            if self.worker is None or x.is_inference():  # an inference tensor has no version to check
                self._wait_in_flight()
                self._update_no_grad(name, module, x)
                return
            nbytes = x.numel() * x.element_size()
            self.in_flight.append((self.worker.submit(self._update_checked, name, module, x, x._version), nbytes))
            self.in_flight_bytes += nbytes
            self._wait_in_flight(_OVERLAP_MAX_BYTES)
        return hook

    def _wait_in_flight(self, max_bytes: int = -1) -> None:
        """Wait for the oldest updates until at most ``max_bytes`` of inputs are in flight (default: none)."""
        while self.in_flight and self.in_flight_bytes > max_bytes:
            future, nbytes = self.in_flight.popleft()
            self.in_flight_bytes -= nbytes
            future.result()  # re-raises the worker's error here

    def _update_no_grad(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        with torch.no_grad():
            self._update(name, module, x)

    def _update_checked(self, name: str, module: nn.Module, x: torch.Tensor, version: int) -> None:
        self._update_no_grad(name, module, x)
        if x._version != version:  # the forward changed the input in place before it was read
            raise ModifiedInputError(
                f"layer {name}: the model modified its input in place at batch {self.batch_index} while "
                f"the statistics thread was reading it; rerun without overlap (--no-overlap)"
            )

    def _update(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        s = self.stats.layers[name]
        # with --stats-on-cpu, the batch's product is formed on the input's device and moved once
        acc = s.cov if s.cov.device == x.device else torch.zeros_like(s.cov, device=x.device)
        if isinstance(module, nn.Conv2d):
            padding = module.padding
            if isinstance(padding, str) or module.padding_mode != "zeros":
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0, 0)
            conv_covariance_update(acc, x, module.kernel_size, module.stride, padding, module.dilation,
                                   backend=self.backend, upper=True)
            out_h, out_w = conv_output_size(x.shape[2:], module.kernel_size, module.stride, padding,
                                            module.dilation)
            tokens = x.shape[0] * out_h * out_w
        else:
            mask = self.mask
            if mask is not None and x.dim() == 2 and x.shape[0] == mask.shape[0]:
                mask = None  # pooled per-example features (a classifier head): no token axis to mask
            if mask is not None:
                if tuple(mask.shape) != tuple(x.shape[:-1]):
                    raise ValueError(f"layer {name}: the token mask has shape {tuple(mask.shape)} but the layer's "
                                     f"input is {tuple(x.shape)} (tokens {tuple(x.shape[:-1])}); pass a mask_fn "
                                     "whose mask fits every token input, or a filter_fn that leaves this layer out")
                mask = mask.to(x.device)
            covariance_update(acc, x, mask, backend=self.backend, upper=True)
            tokens = mask.sum() if mask is not None else x.numel() // x.shape[-1]
        if acc is not s.cov:
            s.cov.add_(acc.to(s.cov.device))
        self.pending.append((name, tokens))

    def finish_batch(self) -> None:
        """Token counts and the NaN/Inf check of every layer, with one host sync per batch (not one per
        layer): a NaN or Inf anywhere in an input reaches the diagonal (sums of squares)."""
        self._wait_in_flight()
        pending, self.pending = self.pending, []
        if not pending:
            return
        layers = self.stats.layers
        diagonals = [layers[n].cov.diagonal() for n, _ in pending]
        if not torch.isfinite(torch.cat(diagonals).sum()).item():  # sums of squares: nothing cancels
            name = next(n for (n, _), diag in zip(pending, diagonals, strict=True) if not diag.isfinite().all())
            raise NonFiniteInputError(
                f"layer {name}: NaN or Inf in its input at batch {self.batch_index}; statistics stopped"
            )
        counted = [t for _, t in pending if isinstance(t, torch.Tensor)]
        counts = iter(torch.stack(counted).tolist()) if counted else iter(())
        for name, t in pending:
            layers[name].tokens += next(counts) if isinstance(t, torch.Tensor) else t


def _mirror(stats: Statistics) -> None:
    """The updates write the upper triangles only (each off-diagonal entry once); fill the lower ones."""
    for s in stats.layers.values():
        mirror_upper_(s.cov)


def collect_stats(
    model: nn.Module,
    batches: Iterable,
    *,
    filter_fn: FilterFn | None = None,
    mask_fn: Callable[[object], torch.Tensor | None] | None = None,
    device: str | torch.device | None = None,
    stats_on_cpu: bool = False,
    max_batches: int | None = None,
    resume: Statistics | None = None,
    skip_resumed: bool = True,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 0,
    backend: str = "auto",
    progress: bool = True,
    meta: dict | None = None,
    total: int | None = None,
    overlap: bool | None = None,
) -> Statistics:
    """One forward pass per batch updates every analyzable layer's input statistics.

    ``batches`` yields tensors, mappings of tensors (a tokenizer's ``BatchEncoding``: the model is called
    with ``**batch``) or ``(inputs, ...)`` tuples of either. The token mask of shape ``(B, T)`` is a
    mapping's ``attention_mask`` (any integer or bool dtype), or ``mask_fn(batch)``'s where given: masked
    tokens are excluded in every Linear whose input is ``(B, T, d)``. ``resume`` continues a checkpoint:
    its first ``resume.batches`` batches are skipped (``skip_resumed=False`` when the caller already
    started ``batches`` after them).
    ``checkpoint_every`` writes the statistics to ``checkpoint_path`` every N batches, atomically.
    Under ``torch.distributed`` the result is all-reduced: each process passes its own shard.
    ``overlap`` runs the updates on a second thread, each stream with half of torch's threads (default:
    a CPU pass with at least 2 threads); a model that modifies a layer's input in place after the layer
    then stops the pass with an error naming the layer. torch's thread count is process-wide: other
    threads running torch ops during an overlapped pass get half the threads until it ends.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    stats_device = torch.device("cpu") if stats_on_cpu else device
    threads = torch.get_num_threads()
    if overlap is None:
        overlap = device.type == "cpu" and threads >= 2
    elif overlap and device.type != "cpu":
        raise ValueError(f"collect_stats: overlap runs the updates on a CPU thread; the pass is on {device}")
    modules, skipped_layers = find_layers(model, filter_fn)
    skipped = [{"name": n, "reason": r} for n, r in skipped_layers.items()]
    if not modules:
        raise ValueError("collect_stats: the model has no nn.Linear or nn.Conv2d (groups=1) layer to analyze")
    if resume is not None:
        stats = resume
        missing = sorted(modules.keys() ^ stats.layers.keys())
        if missing:
            raise ValueError(f"cannot resume: checkpoint and model differ in layers {', '.join(missing[:8])}")
        for s in stats.layers.values():
            s.cov = s.cov.to(stats_device)
    else:
        stats = Statistics({n: _empty_layer_stats(n, m, stats_device) for n, m in modules.items()}, skipped,
                           0, dict(meta or {}))
    if progress:
        logger.info(f"statistics: {len(modules)} layers, accumulators {stats.nbytes / 2**20:.1f} MiB fp64 on "
                    f"{stats_device}")
    iterator = iter(batches)
    if resume is not None and skip_resumed:
        iterator = itertools.islice(iterator, stats.batches, None)
    if max_batches is not None:
        iterator = itertools.islice(iterator, max(0, max_batches - stats.batches))
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    collector = _Collector(modules, stats, backend, stats_device, overlap)
    was_training = model.training
    model.eval()
    if overlap:
        torch.set_num_threads(max(1, threads // 2))  # the worker thread takes the same count on first use
    try:
        # no_grad, not inference_mode: layer inputs keep the version counters that overlap checks
        with torch.no_grad(), tqdm(iterator, desc="statistics", unit="batch", initial=stats.batches,
                                   total=total, disable=not progress) as bar:
            for batch in bar:
                collector.batch_index = stats.batches
                inputs, padding_mask = model_input(batch, device)
                mask = mask_fn(batch) if mask_fn is not None else padding_mask
                collector.mask = None if mask is None else token_mask(mask)
                call_model(model, inputs)
                collector.finish_batch()
                stats.batches += 1
                if checkpoint_every and checkpoint_path and stats.batches % checkpoint_every == 0:
                    _mirror(stats)
                    stats.save(checkpoint_path)
    finally:
        collector.remove()
        _mirror(stats)
        torch.set_num_threads(threads)
        model.train(was_training)
    stats.all_reduce()
    return stats
