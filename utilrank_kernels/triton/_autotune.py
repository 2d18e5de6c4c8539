"""Autotune tables as data, and the registry of every table.

Each kernel declares its candidates as a list of tuples; :func:`autotune` turns them into
``triton.Config`` objects, wraps the kernel in ``triton.autotune`` and registers the table under a name
(``TABLES``), so that the resource report (``benchmarks/tools/kernel_resources.py``) and the every-row
interpreter test (``tests/triton/test_autotune_rows.py``) reach every row of every table from one place.
``UTILRANK_TRITON_CONFIG=first`` (or running under ``TRITON_INTERPRET=1``) makes the autotuner keep only
the first row: one compile for the CPU interpreter and reproducible benchmarks. The registry always holds
all rows.

Shared memory: a row whose operand buffers do not fit the device's shared memory cannot launch. Every
table prunes per launch, with :func:`smem_fits`, the rows whose estimated footprint exceeds the current
device's opt-in limit (A100: 163 KiB, H100: 227 KiB); the report checks the estimate against the compiled
kernels on both targets.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import triton

from .. import env

# Per-block opt-in shared memory of the targets the kernels are built for (CUDA programming guide,
# "Technical Specifications per Compute Capability"): 8.0 -> 163 KiB, 9.0 -> 227 KiB.
SMEM_OPTIN_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_assumed_target: list[int] = []  # set by assume_target (the resource report compiles for a target, not a device)


def single_config() -> bool:
    return env.get("UTILRANK_TRITON_CONFIG", "") == "first" or env.flag("TRITON_INTERPRET")


@contextlib.contextmanager
def assume_target(capability: int) -> Iterator[None]:
    """Prune rows for ``capability`` (e.g. 80, 90) instead of the current device (the resource report)."""
    _assumed_target.append(capability)
    try:
        yield
    finally:
        _assumed_target.pop()


@functools.cache
def _device_smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0)  # torch >= 2.2
    if optin:
        return int(optin)
    return SMEM_OPTIN_BYTES.get(props.major * 10 + props.minor, 99 * 1024)


def smem_limit(t: torch.Tensor | None = None) -> int | None:
    """Shared memory one block may use on the device that runs the kernel, or None (no limit: the
    CPU interpreter)."""
    if _assumed_target:
        return SMEM_OPTIN_BYTES[_assumed_target[-1]]
    if t is not None and t.is_cuda:
        return _device_smem_limit(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return None


def smem_fits(configs: Sequence[triton.Config], footprint: Callable[[triton.Config], int],
              t: torch.Tensor | None) -> list[triton.Config]:
    """The configs whose estimated shared-memory ``footprint`` (bytes) fits the device of ``t``; the
    smallest one if none does (the autotuner needs one, and the launch then says what is wrong)."""
    limit = smem_limit(t)
    if limit is None:
        return list(configs)
    fits = [c for c in configs if footprint(c) <= limit]
    return fits or [min(configs, key=footprint)]


# An SM count for the CPU interpreter, so that split paths are exercised there too.
_INTERPRETER_SMS = 4


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a stand-in count for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass
class Table:
    """One autotune table: its name, the ``@triton.jit`` kernel, every row as a ``triton.Config`` (whatever
    ``single_config`` says) and the autotuner the launcher calls."""

    name: str
    kernel: triton.runtime.JITFunction
    configs: list[triton.Config]
    tuner: triton.runtime.Autotuner


TABLES: dict[str, Table] = {}


def make_configs(keys: Sequence[str], rows: Sequence[tuple]) -> list[triton.Config]:
    """``rows`` are tuples of meta-parameter values named by ``keys``; ``num_warps`` and ``num_stages``,
    where named, become the config's own fields."""
    configs = []
    for row in rows:
        meta = dict(zip(keys, row, strict=True))
        kwargs = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
        configs.append(triton.Config(meta, **kwargs))
    return configs


def autotune(name: str, kernel, keys: Sequence[str], rows: Sequence[tuple], *, key: Sequence[str],
             **kwargs) -> triton.runtime.Autotuner:
    """``triton.autotune`` over ``rows`` (all of them, or the first under :func:`single_config`),
    registered in ``TABLES`` as ``name``; ``kwargs`` go to ``triton.autotune`` (``prune_configs_by``,
    ``reset_to_zero``, ``restore_value``)."""
    if name in TABLES:
        raise ValueError(f"autotune table {name!r} is declared twice")
    configs = make_configs(keys, rows)
    tuner = triton.autotune(configs=configs[:1] if single_config() else configs, key=list(key), **kwargs)(kernel)
    TABLES[name] = Table(name, kernel, configs, tuner)
    return tuner
