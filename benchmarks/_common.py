"""What every benchmark row carries to be comparable (STYLE: device, versions, median, p20/p80)."""

from __future__ import annotations

import datetime
import statistics
import time

import torch

from utilrank_kernels.timing import cpu_model_name, versions


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def environment(device: str | torch.device = "cpu") -> dict:
    return {"device": device_name(device), **versions(), "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}


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
