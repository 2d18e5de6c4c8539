"""Timing: the one protocol (warm-up, interleaved rounds, a time budget), the one result type
(:class:`Timing`: median, p20, p80 in milliseconds) and what makes a timing comparable (the device's name and
slug, the versions, the CPU allocator settings). Benchmarks, ``utilrank bench``, the compress summary and the
latency-aware pass all time through here."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import env


@dataclass(frozen=True)
class Timing:
    """Milliseconds per step: the median and the 20th / 80th percentiles (the spread a ratio is read
    against: two timings differ measurably only where their p20-p80 ranges do not overlap)."""

    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        """The timing of per-step times given in seconds."""
        return cls(*quantiles_ms(seconds))

    def overlaps(self, other: Timing) -> bool:
        return self.p20 <= other.p80 and other.p20 <= self.p80

    def compared_to(self, baseline: Timing) -> str:
        """How this timing reads against ``baseline`` (both of one run, interleaved): ``speedup 1.38x`` or
        ``slower (0.80x)`` only where the p20-p80 ranges do not overlap, else ``no measurable difference``: the one
        wording of the compress summary and ``utilrank bench``."""
        if self.overlaps(baseline):
            return "no measurable difference"
        ratio = baseline.median / self.median
        return f"speedup {ratio:.2f}x" if ratio > 1 else f"slower ({ratio:.2f}x)"

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "p20": self.p20, "p80": self.p80}


def quantiles_ms(times: Sequence[float]) -> tuple[float, float, float]:
    """Median, p20 and p80 of ``times`` (seconds), in milliseconds."""
    q = statistics.quantiles(times, n=10) if len(times) > 1 else list(times) * 9
    return 1e3 * statistics.median(times), 1e3 * q[1], 1e3 * q[7]


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
def latency_ms(models: dict[str, nn.Module], example: torch.Tensor, *, warmup: int = 3, iters: int = 40,
               max_seconds: float = 6.0, progress: bool = False) -> dict[str, dict[str, float]]:
    """``{"median", "p20", "p80"}`` milliseconds of one forward pass of each model on ``example``, timed in
    alternation so that a machine whose speed drifts slows them alike (within a time budget, at least 5
    rounds)."""
    steps = {}
    for name, model in models.items():
        model.eval()
        steps[name] = lambda model=model: model(example)
    # a dict example (a model called through models.hf.KeywordInputs): its tensors' device
    device = example.device if isinstance(example, torch.Tensor) else next(iter(example.values())).device
    times = time_interleaved(steps, warmup=warmup, iters=iters, device=device, max_seconds=max_seconds,
                             progress="latency" if progress else None)
    return {name: Timing.of(ts).as_dict() for name, ts in times.items()}


def cpu_model_name() -> str:
    """``AMD EPYC``: the CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: str | torch.device = "cpu") -> str:
    """``NVIDIA H100 80GB HBM3`` on CUDA; on the CPU its model name and the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch_version": torch.__version__, "triton_version": triton_version}


def cpu_thp_alloc() -> bool:
    """Whether torch backs large CPU tensors with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, read by
    c10 at its first allocation, so it must be set before Python starts)."""
    return env.flag("THP_MEM_ALLOC_ENABLE")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (``mallopt``:
    no ``mmap`` for large blocks, no trimming), so that each step's large activations are not
    page-faulted in anew: the CPU analog of CUDA's caching allocator. Timed steps then measure
    compute, not the kernel's page-fault handler (ViT-B/16, batch 32, 2-core EPYC: 69,000 minor faults
    and about 1 s of system time per step before, none after). Returns whether it took effect (glibc
    only); the process keeps its peak memory until it exits."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


THP_HINT = ("hint: THP_MEM_ALLOC_ENABLE=1 (set before starting Python) backs large tensors with huge "
            "pages; without it every large activation is page-faulted in anew (ViT-B/16 at batch 32 on a "
            "2-core EPYC: GELU and bias copies took 1.6 s of a 6.5 s factored step, 0.3 s with it)")


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 10, iters: int = 40,
                     device: torch.device | None = None, max_seconds: float | None = None,
                     progress: str | None = None) -> dict[str, list[float]]:
    """Seconds per step of each callable: each warmed up ``warmup`` times, then ``iters`` rounds of one
    step of each in turn (order reversed every other round); ``max_seconds`` ends the rounds early
    (after at least 5); ``progress`` names a progress bar over the rounds."""
    from tqdm.auto import tqdm

    for fn in fns.values():
        step_times(fn, warmup=warmup, iters=0, device=device)
    names, times = list(fns), {k: [] for k in fns}
    with tqdm(total=iters, desc=progress, unit="round", disable=progress is None, leave=False) as bar:
        for i in range(iters):
            for k in names if i % 2 == 0 else reversed(names):
                times[k] += step_times(fns[k], warmup=0, iters=1, device=device)
            bar.update()
            if max_seconds is not None and i >= 4 and sum(map(sum, times.values())) > max_seconds:
                break
    return times


def device_slug(device: str | torch.device = "cpu") -> str:
    """``nvidia-h100-80gb-hbm3`` / ``cpu-intel-xeon-platinum-8488c-2t``: the device's name for result files
    (``<device>_<what>.json``)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{cpu_model_name()}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return f"{slug}-{torch.get_num_threads()}t" if device.type == "cpu" else slug
