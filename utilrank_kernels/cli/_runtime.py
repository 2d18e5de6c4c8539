"""Where a command runs: the ``--device`` option, the process group under torchrun, and ``--threads``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from threadpoolctl import threadpool_limits

from .. import env
from ._options import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def init_distributed() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1), join the process group; returns (rank, world_size)."""
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """``--threads`` for PyTorch and for the BLAS under numpy (the spectra's fits), via threadpoolctl; 0
    (the default) keeps the libraries' defaults. (A default of 1 for the built-in models was needed while
    the statistics pass ran scipy's BLAS beside torch's threads; without it, 2 threads are as fast on 2
    cores: spectrum 15 s either way, soup 37 s against 40-46 s.)"""
    if threads < 0:
        raise UsageError(f"--threads {threads}: must be >= 0 (0: the libraries' defaults)")
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:  # a caller in the same process (a test, a notebook) gets its setting back
        torch.set_num_threads(before)
