"""``utilrank bench`` (DESIGN §4): a dense model and its compressed form, timed side by side.

Rows carry timm's ``benchmark.py`` fields (``infer_samples_per_sec``, ``infer_step_time`` in ms,
``param_count`` in millions, ``infer_gmacs`` per sample; 10 warm-up and 40 timed steps) and what makes
a row comparable (device, dtype, backend, torch and triton versions, p20/p80). Compressed rows add the
measured ``speedup`` over the dense model of the same run, the ``theoretical_speedup`` (the FLOP ratio
from ``FlopCounterMode``, attention counted) and ``realized_fraction = speedup / theoretical_speedup``.

The dense and the compressed models are timed interleaved (one step of each in turn, after their
warm-ups), so that a machine shared with other work slows both alike and their ratio stays honest.

What is compressed:

- ``--compressed DIR``: a folder written by ``utilrank compress``; the dense model is its twin with
  every factored layer multiplied back (``W = B A``), the same architecture and the same outputs.
- ``--model M --param-ratio R``: a synthetic cut for timing: every ``nn.Linear`` and ``nn.Conv2d``
  (groups = 1) factored at the rank ``r = R in out / (in + out)``, rounded down to a multiple of
  ``--rank-multiple`` where that takes less than 10% off ``r``, so those layers keep at most ``R`` of
  their parameters; random factors.
- no argument (the built-in default): the built-in ``vit-digits`` (trained and cached on first use)
  compressed in-process with data-aware factors at ``--energy`` (no rank search, no fine-tuning:
  timing depends on the ranks, not on the weights' values).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ._cache import atomic_path, write_json
from .commands import DEFAULT_MODEL, UsageError, resolve_device
from .measure import (
    THP_HINT,
    count_flops,
    count_params,
    cpu_thp_alloc,
    device_label,
    keep_freed_memory,
    quantiles_ms,
    step_times,
    time_interleaved,
    versions,
)

BENCH_FORMAT = "utilrank.bench/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKEND_CHOICES = ("torch", "triton", "cuda", "auto")


# ---------------------------------------------------------------------------------------------
# what makes a row comparable
# ---------------------------------------------------------------------------------------------
def realized(dense_ms: float, compressed_ms: float, dense_flops: int, compressed_flops: int) -> dict:
    """The compressed row's ratios: measured speedup, FLOP ratio, and the fraction of it realized."""
    speedup = dense_ms / compressed_ms
    theoretical = dense_flops / compressed_flops
    return {"speedup": round(speedup, 4), "theoretical_speedup": round(theoretical, 4),
            "realized_fraction": round(speedup / theoretical, 4)}


# ---------------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------------
def _lowrank_types() -> tuple[type, ...]:
    from .nn import LowRankConv2d, LowRankLinear, LowRankMlp

    return LowRankLinear, LowRankConv2d, LowRankMlp


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Point every factored module of ``model`` at ``backend``."""
    for m in model.modules():
        if isinstance(m, _lowrank_types()):
            m.backend = backend
    return model


def ratio_plan(model: nn.Module, ratio: float, multiple: int = 16, arch: str | None = None) -> dict:
    """A plan factoring every ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) of ``model`` so that it keeps
    at most ``ratio`` of its parameters: ``r = ratio in out / (in + out)``, rounded down to a multiple
    of ``multiple`` where that takes less than 10% off ``r`` (ViT-B/16 at 0.5: fc1/fc2 307 -> 304,
    which ran 1.3x faster than 307 on a 2-core EPYC). Layers too small to save anything stay dense."""
    from .compress import make_plan

    if not 0 < ratio < 1:
        raise ValueError(f"--param-ratio {ratio}: must be in (0, 1)")
    layers, dense = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            kind, n_in, n_out = "linear", m.in_features, m.out_features
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1:
                dense[name] = "grouped conv"
                continue
            kind, n_in, n_out = "conv2d", m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels
        else:
            continue
        exact = int(ratio * n_in * n_out / (n_in + n_out))
        rounded = exact // multiple * multiple if multiple > 1 else exact
        rank = rounded if rounded >= 0.9 * exact else exact  # small layers keep their exact rank
        if rank < 1:
            dense[name] = f"rank {exact} at ratio {ratio}: too small to factor"
            continue
        reason = f"param ratio {ratio} (rank multiple {multiple})"
        layers[name] = {"kind": kind, "rank": rank, "reason": reason}
    return make_plan(arch or type(model).__name__, layers, dense, param_ratio=ratio, rank_multiple=multiple)


def cut_to_ratio(model: nn.Module, ratio: float, multiple: int = 16,
                 arch: str | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` factored per ``ratio_plan`` with random factors, MLPs fused; and the plan."""
    from .compress import apply_plan
    from .nn import fuse_lowrank_mlps

    plan = ratio_plan(model, ratio, multiple, arch)
    compressed = apply_plan(copy.deepcopy(model), plan)
    fuse_lowrank_mlps(compressed)
    return compressed.eval(), plan


def dense_twin(compressed: nn.Module, plan: dict, config: dict) -> nn.Module:
    """The architecture of ``config`` with every factored layer of ``compressed`` multiplied back into a
    dense weight: the dense model that computes what ``compressed`` computes."""
    from .compress.io import _build_architecture
    from .weightspace import dense_state_dict

    dense = _build_architecture(config)
    dense.load_state_dict(dense_state_dict(compressed, plan), strict=True)
    return dense.eval()


def compress_builtin(name: str, energy: float = 0.99) -> tuple[nn.Module, nn.Module, dict]:
    """``(dense, compressed, plan)``: the trained built-in factored in-process on its data at ``energy``."""
    from torch.utils.data import DataLoader

    from .analysis import analyze, collect_stats
    from .compress import decompose, make_plan, plan_ranks
    from .data import load_data
    from .models import build_model
    from .nn import fuse_lowrank_mlps

    model, _ = build_model(name)
    data = load_data(None, model)
    stats = collect_stats(model, DataLoader(data.train, batch_size=128), device="cpu", progress=False)
    report, subspaces = analyze(model, stats, energy)
    layers, dense = plan_ranks(model, report, subspaces, energy=energy, progress=False)
    plan = make_plan(name, layers, dense, energy=energy)
    compressed = decompose(model, subspaces, plan)
    fuse_lowrank_mlps(compressed)
    return model.eval(), compressed.eval(), plan


def input_size(model: nn.Module, name: str, config: dict | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input: the digits' size for built-ins, timm's pretrained config otherwise."""
    from .models import BUILTIN_MODELS

    arch = (config or {}).get("arch", name)
    if arch in BUILTIN_MODELS:
        from .data.datasets import DIGITS_SIZE

        kwargs = {**BUILTIN_MODELS[arch][1], **(config or {}).get("model_kwargs", {})}
        size = kwargs.get("img_size", DIGITS_SIZE)
        return kwargs.get("in_chans", 1), size, size
    import timm.data

    return tuple(timm.data.resolve_data_config({}, model=model)["input_size"])


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def make_step(model: nn.Module, x: torch.Tensor, *, compile: bool = False,
              cuda_graphs: bool = False) -> Callable[[], object]:
    """One inference step of ``model`` on ``x``: eager, ``torch.compile``d, and/or replayed from a CUDA
    graph (with ``compile``: inductor's ``reduce-overhead`` mode, which captures graphs itself)."""
    if cuda_graphs and not x.is_cuda:
        raise ValueError("--cuda-graphs needs a CUDA device")
    if compile:
        model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
        return lambda: model(x)
    if not cuda_graphs:
        return lambda: model(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: autotuning, lazy init, workspaces
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def _backend_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be timed on ``device`` (None if it can)."""
    from .ops._backend import cuda_extension, triton_available

    if backend in ("torch", "auto"):
        return None
    if device.type != "cuda":
        return (f"backend {backend} runs on CUDA devices only (TRITON_INTERPRET runs on the CPU are for "
                "correctness, not timing)")
    if backend == "triton" and not triton_available():
        return "backend triton: the triton package is not installed"
    if backend == "cuda" and cuda_extension() is None:
        return ("backend cuda: the extension utilrank_kernels._C is not built "
                "(UTILRANK_BUILD_CUDA=1 pip install -e . --no-build-isolation)")
    return None


def bench(
    dense: nn.Module,
    compressed: nn.Module,
    *,
    model_name: str,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 64),
    dtypes: Sequence[str] = ("fp32",),
    backends: Sequence[str] = ("auto",),
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
    warmup: int = 10,
    iters: int = 40,
    extra: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """The rows of one run: per dtype and batch size, one dense row and one compressed row per backend,
    all timed interleaved. Backends that cannot run on ``device`` are skipped with a message."""
    device = torch.device(device)
    dense, compressed = dense.float().cpu().eval(), compressed.float().cpu().eval()
    x1 = torch.randn(1, *input_shape)
    flops = {"dense": count_flops(dense, x1), "compressed": count_flops(set_backend(compressed, "torch"), x1)}
    params = {"dense": count_params(dense), "compressed": count_params(compressed)}
    usable = []
    for b in dict.fromkeys(backends):
        problem = _backend_problem(b, device)
        if problem:
            log(f"skipped: {problem}")
        else:
            usable.append(b)
    if not usable:
        raise ValueError(f"no requested backend ({', '.join(backends)}) can run on {device.type}")
    common = {"device": device_label(device), **versions(), "channels_last": channels_last,
              "compile": compile, "cuda_graphs": cuda_graphs, "date": datetime.date.today().isoformat(),
              **(extra or {})}
    if device.type == "cpu":
        common.update(threads=torch.get_num_threads(), thp_mem_alloc=cpu_thp_alloc())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        models = {"dense": copy.deepcopy(dense).to(device=device, dtype=dtype, memory_format=fmt)}
        for b in usable:
            m = compressed if len(usable) == 1 else copy.deepcopy(compressed)
            models[b] = set_backend(m.to(device=device, dtype=dtype, memory_format=fmt), b)
        for bs in batch_sizes:
            x = torch.randn(bs, *input_shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            with torch.inference_mode():
                steps = {}
                for key, m in models.items():
                    try:
                        steps[key] = make_step(m, x, compile=compile, cuda_graphs=cuda_graphs)
                        step_times(steps[key], warmup=1, iters=0, device=device)  # fails here, not mid-run
                    except (RuntimeError, ValueError) as exc:
                        if key == "dense":
                            raise
                        log(f"skipped: backend {key} at {dtype_name}, batch {bs}: {str(exc).splitlines()[0]}")
                        steps.pop(key, None)
                times = time_interleaved(steps, warmup=warmup, iters=iters, device=device)
            dense_ms = None
            for key, ts in times.items():
                variant = "dense" if key == "dense" else "compressed"
                median, p20, p80 = quantiles_ms(ts)
                row = {"model": model_name, "variant": variant, "backend": "torch" if key == "dense" else key,
                       "dtype": dtype_name, "batch_size": bs, "img_size": input_shape[-1],
                       "infer_samples_per_sec": round(1e3 * bs / median, 2),
                       "infer_step_time": round(median, 4),
                       "step_time_p20": round(p20, 4), "step_time_p80": round(p80, 4),
                       "param_count": round(params[variant] / 1e6, 4), "params": params[variant],
                       "infer_gmacs": round(flops[variant] / 2e9, 4), **common}
                if key == "dense":
                    dense_ms = median
                else:
                    row.update(realized(dense_ms, median, flops["dense"], flops["compressed"]))
                    row["weight_bytes_ratio"] = round(params["dense"] / params["compressed"], 4)
                rows.append(row)
                log(format_row(row))
    return rows


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def format_row(row: dict) -> str:
    ratios = ""
    if row["variant"] == "compressed":
        ratios = (f"  speedup {row['speedup']:.2f}x of {row['theoretical_speedup']:.2f}x "
                  f"(realized {row['realized_fraction']:.2f})")
    return (f"{row['variant']:<10} {row['backend']:<6} {row['dtype']:<4} bs {row['batch_size']:<4} "
            f"{row['infer_step_time']:10.3f} ms [{row['step_time_p20']:.3f}, {row['step_time_p80']:.3f}] "
            f"{row['infer_samples_per_sec']:10.1f}/s  {row['param_count']:.4g}M params "
            f"{row['infer_gmacs']:.4g} GMACs{ratios}")


def write_rows(rows: list[dict], out: str | Path, *, csv_too: bool = False, plot: bool = True) -> list[Path]:
    """``out`` (the contract's JSON), ``out.csv`` on request and ``out.png``; each written atomically."""
    out = Path(out)
    written = [out]
    write_json(out, {"format": BENCH_FORMAT, "rows": rows})
    if csv_too:
        path = out.with_suffix(".csv")
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)
    if plot:
        path = out.with_suffix(".png")
        plot_speedup(rows, path)
        written.append(path)
    return written


def plot_speedup(rows: list[dict], path: str | Path) -> None:
    """Speedup against batch size per backend and dtype: measured (solid) beside the FLOP ratio (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = [r for r in rows if r["variant"] == "compressed"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = sorted({(r["backend"], r["dtype"]) for r in comp})
    for i, (backend, dtype) in enumerate(series):
        pts = sorted((r["batch_size"], r["speedup"], r["theoretical_speedup"]) for r in comp
                     if (r["backend"], r["dtype"]) == (backend, dtype))
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color,
                label=f"measured {backend} {dtype}")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=color, alpha=0.6,
                label=f"theoretical (FLOPs) {dtype}" if len(series) > 1 else "theoretical (FLOP ratio)")
    ax.axhline(1.0, color="gray", lw=0.8)
    if len({r["batch_size"] for r in comp}) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over dense")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if comp:
        ax.set_title(f"{comp[0]['model']} on {comp[0]['device']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def _csv_list(text: str, what: str, cast=str, choices: Sequence | None = None) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        values = None
    if not values or (choices is not None and any(v not in choices for v in values)):
        hint = f" (choose from {', '.join(map(str, choices))})" if choices else ""
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a comma-separated list{hint}")
    return values


def _models(args) -> tuple[nn.Module, nn.Module, str, tuple[int, int, int], dict]:
    """``(dense, compressed, model name, input size, extra row fields)`` from the command's options."""
    from .models import BUILTIN_MODELS, build_builtin, build_model

    if args.compressed:
        import json

        from .compress import load_compressed, load_plan

        path = Path(args.compressed)
        try:
            compressed = load_compressed(path)
            plan, config = load_plan(path / "plan.json"), json.loads((path / "config.json").read_text())
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        dense = dense_twin(compressed, plan, config)
        shape = args.input_size or input_size(dense, config["arch"], config)
        extra = {"compressed": str(path), "factored_layers": len(plan["layers"])}
        target = next((e["latency"] for e in plan["layers"].values() if "latency" in e), None)
        if target:  # a latency-aware plan (compress --target-device D --target-batch N)
            extra["latency_target"] = f"{target['device']}, batch {target['batch']}"
        return dense, compressed, config["arch"], shape, extra
    if args.param_ratio is not None:
        try:
            if args.model in BUILTIN_MODELS:
                dense = build_builtin(args.model).eval()
            else:
                dense, _ = build_model(args.model)
            compressed, _ = cut_to_ratio(dense, args.param_ratio, args.rank_multiple, args.model)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        shape = args.input_size or input_size(dense, args.model)
        return dense, compressed, args.model, shape, {"param_ratio": args.param_ratio,
                                                      "rank_multiple": args.rank_multiple}
    if args.model not in BUILTIN_MODELS:
        raise UsageError(f"--model {args.model}: give --param-ratio R for a synthetic cut, "
                         "or --compressed DIR")
    dense, compressed, _ = compress_builtin(args.model, args.energy)
    shape = args.input_size or input_size(dense, args.model)
    return dense, compressed, args.model, shape, {"energy": args.energy}


def cmd_bench(args) -> int:

    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA device")
    if args.compressed and args.param_ratio is not None:
        raise UsageError("give --compressed DIR or --param-ratio R, not both")
    if args.warmup < 0 or args.iters < 1:
        raise UsageError("--warmup must be >= 0 and --iters >= 1")
    backends = list(BACKEND_CHOICES) if args.backend == ["all"] else args.backend
    dense, compressed, name, shape, extra = _models(args)
    keep_memory = device.type == "cpu" and not args.release_memory and keep_freed_memory()
    if device.type == "cpu" and not cpu_thp_alloc():
        print(THP_HINT)
    if device.type == "cpu":
        extra = {**extra, "malloc_keep_freed": keep_memory}
    out = Path(args.out or f"utilrank-out/bench-{name}.json")
    print(f"{name}: {count_params(dense):,} -> {count_params(compressed):,} parameters; "
          f"input {tuple(shape)}; {device_label(device)}; "
          f"{args.warmup} warm-up + {args.iters} timed steps, interleaved")
    try:
        rows = bench(dense, compressed, model_name=name, input_shape=shape, batch_sizes=args.batch_sizes,
                     dtypes=args.dtype, backends=backends, device=device, channels_last=args.channels_last,
                     compile=args.compile, cuda_graphs=args.cuda_graphs, warmup=args.warmup, iters=args.iters,
                     extra=extra)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    written = write_rows(rows, out, csv_too=args.csv, plot=not args.no_plot)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def add_parsers(sub) -> None:
    """Add the ``bench`` subcommand to ``utilrank``'s subparsers."""
    p = sub.add_parser("bench", help="time the dense and the compressed model side by side (timm-style rows)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in vit-digits | vgg-digits, or a timm model name with --param-ratio "
                        "(default: %(default)s, compressed in-process at --energy)")
    p.add_argument("--param-ratio", type=float, default=None, metavar="R",
                   help="synthetic cut: factor every Linear/Conv2d to keep R of its parameters "
                        "(random factors)")
    p.add_argument("--rank-multiple", type=int, default=16, metavar="N",
                   help="with --param-ratio: round each rank down to a multiple of N where that takes "
                        "<10%% off (default: %(default)s)")
    p.add_argument("--compressed", default=None, metavar="DIR", help="a folder written by utilrank compress")
    p.add_argument("--energy", type=float, default=0.99,
                   help="in-process compression of a built-in: the energy cut (default: %(default)s)")
    p.add_argument("--batch-sizes", type=lambda s: _csv_list(s, "--batch-sizes", int), default=[1, 8, 64],
                   help="comma-separated (default: 1,8,64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--dtype", type=lambda s: _csv_list(s, "--dtype", choices=tuple(DTYPES)), default=["fp32"],
                   help="comma-separated fp32,bf16,fp16 (default: fp32)")
    p.add_argument("--backend", type=lambda s: _csv_list(s, "--backend", choices=(*BACKEND_CHOICES, "all")),
                   default=["auto"], help="comma-separated auto,torch,triton,cuda, or all (default: auto); "
                                          "one the device cannot run is skipped with a message")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (convnets)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each step from a CUDA graph")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per model (default: %(default)s)")
    p.add_argument("--iters", type=int, default=40, help="timed steps per model (default: %(default)s)")
    p.add_argument("--input-size", type=lambda s: tuple(_csv_list(s, "--input-size", int)), default=None,
                   metavar="C,H,W", help="input size (default: the model's)")
    p.add_argument("--out", default=None, help="JSON file (default: utilrank-out/bench-MODEL.json); the plot "
                                               "goes beside it as .png")
    p.add_argument("--release-memory", action="store_true",
                   help="CPU: let glibc return freed memory to the OS between steps (by default it is kept "
                        "for reuse, as CUDA's caching allocator does, so large activations are not "
                        "page-faulted in again every step)")
    p.add_argument("--csv", action="store_true", help="also write the rows as CSV beside --out")
    p.add_argument("--no-plot", action="store_true", help="no speedup plot")
    p.set_defaults(func=cmd_bench)


__all__ = ["BENCH_FORMAT", "add_parsers", "bench", "compress_builtin", "cut_to_ratio", "dense_twin",
           "ratio_plan", "realized", "write_rows"]
