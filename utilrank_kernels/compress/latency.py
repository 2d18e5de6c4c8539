"""Latency-aware plans (DESIGN §2): factor a layer only where that is faster on the target device at the
target batch, and round its rank up to a multiple the hardware tiles well where that costs nothing
measurable.

Every decision comes from a measurement: the dense layer (``F.linear`` / ``F.conv2d``) against its
factored form (``lowrank_linear`` / ``lowrank_conv2d``) at each candidate rank, on the layer's own input
shape at the target batch (captured with forward pre-hooks on a meta-device copy of the model: no
compute), with random weights of the model's dtype. The variants of one layer shape are timed
interleaved (one block of calls of each in turn, the median of 7 rounds), so that a machine shared with
other work slows them alike. Timings are kept in a per-device table,
``cache_dir()/latency/<device>.json``, keyed by shape, dtype, backend, threads, huge-page allocation
(``THP_MEM_ALLOC_ENABLE``) and torch version, and reused by later plans.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._files import cache_dir, write_json
from ..layers import factored_pays
from ..nn.lowrank import layer_shape
from ..ops import lowrank_conv2d, lowrank_linear
from ..timing import cpu_thp_alloc, device_label, step_times, time_interleaved
from .plan import LayerPlan, Plan

logger = logging.getLogger(__name__)

LATENCY_FORMAT = "utilrank.latency/1"
# rank multiples tried when rounding up: CPU GEMMs (AVX2/AVX-512 microkernels) tile by 8-16 floats, tensor
# cores by 16 (bf16 MMA k-step) to 128 (CTA tiles). On a 2-core EPYC (AVX2), fp32, M = 1576 tokens:
# 768x3072 factored at rank 307 ran at 111 GFLOP/s, at rank 304 at 148 GFLOP/s.
TILE_MULTIPLES = {"cpu": (8, 16, 32, 64), "cuda": (16, 32, 64, 128)}
MIN_GAIN = 0.03  # factored must be at least 3% faster than dense to be kept: below that is timing noise
ROUND_SLACK = 0.02  # a rounded-up rank may take at most 2% longer than the unrounded one ("not measurable")
MAX_ROUND_UP = 0.25  # and may add at most 25% to the rank (bounds what rounding costs in parameters)
ROUNDS = 7
BLOCK_SECONDS = 0.004  # each timed block repeats the call until it lasts about this long


# ---------------------------------------------------------------------------------------------
# input shapes
# ---------------------------------------------------------------------------------------------
def layer_input_shapes(model: nn.Module, names: Sequence[str], example: torch.Tensor,
                       batch: int) -> dict[str, tuple[int, ...]]:
    """The input shape of each named layer on a batch of ``batch`` inputs shaped like ``example[0]``.

    Runs a meta-device copy of the model (shapes only, no compute); a model that cannot run on the meta
    device is run for real, once, on the CPU."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the inputs go on unchanged
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    def capture(probe: nn.Module, x: torch.Tensor) -> None:
        modules = dict(probe.named_modules())
        hooks = [modules[n].register_forward_pre_hook(record(n)) for n in names if n in modules]
        try:
            with torch.inference_mode():
                probe.eval()(x)
        finally:
            for h in hooks:
                h.remove()

    sample_shape = tuple(example.shape[1:])
    try:
        capture(copy.deepcopy(model).to("meta"), torch.empty(batch, *sample_shape, device="meta"))
    except (NotImplementedError, RuntimeError):
        shapes.clear()
        cpu = copy.deepcopy(model).float().cpu()
        x = example.detach().float().cpu()
        capture(cpu, x[torch.arange(batch) % x.shape[0]])
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f"latency-aware plan: layers {', '.join(missing)} did not run on the example input")
    return shapes


# ---------------------------------------------------------------------------------------------
# the timing table
# ---------------------------------------------------------------------------------------------
def device_slug(device: torch.device) -> str:
    """The table's file name: ``cpu-AMD_EPYC`` or ``cuda-NVIDIA_H100_80GB_HBM3``."""

    name = device_label(device).split(" (")[0] if device.type == "cpu" else device_label(device)
    return f"{device.type}-" + re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


class LatencyTable:
    """Measured milliseconds per call, one JSON file per device, shared by every plan made on it."""

    def __init__(self, device: torch.device, path: str | Path | None = None):
        self.device = device
        self.path = Path(path) if path else cache_dir() / "latency" / f"{device_slug(device)}.json"
        self.entries: dict[str, dict] = self._read()
        self.measured = 0  # shape groups timed (not found in the table) by this instance

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data.get("entries", {}) if data.get("format") == LATENCY_FORMAT else {}

    def save(self) -> None:
        entries = {**self._read(), **self.entries}  # keep what other processes added meanwhile

        write_json(self.path, {"format": LATENCY_FORMAT, "device": device_label(self.device),
                               "entries": entries})

    def times(self, key: str, ranks: Sequence[int], measure: Callable[[Sequence[int]], dict]) -> dict:
        """``{"dense": ms, "ranks": {str(r): ms}}`` for the shape group ``key``, from the table when every
        rank is there; otherwise dense and all the group's ranks are timed again, together."""
        entry = self.entries.get(key)
        if entry is None or any(str(r) not in entry["ranks"] for r in ranks):
            old = [int(r) for r in entry["ranks"]] if entry else []
            entry = measure(sorted(set(ranks) | set(old)))
            entry["date"] = datetime.date.today().isoformat()
            self.entries[key] = entry
            self.measured += 1
        return entry


def time_variants(fns: dict[str, Callable[[], object]], device: torch.device, *, rounds: int = ROUNDS,
                  block_seconds: float = BLOCK_SECONDS) -> dict[str, float]:
    """Median milliseconds per call of each callable, timed interleaved in blocks of calls."""

    reps = {}
    for k, fn in fns.items():
        first = min(step_times(fn, warmup=2, iters=3, device=device))
        reps[k] = max(1, min(1000, math.ceil(block_seconds / max(first, 1e-7))))
    blocks = {k: (lambda fn=fn, n=reps[k]: [fn() for _ in range(n)]) for k, fn in fns.items()}
    times = time_interleaved(blocks, warmup=0, iters=rounds, device=device)
    return {k: 1e3 * statistics.median(v) / reps[k] for k, v in times.items()}


def _layer_fns(module: nn.Module, shape: tuple[int, ...], ranks: Sequence[int], device: torch.device,
               dtype: torch.dtype, backend: str) -> dict[str, Callable[[], object]]:
    """The dense call and a factored call per rank, on random tensors of the layer's shapes."""
    kw = {"device": device, "dtype": dtype}
    x = torch.randn(shape, **kw)
    w = torch.randn(module.weight.shape, **kw) / math.sqrt(module.weight[0].numel())
    bias = torch.randn(w.shape[0], **kw) if module.bias is not None else None
    n_in, n_out = w[0].numel(), w.shape[0]
    fns: dict[str, Callable[[], object]] = {}
    if isinstance(module, nn.Conv2d):
        geo = (module.stride, module.padding, module.dilation)
        fns["dense"] = lambda: F.conv2d(x, w, bias, *geo)
        for r in ranks:
            a = torch.randn(r, *w.shape[1:], **kw) / math.sqrt(n_in)
            b = torch.randn(n_out, r, 1, 1, **kw) / math.sqrt(r)
            fns[str(r)] = lambda a=a, b=b: lowrank_conv2d(x, a, b, bias, *geo, backend=backend)
    else:
        fns["dense"] = lambda: F.linear(x, w, bias)
        for r in ranks:
            a = torch.randn(r, n_in, **kw) / math.sqrt(n_in)
            b = torch.randn(n_out, r, **kw) / math.sqrt(r)
            fns[str(r)] = lambda a=a, b=b: lowrank_linear(x, a, b, bias, backend=backend)
    return fns


def _group_key(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, backend: str) -> str:
    geo = ""
    if isinstance(module, nn.Conv2d):
        pad = module.padding if isinstance(module.padding, str) else list(module.padding)
        geo = f"|s{list(module.stride)}p{pad}d{list(module.dilation)}"
    kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"

    host = f"threads{torch.get_num_threads()}|thp{int(cpu_thp_alloc())}"  # both change CPU timings
    return (f"{kind}|x{list(shape)}|w{list(module.weight.shape)}|bias{int(module.bias is not None)}{geo}|"
            f"{str(dtype).removeprefix('torch.')}|{backend}|{host}|torch{torch.__version__}")


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def round_up_candidates(rank: int, n_in: int, n_out: int, multiples: Sequence[int]) -> list[int]:
    """Ranks above ``rank`` that are multiples of a tile size, still save parameters, and add at most
    ``MAX_ROUND_UP`` to the rank."""
    limit = min(n_in, n_out, math.floor(rank * (1 + MAX_ROUND_UP)))
    ups = {math.ceil(rank / q) * q for q in multiples}
    return sorted(r for r in ups if rank < r <= limit and factored_pays(r, n_in, n_out))


def latency_aware(
    model: nn.Module,
    plan: Plan,
    example_input: torch.Tensor,
    target_device: str | torch.device,
    target_batch: int,
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    table: LatencyTable | None = None,
    min_gain: float = MIN_GAIN,
    progress: bool = False,
) -> Plan:
    """``plan`` made latency-aware for ``target_device`` at ``target_batch``: each factored layer is kept
    dense where its factored form is not at least ``min_gain`` faster than the dense layer there, and its
    rank is rounded up (never down) to a tile multiple where that costs no measurable time. Rounded ranks
    raise ``k_in``/``k_out`` to at least the new rank, so data-aware factors keep more of the data's
    subspaces, never less. Each changed entry says why in its ``reason``, and every factored entry records
    its ``latency``; a new plan is returned."""
    device = torch.device(target_device)
    if device.type not in TILE_MULTIPLES:
        raise ValueError(f"--target-device {target_device}: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--target-device cuda: no CUDA device is available to measure on")
    if target_batch < 1:
        raise ValueError(f"--target-batch {target_batch}: must be >= 1")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
    table = table or LatencyTable(device)
    layers, dense = dict(plan.layers), dict(plan.dense)
    modules = dict(model.named_modules())
    shapes = layer_input_shapes(model, list(layers), example_input, target_batch)
    for name in tqdm(list(layers), desc=f"latency ({device.type}, batch {target_batch})", unit="layer",
                     disable=not progress):
        entry, module = layers[name], modules[name]
        shape = layer_shape(module)
        ups = round_up_candidates(entry.rank, shape.in_features, shape.out_features, TILE_MULTIPLES[device.type])

        def measure(ranks, module=module, shape=shapes[name]):
            return _measure(module, shape, ranks, device, dtype, backend)

        times = table.times(_group_key(module, shapes[name], dtype, backend), [entry.rank, *ups], measure)
        entry, why_dense = _timed_entry(entry, ups, times, device.type, target_batch, min_gain)
        if why_dense is not None:
            dense[name] = why_dense
            del layers[name]
        else:
            layers[name] = entry
    if table.measured:
        table.save()
    rounded = sum("rounded up" in e.reason for e in layers.values())
    source = "measured into" if table.measured else "reused from"
    logger.info(f"latency-aware plan: {len(layers)} layers factored ({rounded} ranks rounded up), "
                f"{len(dense)} dense; timings {source} {table.path}")
    return plan.replace_layers(layers, dense, target={"device": device.type, "batch": target_batch})


def _timed_entry(entry: LayerPlan, ups: Sequence[int], times: dict, device_type: str, target_batch: int,
                 min_gain: float) -> tuple[LayerPlan, str | None]:
    """One layer's entry from its timings (``{"dense": ms, "ranks": {rank: ms}}``): at the largest tile
    multiple of ``ups`` that costs nothing measurable, with its ``latency``; or, with the reason, dense where
    factoring is not at least ``min_gain`` faster."""
    rank, where = entry.rank, f"on {device_type} at batch {target_batch}"
    t_dense, t = times["dense"], {int(r): ms for r, ms in times["ranks"].items()}
    # the largest tile multiple that costs nothing measurable over the unrounded rank
    best = max((r for r in ups if t[r] <= t[rank] * (1 + ROUND_SLACK)), default=rank)
    if t[best] > (1 - min_gain) * t_dense:
        best = rank  # rounding must never be what tips a layer back to dense
    if t[best] > (1 - min_gain) * t_dense:
        return entry, (f"latency: factored at rank {rank} takes {t[rank]:.4g} ms, dense {t_dense:.4g} ms "
                       f"{where} (kept factored only if <= {1 - min_gain:.2f}x dense)")
    if best != rank:
        multiple = max(q for q in TILE_MULTIPLES[device_type] if best % q == 0)
        entry = entry.with_rank(best, (f"{entry.reason}; " if entry.reason else "") + (
            f"rank rounded up {rank} -> {best} (multiple of {multiple}): {t[best]:.4g} ms vs "
            f"{t[rank]:.4g} ms {where}"))
    return replace(entry, latency={"device": device_type, "batch": target_batch,
                                   "dense_ms": round(t_dense, 5), "factored_ms": round(t[best], 5)}), None


def _measure(module: nn.Module, shape: tuple[int, ...], ranks: Sequence[int], device: torch.device,
             dtype: torch.dtype, backend: str) -> dict:
    fns = _layer_fns(module, shape, ranks, device, dtype, backend)
    with torch.inference_mode():
        ms = time_variants(fns, device)
    return {"dense": ms.pop("dense"), "ranks": ms}
