"""Autotune configurations as data.

Each kernel declares its candidates as a list of tuples; ``make_configs`` turns them into
``triton.Config`` objects. ``UTILRANK_TRITON_CONFIG=first`` (or running under ``TRITON_INTERPRET=1``)
keeps only the first candidate: one compile for the CPU interpreter and reproducible benchmarks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import triton


def single_config() -> bool:
    forced = os.environ.get("UTILRANK_TRITON_CONFIG", "") == "first"
    return forced or os.environ.get("TRITON_INTERPRET") == "1"


def make_configs(keys: Sequence[str], rows: Sequence[tuple], *, num_warps_index: int | None = None,
                 num_stages_index: int | None = None) -> list[triton.Config]:
    """``rows`` are tuples of meta-parameter values named by ``keys``; ``num_warps`` / ``num_stages``
    may be trailing columns (give their indices)."""
    configs = []
    for row in rows[:1] if single_config() else rows:
        special = (num_warps_index, num_stages_index)
        meta = {k: v for i, (k, v) in enumerate(zip(keys, row, strict=False)) if i not in special}
        kwargs = {}
        if num_warps_index is not None:
            kwargs["num_warps"] = row[num_warps_index]
        if num_stages_index is not None:
            kwargs["num_stages"] = row[num_stages_index]
        configs.append(triton.Config(meta, **kwargs))
    return configs
