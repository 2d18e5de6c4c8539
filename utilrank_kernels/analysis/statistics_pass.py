"""The statistics pass over a dataset as the commands run it: this process's shard in a fixed order, checkpoints
in a folder every N batches, and a resume that continues a checkpoint only when it was made by the same pass
(the same model, weights, data, batch size, shard and layers), else says what differs."""

from __future__ import annotations

import logging
from collections.abc import Sized
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..layers import find_layers
from ..nn.lowrank import layer_shape
from .collect import collect_stats
from .stats import Statistics

logger = logging.getLogger(__name__)


class ResumeError(ValueError):
    """The pass cannot continue from its checkpoint. ``parameter`` names the argument at fault (``resume``, or
    ``max_batches N``) and ``reason`` says why: a command line puts its own option before the reason."""

    def __init__(self, parameter: str, reason: str):
        super().__init__(f"{parameter}: {reason}")
        self.parameter, self.reason = parameter, reason


def statistics_bytes(model: nn.Module) -> int:
    """Bytes of the fp64 accumulators (and of ``stats.safetensors``) a pass over ``model`` holds."""
    return sum(8 * layer_shape(m).in_features ** 2 for m in find_layers(model)[0].values())


def pass_identity(model: nn.Module, dataset: Sized, *, model_name: str, model_checkpoint: str | None,
                  dataset_name: str, batch_size: int, rank: int, world: int) -> dict:
    """What makes a statistics pass reproducible, recorded in its checkpoints: a resume must match it."""
    layers, _ = find_layers(model)
    return {"model": model_name, "checkpoint": model_checkpoint, "dataset": dataset_name, "examples": len(dataset),
            "batch_size": batch_size, "order": "dataset order, no shuffle", "shard": f"{rank} of {world}",
            "mask": "attention_mask" if dataset_name.startswith("text:") else "none",
            "layers": {n: [layer_shape(m).out_features, layer_shape(m).in_features] for n, m in layers.items()}}


def _stream_loader(dataset: Dataset, batch_size: int, start_batch: int, rank: int, world: int,
                   workers: int) -> DataLoader:
    """A fixed-order loader over this process's shard, starting after ``start_batch`` batches."""
    indices = list(range(rank, len(dataset), world))[start_batch * batch_size :]
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers)


def _load_checkpoint(ckpt: Path, identity: dict, device: torch.device | str) -> Statistics:
    """The checkpoint at ``ckpt``, checked against this pass's ``identity``."""
    if not ckpt.is_file():
        raise ResumeError("resume", f"no checkpoint at {ckpt} (nothing to resume; run without resuming)")
    try:
        resume = Statistics.load(ckpt, device=device)
    except ValueError as exc:
        raise ResumeError("resume", str(exc)) from exc
    recorded = resume.meta.get("pass", {})
    for key, value in identity.items():
        if recorded.get(key) != value:
            what = "layers" if key == "layers" else f"{key} {recorded.get(key)!r}"
            now = "a model with other layers" if key == "layers" else repr(value)
            raise ResumeError("resume", f"the checkpoint {ckpt} was made with {what}, this run has {now}; "
                                        "rerun without resuming to start over")
    return resume


def statistics_pass(
    model: nn.Module,
    dataset: Dataset,
    folder: str | Path,
    *,
    batch_size: int,
    device: torch.device | str,
    model_name: str,
    dataset_name: str,
    model_checkpoint: str | None = None,
    resume: bool = False,
    max_batches: int | None = None,
    checkpoint_every: int = 0,
    stats_on_cpu: bool = False,
    overlap: bool | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Statistics:
    """``collect_stats`` over this process's shard of ``dataset`` (every ``world``-th example from ``rank``, in
    order; all-reduced over the processes), checkpointed to ``folder/stats.ckpt[.rankN].safetensors`` every
    ``checkpoint_every`` batches; rank 0 writes the result to ``folder/stats.safetensors``. The checkpoint stays
    (an output folder's commit deletes it).

    ``resume`` continues that checkpoint, which must have been made by the same pass: ``model_name``,
    ``model_checkpoint`` (the weights file, recorded only), ``dataset_name``, the dataset's length, ``batch_size``,
    the shard and the model's layers; else ``ResumeError`` says what differs. ``max_batches`` counts the batches
    the checkpoint holds. ``overlap`` and ``stats_on_cpu`` are ``collect_stats``'s."""
    folder = Path(folder)
    ckpt = folder / f"stats.ckpt{f'.rank{rank}' if world > 1 else ''}.safetensors"
    identity = pass_identity(model, dataset, model_name=model_name, model_checkpoint=model_checkpoint,
                             dataset_name=dataset_name, batch_size=batch_size, rank=rank, world=world)
    checkpoint = None
    if resume:
        checkpoint = _load_checkpoint(ckpt, identity, "cpu" if stats_on_cpu else device)
        if rank == 0:
            logger.info(f"resuming after {checkpoint.batches} batches from {ckpt}")
    start = checkpoint.batches if checkpoint else 0
    if checkpoint is not None and max_batches is not None and max_batches <= start:
        raise ResumeError(f"max_batches {max_batches}", f"the checkpoint already holds {start} batches")
    loader = _stream_loader(dataset, batch_size, start, rank, world, num_workers)
    stats = collect_stats(
        model, loader, device=device, stats_on_cpu=stats_on_cpu, max_batches=max_batches, resume=checkpoint,
        skip_resumed=False, checkpoint_path=ckpt, checkpoint_every=checkpoint_every, progress=rank == 0,
        meta={"model": model_name, "dataset": dataset_name, "pass": identity}, total=start + len(loader),
        overlap=overlap,
    )
    if rank == 0:
        stats.save(folder / "stats.safetensors")
    return stats
