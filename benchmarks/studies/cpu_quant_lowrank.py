"""Low-rank x quantization on the CPU (issue 26's table): ViT-B/16 dense and at 50% / 35% of its parameters, in
fp32 / bf16 / dynamic int8, in each engine; every variant timed interleaved with the dense fp32 eager model.

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/run.py cpu-quant-lowrank            # the table: on an idle machine
    python benchmarks/run.py cpu-quant-lowrank --quick                           # a smoke run on timm's test_vit

Random weights (timing depends on the ranks, not on the values; agreement is with the dense model's own outputs):
``bench.cut_to_ratio`` factors every Linear/Conv2d at the rank keeping R of its parameters (multiple of 16, MLPs
fused). Per engine, one interleaved run (``timing.time_interleaved``: one step of each in turn, so a busy machine
slows all alike) of the dense fp32 eager model (the baseline) and every (parameters, dtype) variant in that engine:
``eager`` and ``compile-freeze`` (torch.compile with inductor's freezing) run the modules (int8:
``bench.modes.int8_torch``, torch.ao's dynamic int8 Linear, the factors as Linear pairs); ``onnxruntime`` and
``onnxruntime-opt`` run the checked export (int8: onnxruntime's ``quantize_dynamic``, QInt8). bf16 runs only on a CPU
with BF16 instructions; what cannot run is a row with its reason.

Rows (``benchmarks.tools.rows.Row``): time, ``speedup_vs_dense_fp32`` (over the dense fp32 eager model of the same
run), ``flop_ratio`` (dense FLOPs over the variant's), ``realized_fraction`` (speedup over FLOP ratio: above 1 where
the dtype adds to the cut), ``logit_cosine``/``top1_agreement`` against the dense fp32 model and
``own_logit_cosine`` against the same parameters in eager fp32 (the dtype's and engine's cost alone), and
``bytes_on_disk`` (the ONNX file; ``torch.save`` of the state dict). Written to
``benchmarks/results/<device>_cpu-quant-lowrank[-quick].json`` with the load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from benchmarks.tools.rows import Row, environment, first_line, result_path, write_rows
from utilrank_kernels.bench import cut_to_ratio, example_input, input_size
from utilrank_kernels.bench.engines import DTYPES, ONNX_ENGINES, make_step, onnxruntime_model, quiet_cpu_compile
from utilrank_kernels.bench.modes import COMPILE_SETTINGS, dtype_problem, engine_problem, int8_torch, state_bytes
from utilrank_kernels.export import agreement, first_output, quiet_logger, run_onnxruntime
from utilrank_kernels.measure import count_flops, count_params
from utilrank_kernels.timing import THP_HINT, Timing, cpu_thp_alloc, step_times, time_interleaved

ENGINES = ("eager", "compile-freeze", "onnxruntime", "onnxruntime-opt")
DTYPE_NAMES = ("fp32", "bf16", "int8")
BASELINE = "dense fp32 eager"


def _list(text: str, cast=str) -> list:
    return [cast(t) for t in text.split(",") if t.strip()]


def transformer_type(model: nn.Module) -> str | None:
    """The ``model_type`` of onnxruntime's transformer optimizer for an image model: ``vit`` where it has attention
    modules, None for a model without (a convnet)."""
    attention = any(isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
                    for m in model.modules())
    return "vit" if attention else None


def optimize_onnx(source: Path, path: Path, model_type: str) -> dict:
    """``source`` rewritten by onnxruntime's transformer optimizer (``model_type``; heads and width detected from
    the graph) into ``path``; the row fields: the settings and the fused node counts (those > 0). The study's
    ``onnxruntime-opt`` engine (no engine of ``utilrank bench``: it gave nothing measurable, docs/results.md)."""
    from onnxruntime.transformers.optimizer import optimize_model  # the deploy extra's onnxruntime

    with warnings.catch_warnings(), quiet_logger("onnxruntime.transformers"), quiet_logger(""):
        warnings.simplefilter("ignore")
        optimized = optimize_model(str(source), model_type=model_type, num_heads=0, hidden_size=0)
    fused = {op: int(n) for op, n in (optimized.get_fused_operator_statistics() or {}).items() if n}
    optimized.save_model_to_file(str(path))
    return {"onnx_optimizer": f"onnxruntime.transformers.optimizer model_type={model_type}",
            "onnx_fusions": dict(sorted(fused.items()))}


def variant_runner(engine: str, model: nn.Module, dtype: str, x32: torch.Tensor, folder: str):
    """(step on ``x32``, its output function, ``forward`` of any fp32 batch, row fields) of ``model`` (fp32) in
    ``engine`` at ``dtype``; raises where it cannot. ``forward`` (eager and onnxruntime engines: any batch size)
    is what ``cpu-quant-accuracy`` scores a test split with; a compile engine's is None (static shapes)."""
    torch_dtype = DTYPES.get(dtype, torch.float32)
    x = x32.to(torch_dtype)
    if engine in ONNX_ENGINES or engine == "onnxruntime-opt":
        rewrite = None
        if engine == "onnxruntime-opt":
            model_type = transformer_type(model)
            if model_type is None:
                raise ValueError("no attention modules: onnxruntime's transformer optimizer has no model_type")
            rewrite = functools.partial(optimize_onnx, model_type=model_type)
        example = example_input(tuple(x32.shape[1:]), 2, torch_dtype)
        session, fields = onnxruntime_model(copy.deepcopy(model).to(torch_dtype), example, folder, rewrite=rewrite,
                                            int8=dtype == "int8")
        return (make_step(session, x, engine="onnxruntime"), lambda: run_onnxruntime(session, x),
                lambda batch: run_onnxruntime(session, batch.to(torch_dtype)), fields)
    runner = int8_torch(model) if dtype == "int8" else copy.deepcopy(model).to(torch_dtype)
    step = make_step(runner, x, engine="compile-freeze" if engine == "compile-freeze" else "eager")
    fields = {"bytes_on_disk": state_bytes(runner)}
    if engine in COMPILE_SETTINGS:
        fields["compile_settings"] = COMPILE_SETTINGS[engine]
    forward = None if engine in COMPILE_SETTINGS else (lambda batch: runner(batch.to(torch_dtype)))
    return step, step, forward, fields


def engine_rows(engine: str, models: dict[float, nn.Module], dtypes: list[str], x: torch.Tensor, flops: dict,
                args) -> list[Row]:
    """One interleaved run of the dense fp32 eager baseline and every variant in ``engine``; its rows."""
    shape = {"batch": x.shape[0], "input": list(x.shape[1:])}
    steps, fields, rows = {BASELINE: make_step(models[1.0], x, engine="eager")}, {}, []
    with torch.inference_mode():
        references = {ratio: first_output(m(x)).float() for ratio, m in models.items()}
    problem = engine_problem(engine)
    with (tempfile.TemporaryDirectory(prefix="cpu-quant-lowrank-") as folder,
          quiet_cpu_compile("compile" if engine.startswith("compile") else engine, torch.device("cpu"))):
        for ratio, model in models.items():
            for dtype in dtypes:
                key = f"{ratio:g} {dtype} {engine}"
                extra = {"param_ratio": ratio, "engine": engine, "params": count_params(model)}
                why = problem or dtype_problem(dtype, torch.device("cpu"))
                try:
                    if why:
                        raise RuntimeError(why)
                    with torch.inference_mode():
                        step, output, _, fields[key] = variant_runner(engine, model, dtype, x, folder)
                        step_times(step, warmup=1, iters=0)  # compiles, fails here rather than mid-run
                        got = first_output(output()).float()
                    own, dense = agreement(got, references[ratio]), agreement(got, references[1.0])
                    fields[key] |= {**extra, "logit_cosine": dense["logit_cosine"],
                                    "top1_agreement": dense["top1_agreement"], "own_logit_cosine": own["logit_cosine"],
                                    "own_max_abs_error": own["max_abs_error"]}
                    steps[key] = step
                except Exception as exc:  # a missing package or instruction set, a compile or export error
                    print(f"{key}: {first_line(exc)}", flush=True)
                    rows.append(Row(args.model, key, dtype, shape, None, extra=extra,
                                    error=why or first_line(exc)))
        with torch.inference_mode():
            times = time_interleaved(steps, warmup=args.warmup, iters=args.iters, device=torch.device("cpu"),
                                     max_seconds=args.max_seconds)
    base = Timing.of(times.pop(BASELINE))
    rows.insert(0, Row(args.model, BASELINE, "fp32", shape, base, extra={"param_ratio": 1.0, "engine": "eager",
                                                                          "baseline_of": engine}))
    for key, ts in times.items():
        f = fields[key]
        timing = Timing.of(ts)
        flop_ratio = flops[1.0] / flops[f["param_ratio"]]
        speedup = base.median / timing.median
        row = Row(args.model, key, key.split()[1], shape, timing, {"dense_fp32": base},
                  {**f, "flop_ratio": round(flop_ratio, 4), "realized_fraction": round(speedup / flop_ratio, 4)})
        rows.append(row)
        print(f"{key:<32} {timing.median:10.2f} ms  {speedup:5.2f}x over dense fp32  cosine {f['logit_cosine']:.4f} "
              f"(own {f['own_logit_cosine']:.4f})  {f['bytes_on_disk'] / 2**20:8.1f} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--ratios", type=lambda s: _list(s, float), default=[0.5, 0.35])
    p.add_argument("--dtypes", type=_list, default=list(DTYPE_NAMES))
    p.add_argument("--engines", type=_list, default=list(ENGINES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="per engine's interleaved run")
    p.add_argument("--quick", action="store_true", help="timm's test_vit, batch 2, 2 rounds: a smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.warmup, args.iters, args.max_seconds = "test_vit", 2, 0, 2, None
    unknown = [e for e in args.engines if e not in ENGINES] + [d for d in args.dtypes if d not in DTYPE_NAMES]
    if unknown:
        p.error(f"unknown engine or dtype {unknown[0]!r}")
    if not cpu_thp_alloc():
        print(THP_HINT)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    shape = input_size(dense, args.model)
    models = {1.0: dense} | {r: cut_to_ratio(dense, r, 16, args.model)[0].eval() for r in args.ratios}
    x = example_input(shape, args.batch)
    flops = {r: count_flops(m, x[:1]) for r, m in models.items()}
    started, load_before = time.time(), os.getloadavg()[0]
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads; load average {load_before:.2f}")
    rows = []
    for engine in args.engines:
        rows += engine_rows(engine, models, args.dtypes, x, flops, args)
    out = result_path("cpu-quant-lowrank" + ("-quick" if args.quick else ""), "cpu", args.out)
    write_rows(out, "cpu-quant-lowrank", rows, environment("cpu"), model=args.model,
               script="benchmarks/studies/cpu_quant_lowrank.py", loadavg_before=round(load_before, 2),
               loadavg_after=round(os.getloadavg()[0], 2))
    print(f"wrote {out} in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
