"""What every benchmark row carries to be comparable (STYLE: device, versions, median, p20/p80)."""

from __future__ import annotations

import datetime
import platform
import statistics
import time

import torch


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch_version": torch.__version__, "triton_version": triton_version,
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()}


def quantiles(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7]}


def time_calls(fn, *, warmup: int = 10, iters: int = 40, sync=None) -> list[float]:
    """Seconds per call of ``fn`` (timm's 10 warm-up and 40 timed iterations by default)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times
