"""The process group under torchrun as the library's stages see it: this process's rank and the number of
processes (0 and 1 where no group is initialized), its shard of a dataset, and sums over the processes.

One sharding everywhere: a process takes every ``world``-th example from its rank, the statistics pass's order
(``analysis.statistics_pass``); metrics are combined from the shards' sums (``ShardedMetric``), fine-tuning splits
each global batch the same way (``train``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


def process() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """This process's examples of ``dataset``: every ``world``-th from ``rank`` (the dataset itself for one)."""
    return dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))


def comm_device() -> torch.device:
    """Where a tensor must be for the group's collectives: this process's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed over the processes in fp64 (every process gets the same sums); as they are for one."""
    if process()[1] == 1:
        return list(values)
    buf = torch.tensor(list(values), dtype=torch.float64, device=comm_device())
    dist.all_reduce(buf)
    return buf.tolist()


class ShardedMetric:
    """A metric (``metric(model, dataset) -> float``, a mean over the dataset's examples) computed by each process on
    its shard and combined into the whole split's: the shards' means weighted by their sizes, summed over the
    processes. ``counts``: the metric is a fraction of examples (accuracy, top-1 agreement), whose per-shard sums are
    whole numbers and are rounded to them, so that one process and many give the same value to the last bit. Every
    process must call it with the same model and split (the search and the scores do: they run on every process
    with the same statistics)."""

    def __init__(self, metric: Callable[[torch.nn.Module, Dataset], float], *, counts: bool):
        self.metric, self.counts = metric, counts
        self._shards: dict[int, tuple[Dataset, Dataset]] = {}  # id -> (dataset kept alive, its shard)

    def __call__(self, model: torch.nn.Module, dataset: Dataset) -> float:
        rank, world = process()
        if world == 1:
            return self.metric(model, dataset)
        if id(dataset) not in self._shards:  # the same Subset each time: a reference metric caches per dataset
            self._shards[id(dataset)] = (dataset, shard(dataset, rank, world))
        part = self._shards[id(dataset)][1]
        local = self.metric(model, part) * len(part) if len(part) else 0.0
        (total,) = all_sum([round(local) if self.counts else local])
        return total / len(dataset)
