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
backward branches). Compiles go to a Triton cache and results to a result cache (``--cache-dir``), so a
rerun recompiles only what changed.

``--check`` fails (exit 1, one line per problem) where, on any target and dtype: a row the launcher can
select does not fit the target's shared memory; a first row (what ``UTILRANK_TRITON_CONFIG=first`` runs)
does not compile, does not fit, or moves local memory inside a loop; a 16-bit compile has no tensor-core
instruction; the CUDA extension's cubins spill.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.tools.rows import RESULTS

ROOT = Path(__file__).resolve().parents[2]

TARGETS = (80, 90)
REPORT_VERSION = 1  # part of every result's cache key: bump when the cubin analysis changes
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

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    for batch in batches:
        for lin in linears:
            lead = (batch, lin.tokens) if lin.tokens > 1 else (batch,)
            r = half_params_rank(lin.n_in, lin.n_out)
            x = empty(*lead, lin.n_in)
            acc = empty(lin.n_in, lin.n_in, dt=torch.float64)
            yield (f"{model} b{batch} {lin.name} covariance",
                   lambda x=x, acc=acc: covariance_update_triton(acc, x, None))
            if lin.name in ("fc1", "fc2"):
                continue  # run fused as the MLP below
            a, b, bias = empty(r, lin.n_in), empty(lin.n_out, r), empty(lin.n_out)
            yield (f"{model} b{batch} {lin.name} r{r} lowrank_linear",
                   lambda x=x, a=a, b=b, bias=bias: lowrank_linear_triton(x, a, b, bias))
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
                    acc, x, (c.k, c.k), (c.stride, c.stride), (c.pad, c.pad), (1, 1)))
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

    def record(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        rec.launches.append(Launch(tables[id(self)], rec.label, rec.dtype, args, kwargs))

    def conv2d_shape_only(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
        out = real_conv2d(x.to("meta"), w.to("meta"), None, stride, padding, dilation, groups)
        return torch.empty_strided(out.shape, out.stride(), dtype=x.dtype)

    Autotuner.run, F.conv2d = record, conv2d_shape_only
    try:
        yield rec
    finally:
        Autotuner.run, F.conv2d = real_run, real_conv2d


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
    for launch in launches:
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
                job.selectable = job.selectable or _config_str(config) in selectable
    return list(jobs.values())


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
            result = {"status": "ok", **analyze_cubin(cubin)[0]}
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
OPCODE_GROUPS = {
    "hmma": ("HMMA",), "hgmma": ("HGMMA",), "ldgsts": ("LDGSTS",), "tma": ("UTMALDG", "UBLKCP", "UTMASTG"),
    "ffma": ("FFMA",), "ldl": ("LDL",), "stl": ("STL",),
}


def parse_sass(text: str) -> dict:
    """Counts of the opcode groups in one function's SASS, local-memory instructions inside loops
    (a loop is the address range of a backward branch), and the number of loops."""
    instrs = []
    for m in _SASS_LINE.finditer(text):
        tokens = m.group(2).split()
        if tokens and tokens[0].startswith("@"):
            tokens = tokens[1:]
        if tokens:
            instrs.append((int(m.group(1), 16), tokens[0], " ".join(tokens[1:])))
    loops = []
    for addr, op, operands in instrs:
        if op.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) <= addr:
                loops.append((int(target.group(1), 16), addr))
    counts = dict.fromkeys(OPCODE_GROUPS, 0)
    local_in_loop = 0
    for addr, op, _ in instrs:
        base = op.split(".")[0]
        for group, names in OPCODE_GROUPS.items():
            if base in names:
                counts[group] += 1
        if base in ("LDL", "STL") and any(lo <= addr <= hi for lo, hi in loops):
            local_in_loop += 1
    return {**counts, "local_in_loop": local_in_loop, "loops": len(loops)}


def analyze_cubin(path: Path) -> list[dict]:
    """Per function of a cubin (or a host binary embedding cubins): name, arch, registers, stack bytes,
    static shared memory and the SASS counts of :func:`parse_sass`."""
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
    return functions


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
                                                               "module", "kernel")}
    row.update(result)
    if result["status"] == "ok":
        smem = result["smem_static"] + result["smem_dynamic"]
        limit = SM_LIMITS[job.target]["smem_per_block"]
        row.update(smem=smem, smem_limit=limit, fits=smem <= limit,
                   occupancy=occupancy(result["regs"], smem, job.options["num_warps"], job.target)
                   if smem <= limit else 0.0)
    return row


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
        if r["row"] == 0 and r["local_in_loop"]:
            out.append(f"{where}: first row moves local memory inside a loop ({r['local_in_loop']} LDL/STL, "
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
        lines.append(line)
    return lines


def markdown(summary: list[dict], ext_rows: list[dict], found: list[str], header: dict) -> str:
    out = [f"# Kernel resources: Triton {header['triton']}, torch {header['torch']}", "",
           f"Generated by `python benchmarks/run.py kernel-resources{header['argv']}` on a CPU-only machine "
           f"({header['jobs']} compiles, {header['specializations']} launch specializations recorded from "
           f"{', '.join(header['models'])} at batch {', '.join(map(str, BATCHES))}). Per table row, target and "
           "dtype, the worst value over the launches of that row: registers per thread, stack bytes (spills), "
           "LDL/STL inside loops, shared memory (static + dynamic) in KiB against the target's limit "
           "(163 KiB on sm_80, 227 KiB on sm_90), theoretical occupancy, tensor-core (HMMA, HGMMA = wgmma) and "
           "async-copy (LDGSTS = cp.async, TMA) instruction counts. `sel`: the launcher's prune keeps the row for "
           "at least one launch on that target (`-`: pruned everywhere: it can never be selected there).", "",
           "| table | row | config | target | dtype | sel | REG | stack | LDL/STL in loop | smem KiB | fits | occ | "
           "HMMA | HGMMA | LDGSTS | TMA |", "|" + "---|" * 16]
    for s in summary:
        if "regs" not in s:
            out.append(f"| {s['table']} | {s['row']} | {s['config']} | sm_{s['target']} | {s['dtype']} | "
                       f"{'y' if s['selectable'] else '-'} | compile error ({s['errors']}) |" + " |" * 10)
            continue
        out.append(
            f"| {s['table']} | {s['row']} | {s['config']} | sm_{s['target']} | {s['dtype']} | "
            f"{'y' if s['selectable'] else '-'} | {s['regs']} | {s['stack']} | {s['local_in_loop']} | "
            f"{s['smem'] / 1024:.1f} | {'yes' if s['fits'] else '**no**'} | {s['occupancy']:.2f} | {s['hmma']} | "
            f"{s['hgmma']} | {s['ldgsts']} | {s['tma']} |")
    if ext_rows:
        out += ["", "## CUDA extension (`utilrank_kernels/_C*.so`, built by `.ci/build_cuda_ext.sh`)", "",
                "| function | arch | REG | stack | static smem B | LDL | STL | HMMA | FFMA | LDGSTS |",
                "|" + "---|" * 10]
        for r in ext_rows:
            out.append(f"| `{r['function']}` | {r['arch']} | {r.get('regs')} | {r.get('stack')} | "
                       f"{r.get('smem_static')} | {r['ldl']} | {r['stl']} | {r['hmma']} | {r['ffma']} | "
                       f"{r['ldgsts']} |")
    out += ["", "## Check", ""] + ([f"- {p}" for p in found] or ["No problems: every check passed."])
    return "\n".join(out) + "\n"


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
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/utilrank/kernel-resources"))
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--representative", action="store_true",
                   help="one compile per signature and constexprs, whatever the divisibility attributes (CI)")
    p.add_argument("--check", action="store_true", help="exit 1 if a check fails (see above)")
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
    _write(out_dir / f"{stem}.json", json.dumps({"format": "utilrank.kernel-resources/1", **header,
                                                  "summary": summary, "cuda_extension": ext_rows,
                                                  "problems": found, "compiles": rows}, indent=1) + "\n")
    _write(out_dir / f"{stem}.md", markdown(summary, ext_rows, found, header))
    print(f"kernel_resources: wrote {out_dir / stem}.{{json,md}} in {header['seconds']}s; "
          f"{len(found)} problem(s)")
    for line in found:
        print(f"  {line}")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
