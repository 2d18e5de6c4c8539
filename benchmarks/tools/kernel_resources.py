"""Kernel resource report: every Triton kernel x every autotune row x fp16/bf16/fp32 x sm_80/sm_90, compiled
on the CPU (no GPU needed), and the CUDA extension's cubins.

    python benchmarks/run.py kernel-resources      # full sweep: results/sm80-sm90_kernel-resources-triton<V>.{json,md}
    python benchmarks/run.py kernel-resources --rows first --check --out-dir /tmp/kr      # what CI runs

How: the package's own launchers are called on CPU tensors of real shapes (ViT-B/16, ViT-L/16 and ResNet-50
layers at batch 1 and 64: statistics pass and factored forward) with ``Autotuner.run`` replaced by a recorder,
so each recorded launch carries the arguments exactly as the JIT sees them. Each launch is then specialized by
Triton's own binder for the target (unit strides become constexprs, 16-divisible ints and pointers get
``tt.divisibility``) and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))``
for every row of its table. The cubin is read with the ``cuobjdump`` bundled in ``triton/backends/nvidia/bin``:
registers, stack (spills), shared memory (static + Triton's dynamic), theoretical occupancy, and from the
SASS: tensor-core instructions (HMMA, HGMMA = wgmma), async copies (LDGSTS = cp.async, UTMALDG/UBLKCP =
TMA/cp.async.bulk), local-memory traffic (LDL/STL) and how much of it sits inside a loop (loops found by
backward branches). The main loops: nvdisasm's line info (Triton builds with ``-lineinfo``) maps each SASS
loop to the kernel's ``for`` loop, whose trip count is evaluated from the launch's shapes and the row's
constexprs; per loop, its SASS instructions and tensor-core instructions (HMMA/HGMMA) per iteration, and per
launch the main loops' instructions per warp per output tile. Compiles go to a Triton cache and results to a
result cache (``--cache-dir``), so a rerun recompiles only what changed.

``--before OLD.json`` (a report of the tree before a kernel change) adds a before/after section for the
representative launches (``BEFORE_AFTER_LAUNCHES``) and keeps its before side in the new JSON;
``--keep-before`` (what ``make kernel-resources`` passes) carries that section over from the report it replaces.

``--check`` fails (exit 1, one line per problem) where, on any target and dtype: a row the launcher can
select does not fit the target's shared memory or moves local memory inside a loop; a first row (what
``UTILRANK_TRITON_CONFIG=first`` runs) does not compile, does not fit, or moves local memory inside a loop; a
16-bit compile has no tensor-core instruction; the CUDA extension's cubins spill. (Under ``--rows first`` only
the first rows are compiled, so the selectable rows' checks need the full run, ``make kernel-resources``.)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import math
import operator
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.tools.rows import RESULTS

ROOT = Path(__file__).resolve().parents[2]

TARGETS = (80, 90)
REPORT_VERSION = 2  # part of every result's cache key: bump when the cubin analysis changes
DTYPES = ("fp16", "bf16", "fp32")
# Per-SM limits for the occupancy estimate (CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability"; identical for 8.0 and 9.0 except shared memory).
SM_LIMITS = {
    80: {"smem_per_sm": 164 * 1024, "smem_per_block": 163 * 1024},
    90: {"smem_per_sm": 228 * 1024, "smem_per_block": 227 * 1024},
}
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1024  # the runtime reserves 1 KiB of shared memory per block (sm_80+)


# ---------------------------------------------------------------------------------------------
# shapes: what the package launches for three real models
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Linear:
    name: str
    n_in: int
    n_out: int
    tokens: int  # rows per image


@dataclass(frozen=True)
class Conv:
    name: str
    c_in: int
    c_out: int
    k: int
    stride: int
    pad: int
    size: int  # input height = width


def vit_layers(width: int, patch: int = 16, image: int = 224) -> tuple[list, list]:
    tokens = (image // patch) ** 2 + 1
    linears = [Linear("qkv", width, 3 * width, tokens), Linear("proj", width, width, tokens),
               Linear("fc1", width, 4 * width, tokens), Linear("fc2", 4 * width, width, tokens),
               Linear("head", width, 1000, 1)]
    return linears, [Conv("patch_embed", 3, width, patch, patch, 0, image)]


def resnet50_layers() -> tuple[list, list]:
    convs = [Conv("stem", 3, 64, 7, 2, 3, 224)]
    size, c_in = 56, 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 1 else 1
            name = f"layer{stage}.{block}"
            convs += [Conv(f"{name}.conv1", c_in, width, 1, 1, 0, size),
                      Conv(f"{name}.conv2", width, width, 3, stride, 1, size)]
            if block == 0:
                convs.append(Conv(f"{name}.downsample", c_in, 4 * width, 1, stride, 0, size))
            size //= stride
            convs.append(Conv(f"{name}.conv3", width, 4 * width, 1, 1, 0, size))
            c_in = 4 * width
    return [Linear("fc", 2048, 1000, 1)], convs


MODELS = {"vit_b16": lambda: vit_layers(768), "vit_l16": lambda: vit_layers(1024), "resnet50": resnet50_layers}
BATCHES = (1, 64)
MLP_RANKS = (48, 96, 192)


def half_params_rank(n_in: int, n_out: int, multiple: int = 16) -> int:
    """The rank keeping half a layer's parameters, rounded down to ``multiple`` (``utilrank bench``'s rule)."""
    return max(multiple, int(0.5 * n_in * n_out / (n_in + n_out)) // multiple * multiple)


def model_calls(model: str, dtype, batches=BATCHES) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(label, call)`` for every kernel launch the statistics pass and the factored forward make on
    ``model``: the launchers, on uninitialized CPU tensors of the real shapes."""
    import torch

    from utilrank_kernels.triton.covariance import conv_covariance_update_triton, covariance_update_triton
    from utilrank_kernels.triton.lowrank_conv2d import lowrank_conv2d_triton
    from utilrank_kernels.triton.lowrank_linear import lowrank_linear_triton
    from utilrank_kernels.triton.lowrank_mlp import lowrank_mlp_triton

    linears, convs = MODELS[model]()
    by_name = {lin.name: lin for lin in linears}
    # the statistics pass's covariance updates write the upper triangle only, where the launchers offer it
    cov_kw = {"upper": True} if "upper" in inspect.signature(covariance_update_triton).parameters else {}
    conv_kw = {"upper": True} if "upper" in inspect.signature(conv_covariance_update_triton).parameters else {}

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    for batch in batches:
        for lin in linears:
            lead = (batch, lin.tokens) if lin.tokens > 1 else (batch,)
            r = half_params_rank(lin.n_in, lin.n_out)
            x = empty(*lead, lin.n_in)
            acc = empty(lin.n_in, lin.n_in, dt=torch.float64)
            yield (f"{model} b{batch} {lin.name} covariance",
                   lambda x=x, acc=acc: covariance_update_triton(acc, x, None, **cov_kw))
            # fc1 / fc2: also as the fused MLP below; as linears (what runs where the fused MLP is not
            # offered) at half the parameters and at the MLP's rank 192, fc1 with its GELU
            act = "gelu" if lin.name == "fc1" else None
            for rank in (r, 192) if lin.name in ("fc1", "fc2") else (r,):
                a, b, bias = empty(rank, lin.n_in), empty(lin.n_out, rank), empty(lin.n_out)
                yield (f"{model} b{batch} {lin.name} r{rank} lowrank_linear",
                       lambda x=x, a=a, b=b, bias=bias, act=act: lowrank_linear_triton(x, a, b, bias, act))
        if "fc1" in by_name:
            fc1, fc2 = by_name["fc1"], by_name["fc2"]
            x = empty(batch, fc1.tokens, fc1.n_in)
            # the fused MLP's tables are by rank width: half the parameters, and cuts of 48, 96 and 192
            for r in (half_params_rank(fc1.n_in, fc1.n_out), *MLP_RANKS):
                p = (empty(r, fc1.n_in), empty(fc1.n_out, r), empty(fc1.n_out), empty(r, fc2.n_in),
                     empty(fc2.n_out, r), empty(fc2.n_out))
                yield (f"{model} b{batch} mlp r{r} lowrank_mlp", lambda x=x, p=p: lowrank_mlp_triton(x, *p, "gelu"))
        seen = set()
        for conv in convs:
            geometry = (conv.c_in, conv.c_out, conv.k, conv.stride, conv.pad, conv.size)
            if geometry in seen:
                continue
            seen.add(geometry)
            d = conv.c_in * conv.k * conv.k
            r = half_params_rank(d, conv.c_out)
            for channels_last in (False, True) if model == "resnet50" else (False,):
                x = empty(batch, conv.c_in, conv.size, conv.size)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                tag = f"{model} b{batch} {conv.name}{' cl' if channels_last else ''}"
                acc = empty(d, d, dt=torch.float64)
                yield (f"{tag} conv covariance", lambda x=x, acc=acc, c=conv: conv_covariance_update_triton(
                    acc, x, (c.k, c.k), (c.stride, c.stride), (c.pad, c.pad), (1, 1), **conv_kw))
                if not channels_last:
                    a, b = empty(r, conv.c_in, conv.k, conv.k), empty(conv.c_out, r, 1, 1)
                    yield (f"{tag} r{r} lowrank_conv2d", lambda x=x, a=a, b=b, c=conv: lowrank_conv2d_triton(
                        x, a, b, empty(c.c_out), (c.stride, c.stride), (c.pad, c.pad), (1, 1)))


# ---------------------------------------------------------------------------------------------
# recording launches
# ---------------------------------------------------------------------------------------------
@dataclass
class Launch:
    table: str
    label: str
    dtype: str
    args: tuple
    kwargs: dict
    grid: object = None  # the launch grid: a tuple, or a function of the arguments and the config


@dataclass
class Recorder:
    """The launches recorded so far, and the label and dtype the next ones are recorded under."""

    launches: list[Launch] = field(default_factory=list)
    label: str = ""
    dtype: str = ""


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """Within the block, calls of any registered autotuned kernel are recorded instead of run; the first
    conv of ``lowrank_conv2d`` (cuDNN's) returns an uninitialized tensor of its output's shape and layout."""
    import torch
    import torch.nn.functional as F
    from triton.runtime.autotuner import Autotuner

    from utilrank_kernels.triton import _autotune, covariance, lowrank_conv2d, lowrank_linear, lowrank_mlp  # noqa: F401

    tables = {id(t.tuner): t.name for t in _autotune.TABLES.values()}
    rec = Recorder()
    real_run, real_conv2d = Autotuner.run, F.conv2d
    # a launcher that sizes its grid by the SM count sees the GPU's, not the interpreter's stand-in
    kernel_modules = [m for m in (_autotune, covariance, lowrank_conv2d, lowrank_linear, lowrank_mlp)
                      if hasattr(m, "sm_count")]
    real_sm_count = [m.sm_count for m in kernel_modules]

    def record(self, *args, **kwargs):
        grid = kwargs.get("grid")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        rec.launches.append(Launch(tables[id(self)], rec.label, rec.dtype, args, kwargs, grid))

    def conv2d_shape_only(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
        out = real_conv2d(x.to("meta"), w.to("meta"), None, stride, padding, dilation, groups)
        return torch.empty_strided(out.shape, out.stride(), dtype=x.dtype)

    Autotuner.run, F.conv2d = record, conv2d_shape_only
    for m in kernel_modules:
        m.sm_count = lambda device: RECORD_SMS
    try:
        yield rec
    finally:
        Autotuner.run, F.conv2d = real_run, real_conv2d
        for m, real in zip(kernel_modules, real_sm_count, strict=True):
            m.sm_count = real


RECORD_SMS = 132  # H100 SXM / H200 (the GPU the kernels are tuned for): what sm_count returns while recording
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def record_model_launches(models, dtypes) -> list[Launch]:
    import torch

    with recording() as rec:
        for model in models:
            for dtype in dtypes:
                for label, call in model_calls(model, getattr(torch, TORCH_DTYPES[dtype])):
                    rec.label, rec.dtype = label, dtype
                    call()
    return rec.launches


# ---------------------------------------------------------------------------------------------
# compiling: the JIT's own specialization, for a target instead of the current device
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    key: str
    table: str
    row: int
    config: str
    target: int
    dtype: str
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    labels: list[str] = field(default_factory=list)
    shapes: list[dict] = field(default_factory=list)  # per label: the launch's scalar arguments and grid
    selectable_for: list[bool] = field(default_factory=list)  # per label: the launcher's prune keeps the row
    launch_ids: list[int] = field(default_factory=list)  # per label: the launch's index in the recording
    selectable: bool = False


def make_jobs(launches: list[Launch], targets, rows: str, representative: bool = False) -> list[Job]:
    """One job per distinct (table row, target, specialization); the launches it serves in ``labels``.
    ``representative``: one job per distinct signature and constexprs, whatever the integer and pointer
    divisibility attributes (the CI subset: those change vectorization, rarely the register budget)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from utilrank_kernels.triton import _autotune

    jobs: dict[str, Job] = {}
    binders = {}
    for n, launch in enumerate(launches):
        table = _autotune.TABLES[launch.table]
        fn = table.kernel
        for cc in targets:
            target = GPUTarget("cuda", cc, 32)
            if (id(fn), cc) not in binders:
                backend = make_backend(target)
                binders[id(fn), cc] = backend, create_function_from_signature(fn.signature, fn.params, backend)
            backend, binder = binders[id(fn), cc]
            tuner = table.tuner
            tuner.nargs = dict(zip(tuner.arg_names, launch.args, strict=False))
            with _autotune.assume_target(cc):
                pruned = tuner.early_config_prune(table.configs, tuner.nargs, **launch.kwargs) \
                    if tuner.early_config_prune else table.configs
            tuner.nargs = None
            selectable = {_config_str(c) for c in pruned}
            configs = table.configs[:1] if rows == "first" else table.configs
            for i, config in enumerate(configs):
                kw = {**launch.kwargs, **config.all_kwargs(), "debug": False}
                bound, spec, opts = binder(*launch.args, **kw)
                options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
                # keyed by the config, not its row index: reordering a table reuses its results
                blob = json.dumps([REPORT_VERSION, launch.table, _config_str(config), cc, fn.cache_key, signature,
                                   sorted(map(str, constexprs.items())), sorted(map(str, attrs.items())),
                                   sorted(map(str, options.__dict__.items()))])
                group = json.dumps([launch.table, _config_str(config), cc, signature,
                                    sorted(map(str, constexprs.items()))]) \
                    if representative else blob
                key = hashlib.sha256(blob.encode()).hexdigest()[:24]
                job = jobs.get(group)
                if job is None:
                    job = jobs[group] = Job(key, launch.table, i, _config_str(config), cc, launch.dtype,
                                          fn.fn.__module__, fn.fn.__qualname__, signature, constexprs, attrs,
                                          dict(options.__dict__))
                job.labels.append(launch.label)
                job.launch_ids.append(n)
                job.shapes.append(_scalars(fn.arg_names, launch, config))
                job.selectable_for.append(_config_str(config) in selectable)
                job.selectable = job.selectable or _config_str(config) in selectable
    return list(jobs.values())


def _scalars(arg_names, launch: Launch, config) -> dict:
    """The launch's integer arguments by name, and its grid for ``config`` (under ``"grid"``)."""
    named = {**dict(zip(arg_names, launch.args, strict=False)), **launch.kwargs}
    out = {k: v for k, v in named.items() if isinstance(v, int) and not isinstance(v, bool)}
    grid = launch.grid
    if callable(grid):
        try:
            grid = grid({**named, **config.all_kwargs()})
        except Exception:  # a grid the recorder cannot evaluate: loops using num_programs stay unknown
            grid = None
    if isinstance(grid, tuple | list):
        out["grid"] = [int(g) for g in grid]
    return out


def _config_str(config) -> str:
    meta = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta} warps={config.num_warps} stages={config.num_stages}"


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def compile_job(job: Job, cache_dir: str) -> dict:
    """Compile one job and read its cubin; the result is cached under ``cache_dir`` by the job's key."""
    cached = Path(cache_dir) / "results" / f"{job.key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    target = GPUTarget("cuda", job.target, 32)
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs), target=target,
                                options=job.options)
    except Exception as exc:  # a row that does not compile is a finding, not a crash of the report
        result = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            result = {"status": "ok", **analyze_cubin(cubin, line_info=True)[0]}
        file, first, _, _ = kernel_ast(job.module, job.kernel)
        relative_lines(result["loop_bodies"], file, first)
        result["smem_dynamic"] = int(kernel.metadata.shared)
    result["compile_s"] = round(time.perf_counter() - start, 2)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(result))
    tmp_path.rename(cached)
    return result


# ---------------------------------------------------------------------------------------------
# reading cubins
# ---------------------------------------------------------------------------------------------
_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"arch = (sm_\d+a?)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"Function : (\S+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_LINE_INFO = re.compile(r'"([^"]+)", line (\d+)')
OPCODE_GROUPS = {
    "hmma": ("HMMA",), "hgmma": ("HGMMA",), "ldgsts": ("LDGSTS",), "tma": ("UTMALDG", "UBLKCP", "UTMASTG"),
    "ffma": ("FFMA",), "ldl": ("LDL",), "stl": ("STL",),
}


def sass_instructions(text: str) -> list[tuple[int, str, str, tuple[str, int] | None]]:
    """``(address, opcode, operands, source)`` per SASS instruction of cuobjdump's or nvdisasm's listing.
    Branch targets written as labels (nvdisasm's ``` `(.L_x_3) ```) become addresses; ``source`` is the
    ``(file, line)`` of nvdisasm's line info (``-g``/``-gi``: for inlined code, the outermost call site),
    else None."""
    instrs, labels, pending, source = [], {}, [], None
    for raw in text.splitlines():
        if raw.lstrip().startswith("//## File"):
            found = _LINE_INFO.findall(raw)
            source = (found[-1][0], int(found[-1][1])) if found else None
            continue
        label = _LABEL.match(raw)
        if label:
            pending.append(label.group(1))
            continue
        m = _SASS_LINE.search(raw)
        if not m:
            continue
        addr = int(m.group(1), 16)
        labels.update(dict.fromkeys(pending, addr))
        pending = []
        tokens = m.group(2).split()
        if tokens and tokens[0].startswith("@"):
            tokens = tokens[1:]
        if tokens:
            instrs.append((addr, tokens[0], " ".join(tokens[1:]), source))
    out = []
    for addr, op, operands, src in instrs:
        if op.split(".")[0] == "BRA":
            operands = re.sub(r"`\((\.L_x_\d+)\)", lambda m: hex(labels.get(m.group(1), -1)), operands)
        out.append((addr, op, operands, src))
    return out


def sass_loops(instrs) -> list[tuple[int, int]]:
    """Loops as address ranges ``(first, last)``: a backward branch to ``first`` at ``last`` (several
    back edges to one target: the last of them). A branch to itself (the trap after the final EXIT) is
    not a loop."""
    ends: dict[int, int] = {}
    for addr, op, operands, _ in instrs:
        if op.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and 0 <= int(target.group(1), 16) < addr:
                lo = int(target.group(1), 16)
                ends[lo] = max(ends.get(lo, addr), addr)
    return sorted(ends.items())


def parse_sass(text: str) -> dict:
    """Counts of the opcode groups in one function's SASS, local-memory instructions inside loops, the
    number of loops, and per loop (``loop_bodies``, by address): its parent (the innermost loop holding
    it), its instructions in all and its own (those of no nested loop: one iteration's work besides the
    inner loops'), its own HMMA/HGMMA, and its own instructions' source lines (with nvdisasm's line info)."""
    instrs = sass_instructions(text)
    loops = sass_loops(instrs)
    counts = dict.fromkeys(OPCODE_GROUPS, 0)
    local_in_loop = 0
    bodies = []
    for i, (lo, hi) in enumerate(loops):
        holders = [j for j, (lo2, hi2) in enumerate(loops) if j != i and lo2 <= lo and hi <= hi2
                   and (lo2, hi2) != (lo, hi)]
        parent = min(holders, key=lambda j: loops[j][1] - loops[j][0]) if holders else None
        bodies.append({"first": lo, "last": hi, "parent": parent, "instructions": 0, "own": 0, "hmma": 0,
                       "hgmma": 0, "lines": {}})
    for addr, op, _, src in instrs:
        base = op.split(".")[0]
        for group, names in OPCODE_GROUPS.items():
            if base in names:
                counts[group] += 1
        inside = [i for i, (lo, hi) in enumerate(loops) if lo <= addr <= hi]
        if base in ("LDL", "STL") and inside:
            local_in_loop += 1
        for i in inside:
            bodies[i]["instructions"] += 1
        if inside:
            body = bodies[min(inside, key=lambda i: loops[i][1] - loops[i][0])]
            body["own"] += 1
            body["hmma"] += base == "HMMA"
            body["hgmma"] += base == "HGMMA"
            if src:
                key = f"{src[0]}:{src[1]}"
                body["lines"][key] = body["lines"].get(key, 0) + 1
    return {**counts, "local_in_loop": local_in_loop, "loops": len(loops), "loop_bodies": bodies}


def analyze_cubin(path: Path, line_info: bool = False) -> list[dict]:
    """Per function of a cubin (or a host binary embedding cubins): name, arch, registers, stack bytes,
    static shared memory and the SASS counts of :func:`parse_sass`. ``line_info``: a one-kernel cubin (a
    Triton compile, built with ``-lineinfo``), its SASS read with nvdisasm's source lines."""
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout
    resources = {}
    arch = None
    for block in re.split(r"\n(?=Fatbin |\s*arch = )", usage):
        a = _ARCH.search(block)
        arch = a.group(1) if a else arch
        for m in _RESOURCE.finditer(block):
            resources[(arch, m.group(1))] = {"regs": int(m.group(2)), "stack": int(m.group(3)),
                                             "smem_static": int(m.group(4)), "local": int(m.group(5))}
    functions = []
    arch = None
    for chunk in re.split(r"\n(?=\s*(?:arch = |Function : ))", sass):
        a = _ARCH.search(chunk)
        if a and "Function :" not in chunk:
            arch = a.group(1)
            continue
        f = _FUNCTION.search(chunk)
        if not f:
            continue
        key = (arch, f.group(1)) if (arch, f.group(1)) in resources else next(
            (k for k in resources if k[1] == f.group(1)), None)
        functions.append({"function": f.group(1), "arch": arch, **resources.get(key, {}), **parse_sass(chunk)})
    if line_info and len(functions) == 1:
        listing = subprocess.run([_tool("nvdisasm"), "-gi", "-c", str(path)], capture_output=True, text=True,
                                 check=True).stdout
        functions[0].update(parse_sass(listing))
    return functions


# ---------------------------------------------------------------------------------------------
# main loops: SASS loops mapped to the kernel's source loops, trip counts from the launch's shapes
# ---------------------------------------------------------------------------------------------
class _Unknown(Exception):
    """A value the launch's scalars and the config's constexprs do not determine."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_RANGES = ("range", "static_range")  # range(...), tl.range(...), tl.static_range(...)
_OUTPUT_WRITES = ("store", "atomic_add")


def _call_name(node) -> str | None:
    if isinstance(node, ast.Call):
        return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    return None


def _eval(node, env: dict, grid, helpers: dict | None = None) -> int | float | tuple:
    """An integer expression of the kernel's source from known scalars: names, + - * // %, ``tl.cdiv``,
    ``tl.minimum``/``tl.maximum``, ``tl.program_id`` (0: the first program), ``tl.num_programs`` (the
    launch grid) and calls of the module's ``@triton.jit`` helpers (``helpers``: their definitions, run on
    the known arguments); anything else is unknown."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.Name) and env.get(node.id) is not None:
        return env[node.id]
    if isinstance(node, ast.Tuple):
        return tuple(_eval(e, env, grid, helpers) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, env, grid, helpers)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        try:
            return _BINOPS[type(node.op)](_eval(node.left, env, grid, helpers), _eval(node.right, env, grid, helpers))
        except ZeroDivisionError as exc:
            raise _Unknown from exc
    name = _call_name(node)
    if name == "program_id":
        return 0
    if helpers and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and name in helpers:
        return _call_helper(helpers[name], node, env, grid, helpers)
    args = [_eval(a, env, grid, helpers) for a in node.args] if name else []
    if name == "num_programs" and grid is not None:
        return grid[args[0]] if args[0] < len(grid) else 1
    if name == "cdiv" and args[1]:
        return -(-args[0] // args[1])
    if name in ("minimum", "min"):
        return min(args)
    if name in ("maximum", "max"):
        return max(args)
    raise _Unknown


def _call_helper(fdef: ast.FunctionDef, call: ast.Call, env: dict, grid, helpers: dict):
    """The value a helper returns from the call's known arguments (its assignments followed in order)."""
    def arg(a):
        try:
            return _eval(a, env, grid, helpers)
        except (_Unknown, TypeError, IndexError):
            return None

    local = dict.fromkeys((a.arg for a in fdef.args.args), None)
    local.update(zip(local, map(arg, call.args), strict=False))
    local.update({k.arg: arg(k.value) for k in call.keywords if k.arg})
    for st in fdef.body:
        if _assign(st, local, grid, helpers):
            continue
        if isinstance(st, ast.Return) and st.value is not None:
            return _eval(st.value, local, grid, helpers)
    raise _Unknown


def _assign(st: ast.stmt, env: dict, grid, helpers) -> bool:
    """Follow an assignment into ``env`` (an unknown value, or an augmented one, binds None); False if ``st``
    assigns nothing."""
    if isinstance(st, ast.Assign):
        try:
            value = _eval(st.value, env, grid, helpers)
        except (_Unknown, TypeError, IndexError):
            value = None
        for target in st.targets:
            _bind(target, value, env)
    elif isinstance(st, ast.AnnAssign | ast.AugAssign):
        _bind(st.target, None, env)
    else:
        return False
    return True


def _bind(target, value, env: dict) -> None:
    if isinstance(target, ast.Name):
        env[target.id] = value
    elif isinstance(target, ast.Tuple):
        values = value if isinstance(value, tuple) and len(value) == len(target.elts) else [None] * len(target.elts)
        for t, v in zip(target.elts, values, strict=True):
            _bind(t, v, env)


def source_loops(fdef: ast.FunctionDef, env: dict, grid=None, helpers: dict | None = None
                 ) -> tuple[list[dict], int | None]:
    """The kernel's ``for ... in range(...)`` loops in source order (``line``/``end``: the loop's lines,
    relative to the function's source; ``parent``: the enclosing loop's index), each with its trip count
    in the first program (``None`` where the scalars in ``env`` do not determine it: assignments before the
    loop are followed, a loop variable takes its first value), and the index of the loop that holds the
    output write (the source's last ``tl.store``/``tl.atomic_add``; None: outside every loop)."""
    env = dict(env)
    loops: list[dict] = []

    def walk(stmts, parent):
        for st in stmts:
            if _assign(st, env, grid, helpers):
                continue
            if isinstance(st, ast.For) and _call_name(st.iter) in _RANGES:
                try:
                    r = range(*(_eval(a, env, grid, helpers) for a in st.iter.args[:3]))
                    trips, first = len(r), (r.start if len(r) else None)
                except (_Unknown, TypeError, ValueError, IndexError):
                    trips, first = None, None
                loops.append({"line": st.lineno, "end": st.end_lineno, "var": ast.unparse(st.target),
                              "range": ast.unparse(st.iter), "parent": parent, "trips": trips})
                _bind(st.target, first, env)
                walk(st.body, len(loops) - 1)
                _bind(st.target, None, env)
            elif isinstance(st, ast.If | ast.With | ast.For | ast.While):
                walk(st.body, parent)
                walk(getattr(st, "orelse", []), parent)

    walk(fdef.body, None)
    # the write's loop: the innermost loop holding the source's last write
    last = max((n.lineno for n in ast.walk(fdef) if _call_name(n) in _OUTPUT_WRITES), default=None)
    inside = [i for i, lo in enumerate(loops) if last is not None and lo["line"] <= last <= lo["end"]]
    holder = max(inside, key=lambda i: loops[i]["line"]) if inside else None
    return loops, holder


MAP_SHARE = 0.9


def map_loops(bodies: list[dict], loops: list[dict]) -> list[int | None]:
    """The source loop of each SASS loop: among the source loops inside (or equal to) the one its SASS
    parent maps to, the deepest that holds at least ``MAP_SHARE`` of the most lines any of them holds
    (an outer loop holds its inner loops' lines too, and a software-pipelined inner loop carries a few
    instructions of its outer loop's lines). A SASS loop mapped to its parent's source loop repeats inside
    one iteration (a wait, a second copy)."""
    def depth(i):
        return 0 if loops[i]["parent"] is None else 1 + depth(loops[i]["parent"])

    def under(i, top):
        while i is not None:
            if i == top:
                return True
            i = loops[i]["parent"]
        return False

    mapped: list[int | None] = [None] * len(bodies)
    for b in sorted(range(len(bodies)), key=lambda b: bodies[b]["first"] - bodies[b]["last"]):  # outer first
        parent = bodies[b]["parent"]
        top = mapped[parent] if parent is not None else None
        candidates = [i for i in range(len(loops)) if top is None or under(i, top)]
        votes = {i: sum(n for line, n in bodies[b]["lines"].items()
                        if loops[i]["line"] <= int(line) <= loops[i]["end"]) for i in candidates}
        most = max(votes.values(), default=0)
        best = max((i for i in votes if votes[i] >= MAP_SHARE * most), key=depth, default=None)
        mapped[b] = best if most else None
    return mapped


def main_loops(bodies: list[dict], loops: list[dict], holder: int | None) -> dict:
    """Per SASS loop: source loop, own instructions and MMA per iteration, iterations per program; and the
    instructions of all loops per program and per output tile (per warp: each warp issues the whole stream).
    A SASS loop that repeats within its parent's iteration counts once per parent iteration; of two
    disjoint SASS loops of one source loop (versions of it), the larger counts."""
    mapped = map_loops(bodies, loops)

    def iterations(i):  # of source loop i per program
        n = 1
        while i is not None:
            if loops[i]["trips"] is None:
                return None
            n *= loops[i]["trips"]
            i = loops[i]["parent"]
        return n

    rows, total = [], 0
    for b, body in enumerate(bodies):
        src, parent = mapped[b], body["parent"]
        repeat = parent is not None and mapped[parent] == src
        # versions of one source loop (disjoint SASS loops): only the largest (the first of equals) counts
        versions = [c for c in range(len(bodies)) if src is not None and mapped[c] == src
                    and not (bodies[c]["parent"] is not None and mapped[bodies[c]["parent"]] == src)]
        counted = repeat or src is None or b == max(versions, key=lambda c: (bodies[c]["instructions"], -c))
        its = None if src is None else iterations(src)  # a repeat: once per iteration of its parent's loop
        rows.append({"source": None if src is None else f"{loops[src]['var']} in {loops[src]['range']}",
                     "line": None if src is None else loops[src]["line"], "instructions": body["own"],
                     "hmma": body["hmma"], "hgmma": body["hgmma"], "iterations": its,
                     "repeat": repeat, "counted": counted})
        if counted:
            total = None if total is None or its is None else total + body["own"] * its
    tiles = iterations(holder) if holder is not None else 1
    per_tile = total / tiles if total is not None and tiles else None
    return {"loops": rows, "loop_instructions": total, "tiles": tiles, "instructions_per_tile": per_tile}


def _jit_source(fn) -> tuple[list[str], int]:
    # the source Triton read at import (what it compiles), not the file now: it may have been edited since
    lines, first = getattr(fn, "raw_src", None), getattr(fn, "starting_line_number", None)
    if lines is None or first is None:
        lines, first = inspect.getsourcelines(fn.fn)
    return lines, first


@functools.cache
def kernel_ast(module: str, qualname: str) -> tuple[str, int, ast.FunctionDef, dict]:
    """The Triton kernel's source file, its first line (the decorator's), its function definition, and the
    definitions of its module's ``@triton.jit`` functions by name (the helpers it may call)."""
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module)
    fn = getattr(mod, qualname)
    lines, first = _jit_source(fn)
    helpers = {name: ast.parse(textwrap.dedent("".join(_jit_source(obj)[0]))).body[0]
               for name, obj in vars(mod).items() if isinstance(obj, JITFunction)}
    return os.path.realpath(inspect.getsourcefile(fn.fn)), first, ast.parse(textwrap.dedent("".join(lines))).body[0], \
        helpers


def relative_lines(bodies: list[dict], file: str, first: int) -> None:
    """Keep each loop's source lines in the kernel's file, relative to its source (the first line is 1)."""
    for body in bodies:
        rel: dict[str, int] = {}
        for key, n in body["lines"].items():
            path, _, line = key.rpartition(":")
            if os.path.realpath(path) == file:
                k = str(int(line) - first + 1)
                rel[k] = rel.get(k, 0) + n
        body["lines"] = rel


def occupancy(regs: int, smem_bytes: int, num_warps: int, cc: int) -> float:
    """Theoretical occupancy (resident warps / 64) from registers, shared memory and block size."""
    per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SM_LIMITS[cc]["smem_per_sm"] // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps, by_regs, by_smem)
    return blocks * num_warps / MAX_WARPS_PER_SM


# ---------------------------------------------------------------------------------------------
# the CUDA extension
# ---------------------------------------------------------------------------------------------
def cuda_extension_rows() -> list[dict]:
    """The built ``utilrank_kernels/_C*.so``'s kernels per architecture, or [] where it is not built."""
    built = sorted((ROOT / "utilrank_kernels").glob("_C*.so"))
    if not built:
        return []
    rows = analyze_cubin(built[0])
    demangle = shutil.which("c++filt")
    for row in rows:
        if demangle:
            row["function"] = subprocess.run([demangle, row["function"]], capture_output=True, text=True).stdout.strip()
    return rows


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def finish_row(job: Job, result: dict) -> dict:
    row = {k: v for k, v in job.__dict__.items() if k not in ("signature", "constexprs", "attrs", "options",
                                                               "module", "kernel", "shapes")}
    row.update(result)
    if result["status"] == "ok":
        row.update(loop_report(job, row.pop("loop_bodies", [])))
        smem = result["smem_static"] + result["smem_dynamic"]
        limit = SM_LIMITS[job.target]["smem_per_block"]
        row.update(smem=smem, smem_limit=limit, fits=smem <= limit,
                   occupancy=occupancy(result["regs"], smem, job.options["num_warps"], job.target)
                   if smem <= limit else 0.0)
    return row


def loop_report(job: Job, bodies: list[dict]) -> dict:
    """The compile's main loops (:func:`main_loops`) with the iterations of the first launch it serves, and
    per launch (``per_launch``, in the order of ``labels``, as lists of ``PER_LAUNCH``) the output tiles
    per program and instructions per output tile, from that launch's scalars and grid, the programs of its
    grid, and the warp instructions its main loops issue in all (per program x warps x programs: every
    program taken to run as many iterations as the first; split-K programs of one tile each count)."""
    _, _, fdef, helpers = kernel_ast(job.module, job.kernel)
    names = list(job.signature)
    constexprs = {names[i[0]]: v for i, v in job.constexprs.items() if isinstance(v, int) and not isinstance(v, bool)}
    per_launch = []
    for shapes in job.shapes or [{}]:
        env = {**{k: v for k, v in shapes.items() if k != "grid"}, **constexprs}
        loops, holder = source_loops(fdef, env, shapes.get("grid"), helpers)
        per_launch.append(main_loops(bodies, loops, holder))
    first = per_launch[0]
    return {"main_loops": first["loops"], "grid": job.shapes[0].get("grid") if job.shapes else None,
            "per_launch": [_per_launch(r, shapes, job.options["num_warps"])
                           for r, shapes in zip(per_launch, job.shapes or [{}], strict=True)]}


def _per_launch(loops: dict, shapes: dict, num_warps: int) -> list:
    per_tile, programs = loops["instructions_per_tile"], _programs(shapes)
    return [loops["tiles"], None if per_tile is None else round(per_tile), programs,
            None if loops["loop_instructions"] is None or not programs
            else loops["loop_instructions"] * num_warps * programs]


PER_LAUNCH = ("tiles", "instructions_per_tile", "programs", "launch_instructions")  # a per_launch entry's fields


def _programs(shapes: dict) -> int | None:
    return math.prod(shapes["grid"]) if shapes.get("grid") else None


def loops_str(main: list[dict]) -> str:
    """The counted main loops in address order, ``var:instructions/MMA`` per iteration, e.g. ``k0:96/4``."""
    out = []
    for lo in main:
        if not lo["counted"] or lo["repeat"]:
            continue
        var = lo["source"].split(" in ")[0] if lo["source"] else "?"
        out.append(f"{var}:{lo['instructions']}/{lo['hmma'] + lo['hgmma']}")
    return " ".join(out)


def problems(rows: list[dict], ext_rows: list[dict]) -> list[str]:
    """What ``--check`` fails on (see the module docstring)."""
    out = []
    for r in rows:
        where = f"{r['table']} row {r['row']} ({r['config']}) {r['dtype']} sm_{r['target']}"
        more = f" +{len(r['labels']) - 1} more" if len(r["labels"]) > 1 else ""
        shapes = f" [{r['labels'][0]}{more}]"
        ok = r["status"] == "ok"
        if r["row"] == 0 and not ok:
            out.append(f"{where}: first row does not compile: {r['error']}{shapes}")
            continue
        if not ok:
            continue
        if (r["row"] == 0 or r["selectable"]) and not r["fits"]:
            kind = "first row" if r["row"] == 0 else "selectable row"
            out.append(f"{where}: {kind} needs {r['smem'] / 1024:.1f} KiB of shared memory, over the "
                       f"{r['smem_limit'] // 1024} KiB limit{shapes}")
        if (r["row"] == 0 or r["selectable"]) and r["local_in_loop"]:
            kind = "first row" if r["row"] == 0 else "selectable row"
            out.append(f"{where}: {kind} moves local memory inside a loop ({r['local_in_loop']} LDL/STL, "
                       f"stack {r['stack']} B){shapes}")
        if r["dtype"] in ("fp16", "bf16") and r["hmma"] + r["hgmma"] == 0:
            out.append(f"{where}: 16-bit compile without tensor-core instructions (no HMMA/HGMMA){shapes}")
    for r in ext_rows:
        if r.get("stack", 0) or r["ldl"] or r["stl"]:
            out.append(f"CUDA extension {r['function']} {r['arch']}: stack {r.get('stack')} B, "
                       f"{r['ldl']} LDL / {r['stl']} STL")
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (table, row, target, dtype): the worst value over the launches of that table row."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["table"], r["row"], r["target"], r["dtype"]), []).append(r)
    lines = []
    for (table, row, target, dtype), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "ok"]
        line = {"table": table, "row": row, "config": rs[0]["config"], "target": target, "dtype": dtype,
                "specializations": len(rs), "errors": len(rs) - len(ok), "selectable": any(r["selectable"] for r in rs)}
        if ok:
            line.update(regs=max(r["regs"] for r in ok), stack=max(r["stack"] for r in ok),
                        local_in_loop=max(r["local_in_loop"] for r in ok), smem=max(r["smem"] for r in ok),
                        fits=all(r["fits"] for r in ok), occupancy=min(r["occupancy"] for r in ok),
                        hmma=min(r["hmma"] for r in ok), hgmma=min(r["hgmma"] for r in ok),
                        ldgsts=min(r["ldgsts"] for r in ok), tma=min(r["tma"] for r in ok))
            per_tile = [dict(zip(PER_LAUNCH, lc, strict=True))["instructions_per_tile"] for r in ok
                        for lc in r.get("per_launch", [])]
            mma = [lo["hmma"] + lo["hgmma"] for r in ok for lo in r.get("main_loops", []) if lo["counted"]]
            line.update(loops=loops_str(ok[0].get("main_loops", [])), mma_per_iteration=max(mma, default=0),
                        instructions_per_tile=None if None in per_tile or not per_tile else round(max(per_tile)))
        lines.append(line)
    return lines


def markdown(summary: list[dict], ext_rows: list[dict], found: list[str], header: dict,
             before: dict | None = None, after: dict | None = None) -> str:
    out = [f"# Kernel resources: Triton {header['triton']}, torch {header['torch']}", "",
           f"Generated by `python benchmarks/run.py kernel-resources{header['argv']}` on a CPU-only machine "
           f"({header['jobs']} compiles, {header['specializations']} launch specializations recorded from "
           f"{', '.join(header['models'])} at batch {', '.join(map(str, BATCHES))}). Per table row, target and "
           "dtype, the worst value over the launches of that row: registers per thread, stack bytes (spills), "
           "LDL/STL inside loops, shared memory (static + dynamic) in KiB against the target's limit "
           "(163 KiB on sm_80, 227 KiB on sm_90), theoretical occupancy, tensor-core (HMMA, HGMMA = wgmma) and "
           "async-copy (LDGSTS = cp.async, TMA) instruction counts. `sel`: the launcher's prune keeps the row for "
           "at least one launch on that target (`-`: pruned everywhere: it can never be selected there).", "",
           LOOPS_NOTE, "",
           "| table | row | config | target | dtype | sel | REG | stack | LDL/STL in loop | smem KiB | fits | occ | "
           "HMMA | HGMMA | LDGSTS | TMA | main loops: instr/MMA per iteration | instr/tile |", "|" + "---|" * 18]
    for s in summary:
        if "regs" not in s:
            out.append(f"| {s['table']} | {s['row']} | {s['config']} | sm_{s['target']} | {s['dtype']} | "
                       f"{'y' if s['selectable'] else '-'} | compile error ({s['errors']}) |" + " |" * 12)
            continue
        out.append(
            f"| {s['table']} | {s['row']} | {s['config']} | sm_{s['target']} | {s['dtype']} | "
            f"{'y' if s['selectable'] else '-'} | {s['regs']} | {s['stack']} | {s['local_in_loop']} | "
            f"{s['smem'] / 1024:.1f} | {'yes' if s['fits'] else '**no**'} | {s['occupancy']:.2f} | {s['hmma']} | "
            f"{s['hgmma']} | {s['ldgsts']} | {s['tma']} | {s.get('loops') or '-'} | "
            f"{_num(s.get('instructions_per_tile'))} |")
    if ext_rows:
        out += ["", "## CUDA extension (`utilrank_kernels/_C*.so`, built by `.ci/build_cuda_ext.sh`)", "",
                "| function | arch | REG | stack | static smem B | LDL | STL | HMMA | FFMA | LDGSTS |",
                "|" + "---|" * 10]
        for r in ext_rows:
            out.append(f"| `{r['function']}` | {r['arch']} | {r.get('regs')} | {r.get('stack')} | "
                       f"{r.get('smem_static')} | {r['ldl']} | {r['stl']} | {r['hmma']} | {r['ffma']} | "
                       f"{r['ldgsts']} |")
    if before is not None:
        out += before_after_md(before, after or {})
    out += ["", "## Check", ""] + ([f"- {p}" for p in found] or ["No problems: every check passed."])
    return "\n".join(out) + "\n"


LOOPS_NOTE = (
    "Main loops (from nvdisasm's line info: each SASS loop, found by its backward branch, is mapped to the "
    "kernel's `for` loop whose lines its instructions carry): per loop in address order, `var:I/M` is the loop "
    "variable, its own SASS instructions per iteration (those of no nested loop) and its tensor-core "
    "instructions (HMMA on sm_80, HGMMA on sm_90) per iteration. `instr/tile`: the worst over the row's "
    "launches of the instructions the main loops issue per warp per output tile: the sum over loops of "
    "instructions per iteration x iterations per program (trip counts evaluated from the launch's shapes and "
    "the row's constexprs, for the first program), divided by the output tiles per program (the iterations "
    "of the loop holding the kernel's last store; 1 outside any loop); code outside every loop is not counted.")
# the before/after section: representative launches of the kernels issue 23 changes
BEFORE_AFTER_LAUNCHES = (
    "vit_b16 b64 fc1 r192 lowrank_linear", "vit_b16 b64 fc2 r192 lowrank_linear", "vit_b16 b1 fc1 r192 lowrank_linear",
    "vit_b16 b64 qkv r288 lowrank_linear", "resnet50 b64 fc r320 lowrank_linear",
    "vit_b16 b64 mlp r192 lowrank_mlp", "vit_b16 b64 mlp r304 lowrank_mlp", "vit_b16 b1 mlp r192 lowrank_mlp",
    "vit_b16 b64 fc1 covariance", "vit_b16 b64 fc2 covariance", "resnet50 b64 fc covariance",
    "resnet50 b64 layer3.0.conv2 conv covariance",
)


def _millions(v) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def _num(v) -> str:
    return "-" if v is None else f"{v:,.0f}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def launch_metrics(compiles: list[dict], labels=BEFORE_AFTER_LAUNCHES) -> dict:
    """Per (label, target, dtype, kernel table, launch index: a label may launch one table twice): the first
    row's registers, LDL/STL in loops, shared memory, MMA per main-loop iteration (the most over its loops),
    instructions per output tile, programs and warp instructions per launch, and the fewest instructions per
    output tile over the rows the launcher keeps for that launch (with the row)."""
    out: dict[tuple, dict] = {}
    for c in compiles:
        if c["status"] != "ok":
            continue
        for i, label in enumerate(c["labels"]):
            if label not in labels:
                continue
            key = (label, c["target"], c["dtype"], c["table"], c["launch_ids"][i] if c.get("launch_ids") else 0)
            entry = out.setdefault(key, {"best": None, "best_row": None})
            launch = dict(zip(PER_LAUNCH, c["per_launch"][i], strict=True)) if c.get("per_launch") else {}
            per_tile = launch.get("instructions_per_tile")
            if c["row"] == 0:
                mma = [lo["hmma"] + lo["hgmma"] for lo in c.get("main_loops", []) if lo["counted"]]
                entry.update(row0=True, regs=c["regs"], stack=c["stack"], local_in_loop=c["local_in_loop"],
                             smem=c["smem"], mma=max(mma, default=0), per_tile=per_tile,
                             programs=launch.get("programs"), tiles=launch.get("tiles"),
                             launch_instructions=launch.get("launch_instructions"),
                             loops=loops_str(c.get("main_loops", [])), config=c["config"])
            if c.get("selectable_for", [True] * (i + 1))[i] and per_tile is not None and (
                    entry["best"] is None or per_tile < entry["best"]):
                entry.update(best=per_tile, best_row=c["row"])
    return out


def before_metrics(report: dict) -> dict:
    """:func:`launch_metrics` of a report from before a change: from its compiles, or from the
    ``before_after`` block a report made with ``--before`` keeps (so that a rerun keeps the section)."""
    if "compiles" in report:
        return launch_metrics(report["compiles"])
    out = {}
    for key, v in report["before_after"]["before"].items():
        label, target, dtype, table, *n = key.split(" | ")
        out[label, int(target), dtype, table, int(n[0]) if n else 0] = v
    return out


def _pairs(bs: list[dict], as_: list[dict]) -> list[tuple[dict | None, dict | None]]:
    """Before and after kernels of one launch, paired: same family (the table name before ``[``) first, in
    order; then what is left on both sides, in order (a kernel that replaced another: a renamed table, the
    fused MLP's two linears); then the rest alone."""
    def family(e):
        return e["table"].split("[")[0]

    pairs, left_b, left_a = [], [], list(as_)
    for b in bs:
        a = next((a for a in left_a if family(a) == family(b)), None)
        if a is None:
            left_b.append(b)
        else:
            left_a.remove(a)
            pairs.append((b, a))
    n = min(len(left_b), len(left_a))
    pairs += list(zip(left_b[:n], left_a[:n], strict=True))
    return pairs + [(b, None) for b in left_b[n:]] + [(None, a) for a in left_a[n:]]


def before_after_md(before: dict, after: dict) -> list[str]:
    """The "Before/after (issue 23)" section: per representative launch, target, dtype and kernel (the
    launcher's tables, paired by :func:`_pairs`), before -> after."""
    b_m, a_m = before_metrics(before), launch_metrics(after["compiles"])
    keys = sorted({k[:3] for k in (*b_m, *a_m)}, key=lambda k: (BEFORE_AFTER_LAUNCHES.index(k[0]), k[1], k[2]))
    out = ["", "## Before/after (issue 23)", "",
           f"Before: {before.get('source', 'the tree before the change')} (Triton {before['triton']}); after: this "
           "table. Per representative launch, target and dtype, for each kernel it launches (its table, before / "
           "after where the name changed; `-`: not launched on that side): the first row's registers, LDL/STL "
           "inside loops, shared memory, tensor-core instructions per main-loop iteration (the most over its "
           "loops), main-loop instructions per warp per output tile and the loops themselves (`var:instr/MMA` "
           f"per iteration, as above), the programs of its launch grid (the launchers sized for {RECORD_SMS} SMs, "
           "an H100/H200), the warp instructions its main loops issue in the whole launch in millions (per "
           "program x warps x programs, each program taken to run the first one's iterations: unlike the "
           "per-tile count, it charges split-K programs that share a tile and work repeated by each split), and "
           "the fewest instructions per output tile over the rows the launcher keeps for that launch (with that "
           "row).", "",
           "| launch | kernel | target | dtype | REG | LDL/STL in loop | smem KiB | MMA/iter | instr/tile (row 0) | "
           "main loops (row 0) | programs | M warp-instr/launch | fewest instr/tile (row) |", "|" + "---|" * 13]

    def pick(metrics, key):
        return [v | {"table": k[3]} for k, v in sorted(metrics.items(), key=lambda kv: kv[0][3:]) if k[:3] == key]

    def cell(b, a, field, fmt=_num):
        def one(e):
            return fmt(e.get(field)) if e and e.get("row0") else "-"
        return f"{one(b)} → {one(a)}"

    for key in keys:
        for b, a in _pairs(pick(b_m, key), pick(a_m, key)):
            tables = " / ".join(dict.fromkeys(e["table"] for e in (b, a) if e))
            best = " → ".join(f"{_num(e['best'])} ({e['best_row']})" if e and e["best"] is not None else "-"
                              for e in (b, a))
            out.append(f"| {key[0]} | {tables} | sm_{key[1]} | {key[2]} | {cell(b, a, 'regs')} | "
                       f"{cell(b, a, 'local_in_loop')} | {cell(b, a, 'smem', lambda v: f'{v / 1024:.1f}')} | "
                       f"{cell(b, a, 'mma')} | {cell(b, a, 'per_tile')} | {cell(b, a, 'loops')} | "
                       f"{cell(b, a, 'programs')} | {cell(b, a, 'launch_instructions', _millions)} | {best} |")
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", choices=("all", "first"), default="all", help="every autotune row, or the first only")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    p.add_argument("--tables", default="", help="regex: only the tables whose name matches")
    p.add_argument("--labels", default="", help="regex: only the launches whose label matches (e.g. "
                   "'vit_b16 b64 fc1'); --labels before-after: the before/after section's launches")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/utilrank/kernel-resources"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--representative", action="store_true",
                   help="one compile per signature and constexprs, whatever the divisibility attributes (CI)")
    p.add_argument("--check", action="store_true", help="exit 1 if a check fails (see above)")
    p.add_argument("--before", default="", help="a report's JSON from before a kernel change: adds the "
                   "before/after section for the representative launches (BEFORE_AFTER_LAUNCHES)")
    p.add_argument("--keep-before", action="store_true",
                   help="keep the before/after section of the report this run replaces (its before side)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("UTILRANK_TRITON_CONFIG") == "first":
        p.error("run without TRITON_INTERPRET / UTILRANK_TRITON_CONFIG: the report needs every autotune row")
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    import triton

    cache = Path(args.cache_dir) / f"triton-{triton.__version__}"
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    import torch

    start = time.perf_counter()
    launches = record_model_launches(models, args.dtypes.split(","))
    if args.tables:
        launches = [lc for lc in launches if re.search(args.tables, lc.table)]
    if args.labels:
        launches = [lc for lc in launches if lc.label in BEFORE_AFTER_LAUNCHES] if args.labels == "before-after" \
            else [lc for lc in launches if re.search(args.labels, lc.label)]
    jobs = make_jobs(launches, [int(t) for t in args.targets.split(",")], args.rows, args.representative)
    print(f"kernel_resources: {len(launches)} launches recorded, {len(jobs)} compiles "
          f"({args.jobs} at a time, cache {cache})", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(compile_job, jobs, [str(cache)] * len(jobs), chunksize=1))
    rows = [finish_row(job, result) for job, result in zip(jobs, results, strict=True)]
    ext_rows = cuda_extension_rows()
    found = problems(rows, ext_rows)
    summary = summarize(rows)
    header = {"triton": triton.__version__, "torch": torch.__version__, "models": models, "rows": args.rows,
              "jobs": len(jobs), "specializations": len({(j.table, j.key) for j in jobs if j.row == 0}),
              "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])
                              if not a.startswith("--out-dir") and not a.startswith("--cache-dir")),
              "seconds": round(time.perf_counter() - start, 1)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = "-".join(f"sm{t}" for t in args.targets.split(","))  # the result's device: the compile targets
    stem = (f"{targets}_kernel-resources-triton{triton.__version__}" + ("-first" if args.rows == "first" else "")
            + ("-representative" if args.representative else ""))
    report = {"format": "utilrank.kernel-resources/2", **header, "summary": summary, "cuda_extension": ext_rows,
              "problems": found, "compiles": rows}
    before = None
    if args.before:
        before = json.loads(Path(args.before).read_text())
    elif args.keep_before and (out_dir / f"{stem}.json").exists():  # the section of the report it replaces
        kept = json.loads((out_dir / f"{stem}.json").read_text()).get("before_after")
        before = {**kept, "before_after": kept} if kept else None
    if before is not None:
        report["before_after"] = {"source": before.get("source", args.before), "triton": before["triton"],
                                  "before": {" | ".join(map(str, k)): v for k, v in before_metrics(before).items()}}
    # one line per compile: the summary stays readable, the file small
    text = json.dumps({**report, "compiles": "@COMPILES@"}, indent=1)
    text = text.replace('"@COMPILES@"', "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n ]")
    _write(out_dir / f"{stem}.json", text + "\n")
    _write(out_dir / f"{stem}.md", markdown(summary, ext_rows, found, header, before, report))
    print(f"kernel_resources: wrote {out_dir / stem}.{{json,md}} in {header['seconds']}s; "
          f"{len(found)} problem(s)")
    for line in found:
        print(f"  {line}")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
