"""``utilrank bench``: the dense and the compressed model timed side by side."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .._files import read_json
from ..bench import (
    BACKEND_CHOICES,
    BENCH_DTYPES,
    ENGINE_PACKAGES,
    ENGINES,
    TokenInput,
    bench,
    check_input_size,
    compress_builtin,
    cut_to_ratio,
    dense_twin,
    dtype_name,
    input_size,
    input_spec,
    write_rows,
)
from ..bench.output import check_out
from ..compress import Plan, load_compressed
from ..export import missing_packages
from ..measure import count_params
from ..models import BUILTIN_MODELS, build_builtin, build_model
from ..models.hf import KeywordInputs
from ..timing import THP_HINT, cpu_thp_alloc, device_label, keep_freed_memory
from ._options import DEFAULT_MODEL, UsageError, positive_int
from ._runtime import resolve_device


def _csv_list(text: str, cast=str, choices: Sequence | None = None) -> list:
    """argparse type: a comma-separated list (argparse's message names the option)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except argparse.ArgumentTypeError as exc:  # the item's own type says what it expected
        raise argparse.ArgumentTypeError(str(exc)) from None
    except ValueError:
        values = None
    if not values or (choices is not None and any(v not in choices for v in values)):
        hint = f" (choose from {', '.join(map(str, choices))})" if choices else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list{hint}")
    return values


def _input_shape(args, dense: nn.Module, spec, config: dict | None = None):
    """``--input-size`` checked against the model, or the model's own ``spec``."""
    if args.input_size is None:
        return spec
    try:
        return check_input_size(args.input_size, dense, spec, config)
    except ValueError as exc:
        raise UsageError(f"--input-size {','.join(map(str, args.input_size))}: {exc}") from exc


def _describe(shape) -> str:
    return shape.describe() if isinstance(shape, TokenInput) else str(tuple(shape))


def _models(args) -> tuple[nn.Module, nn.Module, str, tuple[int, int, int] | TokenInput, dict]:
    """``(dense, compressed, model name, input size, extra row fields)`` from the command's options."""
    if args.compressed:
        path = Path(args.compressed)
        try:
            compressed = load_compressed(path, fuse_mlps=args.fuse_mlps)
            plan, config = Plan.load(path / "plan.json"), read_json(path / "config.json", "config")
            dense = dense_twin(compressed, plan, config)
            spec = input_spec(dense, config)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        if isinstance(spec, TokenInput):  # a transformers text model: called with its input tensors by name
            if args.channels_last:
                raise UsageError(f"--channels-last: {path} holds a text model (channels_last is an image layout)")
            dense, compressed = KeywordInputs(dense), KeywordInputs(compressed)
        shape = _input_shape(args, dense, spec, config)
        extra = {"compressed": str(path), "factored_layers": len(plan.layers), "fused_mlps": args.fuse_mlps}
        target = next((e.latency for e in plan.layers.values() if e.latency), None)
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
        shape = _input_shape(args, dense, input_size(dense, args.model))
        return dense, compressed, args.model, shape, {"param_ratio": args.param_ratio,
                                                      "rank_multiple": args.rank_multiple}
    if args.model not in BUILTIN_MODELS:
        raise UsageError(f"--model {args.model}: give --param-ratio R for a synthetic cut, "
                         "or --compressed DIR")
    dense, compressed, _ = compress_builtin(args.model, args.energy)
    shape = _input_shape(args, dense, input_size(dense, args.model))
    return dense, compressed, args.model, shape, {"energy": args.energy}


def _check_out(out: Path, args) -> None:
    try:
        check_out(out, csv_too=args.csv, plot=not args.no_plot)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(args) -> int:
    if "int8" in args.dtype and args.device == "cuda":  # before the device is looked for
        raise UsageError("--dtype int8 on cuda: dynamic int8 quantization runs on the CPU only (--device cpu)")
    device = resolve_device(args.device)
    if "int8" in args.dtype and device.type != "cpu":
        raise UsageError(f"--dtype int8 on {device.type}: dynamic int8 quantization runs on the CPU only "
                         "(--device cpu)")
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA device")
    if args.compressed and args.param_ratio is not None:
        raise UsageError("give --compressed DIR or --param-ratio R, not both")
    if args.fuse_mlps and not args.compressed:
        raise UsageError("--fuse-mlps applies to --compressed DIR (the --param-ratio and --energy cuts are fused "
                         "already)")
    if args.warmup < 0 or args.iters < 1:
        raise UsageError("--warmup must be >= 0 and --iters >= 1")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise UsageError(f"--max-seconds {args.max_seconds}: must be > 0")
    missing = sorted({p for e in args.engine for p in missing_packages(ENGINE_PACKAGES.get(e, ()))})
    if missing:
        raise UsageError(f"--engine {','.join(args.engine)}: needs {', '.join(missing)}: pip install -e '.[deploy]'")
    if args.out:  # before the models are made or timed (the default path is checked once the name is known)
        _check_out(Path(args.out), args)
    backends = list(BACKEND_CHOICES) if args.backend == ["all"] else args.backend
    dense, compressed, name, shape, extra = _models(args)
    keep_memory = device.type == "cpu" and not args.release_memory and keep_freed_memory()
    if device.type == "cpu" and not cpu_thp_alloc():
        print(THP_HINT)
    if device.type == "cpu":
        extra = {**extra, "malloc_keep_freed": keep_memory}
    out = Path(args.out or f"utilrank-out/bench-{name}.json")
    _check_out(out, args)
    print(f"{name}: {count_params(dense):,} -> {count_params(compressed):,} parameters; "
          f"input {_describe(shape)}; {device_label(device)}; "
          f"{args.warmup} warm-up + {args.iters} timed steps, interleaved; engines {', '.join(args.engine)}")
    try:
        rows = bench(dense, compressed, model_name=name, input_shape=shape, batch_sizes=args.batch_sizes,
                     dtypes=args.dtype, backends=backends, engines=args.engine, device=device,
                     channels_last=args.channels_last, cuda_graphs=args.cuda_graphs, warmup=args.warmup,
                     iters=args.iters, max_seconds=args.max_seconds, extra=extra, log=print, tune=args.tune)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    written = write_rows(rows, out, csv_too=args.csv, plot=not args.no_plot)
    print("wrote " + ", ".join(map(str, written)))
    failed = [r for r in rows if "error" in r]
    if failed and not args.keep_going:
        print(f"utilrank bench: error: {len(failed)} configuration(s) failed (rows with 'error' in {out}): "
              f"{failed[0].get('engine', 'eager')} {failed[0]['backend']}: {failed[0]['error']}; "
              "--keep-going exits 0 anyway", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the dense and the compressed model side by side (timm-style rows)",
                       description="Time a dense model and its compressed form side by side (interleaved, so a busy "
                                   "machine slows both alike), in each --engine, and write timm-style rows: "
                                   "samples/s, step time with p20/p80, parameters, GMACs, and for compressed rows "
                                   "the speedup over dense, the FLOP ratio and the fraction of it realized. "
                                   "--compressed DIR times a utilrank compress folder against its dense twin (each "
                                   "factored layer multiplied back); --model M --param-ratio R a synthetic cut of "
                                   "every layer to R of its weights; no option the built-in compressed in-process.")
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
    p.add_argument("--fuse-mlps", action="store_true",
                   help="with --compressed: run each MLP whose two layers are factored as one fused op "
                        "(load_compressed(fuse_mlps=True); same outputs)")
    p.add_argument("--energy", type=float, default=0.99,
                   help="in-process compression of a built-in: the energy cut (default: %(default)s)")
    p.add_argument("--batch-sizes", type=lambda s: _csv_list(s, positive_int), default=[1, 8, 64],
                   help="comma-separated (default: 1,8,64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--dtype", type=lambda s: _csv_list(s, dtype_name, BENCH_DTYPES), default=["fp32"],
                   help="comma-separated fp32,bf16,fp16,int8 (default: fp32): int8 is dynamic quantization on the "
                        "CPU (int8 weights of every Linear and factor: torch.ao's quantize_dynamic in eager/compile, "
                        "onnxruntime's quantize_dynamic on the export); bf16 on a CPU without BF16 instructions gives "
                        "rows with that reason; rows carry each variant's agreement with eager fp32")
    p.add_argument("--backend", type=lambda s: _csv_list(s, choices=(*BACKEND_CHOICES, "all")),
                   default=["auto"], help="comma-separated auto,torch,triton,cuda, or all (default: auto); "
                                          "one the device cannot run is skipped with a message")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (convnets)")
    p.add_argument("--engine", type=lambda s: _csv_list(s, choices=ENGINES), default=["eager"],
                   help="comma-separated eager,compile,compile-freeze,onnxruntime (default: eager): compile is "
                        "torch.compile (inductor), compile-freeze the same with inductor's freezing; onnxruntime "
                        "runs each model's checked ONNX export (pip install -e '.[deploy]'); an engine that is "
                        "missing or fails gives rows with its error")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each step from a CUDA graph")
    p.add_argument("--tune", action="store_true",
                   help="CUDA: before each batch size's steps, time every factored op's candidates again (torch "
                        "with the cuBLASLt epilogue, Triton fused and split, the CUDA extension; an MLP's fused op "
                        "against two linears) and record the fastest in the cache (UTILRANK_CACHE/tune/), which "
                        "CUDA graphs and torch.compile then read; rows list each layer's backend either way")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per model (default: %(default)s)")
    p.add_argument("--iters", type=int, default=40, help="timed steps per model (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="end a configuration's timed rounds after S seconds (at least 5 rounds; default: all "
                        "--iters)")
    p.add_argument("--input-size", type=lambda s: tuple(_csv_list(s, positive_int)), default=None,
                   metavar="C,H,W|L", help="one input: C,H,W for an image model (the channels must be the model's), "
                   "or L tokens for a text model (default: the model's, from the folder's config.json)")
    p.add_argument("--out", default=None, help="JSON file (default: utilrank-out/bench-MODEL.json); the plot "
                                               "goes beside it as .png")
    p.add_argument("--release-memory", action="store_true",
                   help="CPU: let glibc return freed memory to the OS between steps (by default it is kept "
                        "for reuse, as CUDA's caching allocator does, so large activations are not "
                        "page-faulted in again every step)")
    p.add_argument("--csv", action="store_true", help="also write the rows as CSV beside --out")
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 even when a backend failed on some configuration (its rows carry the error)")
    p.add_argument("--no-plot", action="store_true", help="no speedup plot")
    p.set_defaults(func=run)
