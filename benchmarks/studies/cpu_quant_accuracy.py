"""The accuracy cost of low rank x quantization on the CPU (issue 26's table, trained models): the built-ins
``vit-digits`` and ``vgg-digits`` (trained, cached weights) dense and compressed to 50% / 35% of their parameters,
in fp32 / bf16 / dynamic int8, in eager and onnxruntime: top-1 on the digits test split, agreement with the dense
fp32 model, time at batch 8 against the dense fp32 eager model, bytes on disk.

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/run.py cpu-quant-accuracy --threads 1 --keep /tmp/cqa-keep  # the table
    python benchmarks/run.py cpu-quant-accuracy --quick                        # a smoke run: vit-digits, 50%, 1 epoch
    python benchmarks/run.py cpu-quant-accuracy --table FILE                   # the markdown table of a results file

A first run compresses and fine-tunes four models and fine-tunes two dense controls: 9 minutes on the shared
2-core EPYC at a load average of 4-8, most of it fine-tuning. ``--keep DIR`` saves the compressed models (and the
controls' scores) and reuses them on a later run: a rerun that only times and scores took 1.2 minutes there.
``--threads 1``: steps of 1-3 ms on a machine shared with other jobs time steadily on one thread, where two threads'
barriers stall (a two-thread run at a load average of 6 was bimodal and was not kept); the file is named by them.

Compression: ``compress_model(model, digits, CompressConfig(method="optimal", target_params=R,
finetune=TrainRecipe(epochs=E, augment=True)))``, the library's budget plan refined on the validation split, then
fine-tuned on the labels (``--epochs``, default 20: the command's recipe, lr 1e-3, weight decay 0.01, batch 64,
random 1-pixel shifts); the statistics and subspaces are computed once per model and reused for every R.

Each (parameters, dtype, engine) variant is built by ``cpu_quant_lowrank.variant_runner`` (int8:
``bench.modes.int8_torch`` for eager, onnxruntime's ``quantize_dynamic`` QInt8 on the checked export for
onnxruntime; bf16 only on a CPU with BF16 instructions, and not in onnxruntime's CPU provider: those are rows with
their reason), scored on the whole test split (``test_top1``; ``top1_agreement`` / ``logit_cosine``, the smallest
per-example cosine, against the dense fp32 eager model; ``own_top1_agreement`` / ``own_logit_cosine`` against the
same parameters in fp32 eager: the dtype's and engine's cost alone) and timed at batch 8 (the first 8 test images)
in one interleaved run per (model, engine) with the dense fp32 eager model (``timing.time_interleaved``).
``speedup_vs_dense_fp32`` is over that baseline; ``bytes_on_disk`` is the ONNX file or ``torch.save`` of the state
dict. Written to ``benchmarks/results/<device>_cpu-quant-accuracy[-quick].json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.studies.cpu_quant_lowrank import BASELINE, DTYPE_NAMES, variant_runner
from benchmarks.tools.rows import Row, environment, first_line, result_path, write_rows
from utilrank_kernels import CompressConfig, TrainRecipe, compress_model
from utilrank_kernels.bench.engines import make_step, quiet_cpu_compile
from utilrank_kernels.bench.modes import dtype_problem, engine_problem
from utilrank_kernels.data import load_data
from utilrank_kernels.export import agreement, first_output
from utilrank_kernels.measure import count_flops, count_params
from utilrank_kernels.models import build_model
from utilrank_kernels.timing import THP_HINT, Timing, cpu_thp_alloc, step_times, time_interleaved
from utilrank_kernels.train import evaluate

ENGINES = ("eager", "onnxruntime", "onnxruntime-opt")  # a compile engine has static shapes: no test-split pass
MODELS = ("vit-digits", "vgg-digits")
EVAL_BATCH = 64


def _list(text: str, cast=str) -> list:
    return [cast(t) for t in text.split(",") if t.strip()]


def compressed_models(name: str, ratios: list[float], epochs: int,
                      keep: Path | None = None) -> tuple[dict[float, nn.Module], object, dict]:
    """The trained built-in ``name`` (1.0) and its compressions to each ratio of its parameters; its data; the
    scores and seconds of each compression. ``keep``: a folder where each compressed model is saved (a pickled
    module) and taken from on a later run with the same model, ratio and epochs (a timing rerun on an idle
    machine without compressing again)."""
    dense, _ = build_model(name)
    data = load_data(None, dense)
    recipe = TrainRecipe(epochs=epochs, augment=True)
    models, info, stats, subspaces = {1.0: dense.eval()}, {}, None, None
    for ratio in ratios:
        kept = keep / f"{name}-{ratio:g}-{epochs}ep.pt" if keep else None
        if kept and kept.is_file():
            saved = torch.load(kept, weights_only=False)  # written by this study
            models[ratio], info[f"{ratio:g}"] = saved["model"].eval(), {**saved["info"], "kept": str(kept)}
            print(f"{name}: compressed to {ratio:g} of the parameters: taken from {kept}", flush=True)
            continue
        started = time.perf_counter()
        result = compress_model(dense, data, CompressConfig(method="optimal", target_params=ratio, finetune=recipe),
                                statistics=stats, subspaces=subspaces, arch=name, progress=False)
        stats, subspaces = result.statistics, result.subspaces
        models[ratio] = result.model.eval()
        info[f"{ratio:g}"] = {"params": count_params(result.model), "scores": result.scores,
                              "seconds": round(time.perf_counter() - started, 1)}
        if kept:
            kept.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": models[ratio], "info": info[f"{ratio:g}"]}, kept)
        print(f"{name}: compressed to {ratio:g} of the parameters ({count_params(result.model):,} of "
              f"{count_params(dense):,}) in {info[f'{ratio:g}']['seconds']:.0f} s; test top-1 "
              f"{result.scores['compressed']['test']:.2%} (dense {result.scores['dense']['test']:.2%})", flush=True)
    control = dense_control(name, dense, data, recipe, keep)
    return models, data, {"recipe": dataclasses.asdict(recipe), "method": "optimal", "compressions": info,
                          "dense_finetuned_test_top1": control}


def dense_control(name: str, dense: nn.Module, data, recipe: TrainRecipe, keep: Path | None) -> float:
    """Test top-1 of the dense model fine-tuned by the same recipe: the like-for-like control of a compressed
    model's accuracy (its fine-tuning alone can lift it above the dense model's)."""
    kept = keep / f"{name}-dense-{recipe.epochs}ep.json" if keep else None
    if kept and kept.is_file():
        return json.loads(kept.read_text())["test_top1"]
    started = time.perf_counter()
    tuned = recipe.run(copy.deepcopy(dense), data.train, desc="fine-tune the dense control").eval()
    top1 = round(evaluate(tuned, data.test), 4)
    if kept:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"test_top1": top1}))
    print(f"{name}: dense fine-tuned by the same recipe (control) in {time.perf_counter() - started:.0f} s: test top-1 "
          f"{top1:.2%}", flush=True)
    return top1


def _scores(forward, inputs: torch.Tensor, labels: torch.Tensor, dense: torch.Tensor, own: torch.Tensor) -> dict:
    """Test top-1 of ``forward`` over ``inputs`` (in batches), its agreement with the dense fp32 logits and with
    the same parameters' fp32 eager logits."""
    got = torch.cat([first_output(forward(inputs[i:i + EVAL_BATCH])).float()
                     for i in range(0, len(inputs), EVAL_BATCH)])
    to_dense, to_own = agreement(got, dense), agreement(got, own)
    return {"test_top1": round(float((got.argmax(-1) == labels).double().mean()), 4),
            "top1_agreement": to_dense["top1_agreement"], "logit_cosine": to_dense["logit_cosine"],
            "own_top1_agreement": to_own["top1_agreement"], "own_logit_cosine": to_own["logit_cosine"]}


def engine_rows(name: str, engine: str, models: dict[float, nn.Module], test: tuple[torch.Tensor, torch.Tensor],
                dtypes: list[str], flops: dict, args) -> list[Row]:
    """One interleaved run of the dense fp32 eager baseline and every variant of ``name`` in ``engine``, each
    scored on the test split first; its rows."""
    inputs, labels = test
    x = inputs[:args.batch].contiguous()
    shape = {"batch": args.batch, "input": list(x.shape[1:])}
    with torch.inference_mode():
        references = {r: torch.cat([m(inputs[i:i + EVAL_BATCH]).float() for i in range(0, len(inputs), EVAL_BATCH)])
                      for r, m in models.items()}
    steps, fields, rows = {BASELINE: make_step(models[1.0], x, engine="eager")}, {}, []
    problem = engine_problem(engine)
    started = time.perf_counter()
    with (tempfile.TemporaryDirectory(prefix="cpu-quant-accuracy-") as folder,
          quiet_cpu_compile(engine, torch.device("cpu"))):
        for ratio, model in models.items():
            for dtype in dtypes:
                key = f"{ratio:g} {dtype} {engine}"
                extra = {"param_ratio": ratio, "engine": engine, "params": count_params(model),
                         "param_fraction": round(count_params(model) / count_params(models[1.0]), 4)}
                why = problem or dtype_problem(dtype, torch.device("cpu"))
                try:
                    if why:
                        raise RuntimeError(why)
                    with torch.inference_mode():
                        step, _, forward, fields[key] = variant_runner(engine, model, dtype, x, folder)
                        step_times(step, warmup=1, iters=0)
                        fields[key] |= extra | _scores(forward, inputs, labels, references[1.0], references[ratio])
                    steps[key] = step
                except Exception as exc:  # a missing package or instruction set, an export error
                    print(f"{name} {key}: {first_line(exc)}", flush=True)
                    rows.append(Row(name, key, dtype, shape, None, extra=extra, error=why or first_line(exc)))
        print(f"{name} {engine}: {len(steps) - 1} variants built and scored in {time.perf_counter() - started:.0f} s;"
              f" timing {args.iters} interleaved rounds", flush=True)
        with torch.inference_mode():
            times = time_interleaved(steps, warmup=args.warmup, iters=args.iters, device=torch.device("cpu"),
                                     max_seconds=args.max_seconds)
    base = Timing.of(times.pop(BASELINE))
    dense_top1 = round(float((references[1.0].argmax(-1) == labels).double().mean()), 4)
    rows.insert(0, Row(name, BASELINE, "fp32", shape, base,
                       extra={"param_ratio": 1.0, "engine": "eager", "baseline_of": engine, "test_top1": dense_top1,
                              "params": count_params(models[1.0])}))
    for key, ts in times.items():
        f, timing = fields[key], Timing.of(ts)
        flop_ratio = flops[1.0] / flops[f["param_ratio"]]
        speedup = base.median / timing.median
        rows.append(Row(name, key, key.split()[1], shape, timing, {"dense_fp32": base},
                        {**f, "flop_ratio": round(flop_ratio, 4), "realized_fraction": round(speedup / flop_ratio, 4)}))
        print(f"{name:<11} {key:<26} {timing.median:8.3f} ms {speedup:5.2f}x  top-1 {f['test_top1']:.2%}  agreement "
              f"{f['top1_agreement']:.2%} (own {f['own_top1_agreement']:.2%})  {f['bytes_on_disk'] / 2**10:7.0f} KiB",
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of a results file's rows (each engine's run opens with its own dense fp32 eager
    baseline, which that run's speedups are over)."""
    lines = ["| model | params | dtype | engine | ms (p20-p80) | over dense fp32 eager | test top-1 | agreement with "
             "dense fp32 | bytes on disk |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["impl"] == BASELINE:
            lines.append(f"| {r['op']} | 100% | fp32 | eager: baseline of the {r['baseline_of']} run | {_ms(r)} | "
                         f"1.00x | {r['test_top1']:.2%} | 100% | |")
            continue
        params = f"{r['param_fraction']:.0%}" if "param_fraction" in r else f"{r['param_ratio']:.0%}"
        if r.get("error"):
            lines.append(f"| {r['op']} | {params} | {r['dtype']} | {r['engine']} | not run: {_reason(r['error'])} "
                         "| | | | |")
            continue
        lines.append(f"| {r['op']} | {params} | {r['dtype']} | {r['engine']} | {_ms(r)} | "
                     f"{r['speedup_vs_dense_fp32']:.2f}x | {r['test_top1']:.2%} | {r['top1_agreement']:.2%} | "
                     f"{r['bytes_on_disk']:,} |")
    return "\n".join(lines)


def accuracy_costs(rows: list[dict]) -> list[str]:
    """Per compressed model, each quantized variant's test top-1 against the same parameters in fp32 eager and
    against the dense fp32 model, in percentage points (one test example is 100 / len(test) of them)."""
    top1 = {(r["op"], r["impl"]): r["test_top1"] for r in rows if r.get("test_top1") is not None}
    lines = []
    for r in rows:
        if r.get("error") or r["impl"] == BASELINE or r["dtype"] == "fp32":
            continue
        own = top1.get((r["op"], f"{r['param_ratio']:g} fp32 eager"))
        dense = top1.get((r["op"], BASELINE))
        if own is None or dense is None:
            continue
        lines.append(f"{r['op']} {r['param_ratio']:.0%} params, {r['dtype']} {r['engine']}: test top-1 "
                     f"{r['test_top1']:.2%}, {100 * (r['test_top1'] - own):+.2f} pp against the same parameters in "
                     f"fp32 eager ({own:.2%}), {100 * (r['test_top1'] - dense):+.2f} pp against dense fp32 "
                     f"({dense:.2%}); {r['speedup_vs_dense_fp32']:.2f}x dense fp32 eager")
    return lines


def controls(compressions: dict) -> list[str]:
    return [f"{name}: the dense model fine-tuned by the same recipe (the control): test top-1 "
            f"{c['dense_finetuned_test_top1']:.2%}" for name, c in compressions.items()
            if c.get("dense_finetuned_test_top1") is not None]


def _reason(error: str, limit: int = 90) -> str:
    text = error.replace("|", "/")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _ms(r: dict) -> str:
    return f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_list, default=list(MODELS))
    p.add_argument("--ratios", type=lambda s: _list(s, float), default=[0.5, 0.35])
    p.add_argument("--dtypes", type=_list, default=list(DTYPE_NAMES))
    p.add_argument("--engines", type=_list, default=["eager", "onnxruntime"])
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default: the command's %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=200, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="per (model, engine) interleaved run")
    p.add_argument("--threads", type=int, default=None, help="torch's and onnxruntime's threads (default: torch's; "
                   "1 times ms-sized steps steadily on a shared machine; the result file is named by it)")
    p.add_argument("--quick", action="store_true", help="vit-digits at 50%%, 1 fine-tuning epoch, 5 rounds")
    p.add_argument("--out", default=None)
    p.add_argument("--keep", default=None, metavar="DIR", help="save the compressed models there; reuse them on a "
                   "later run (same models, ratios, epochs): a timing rerun without compressing again")
    p.add_argument("--table", default=None, metavar="FILE", help="print the markdown table of a results file")
    args = p.parse_args(argv)
    if args.table:
        doc = json.loads(Path(args.table).read_text())
        print(table(doc["rows"]))
        print("\n".join(accuracy_costs(doc["rows"]) + controls(doc.get("compressions", {}))))
        return 0
    if args.quick:
        args.models, args.ratios, args.epochs, args.warmup, args.iters = ["vit-digits"], [0.5], 1, 1, 5
    unknown = ([e for e in args.engines if e not in ENGINES] + [d for d in args.dtypes if d not in DTYPE_NAMES]
               + [m for m in args.models if m not in MODELS])
    if unknown:
        p.error(f"unknown engine, dtype or model {unknown[0]!r}")
    if args.threads:
        torch.set_num_threads(args.threads)  # onnxruntime_session takes torch's
    if not cpu_thp_alloc():
        print(THP_HINT)
    torch.manual_seed(0)
    started, load_before = time.time(), os.getloadavg()[0]
    print(f"{', '.join(args.models)}, batch {args.batch}, {torch.get_num_threads()} threads; load average "
          f"{load_before:.2f}", flush=True)
    rows, compressions = [], {}
    for name in args.models:
        models, data, compressions[name] = compressed_models(name, args.ratios, args.epochs,
                                                             Path(args.keep) if args.keep else None)
        inputs = torch.stack([data.test[i][0] for i in range(len(data.test))])
        labels = torch.tensor([int(data.test[i][1]) for i in range(len(data.test))])
        flops = {r: count_flops(m, inputs[:1]) for r, m in models.items()}
        for engine in args.engines:
            rows += engine_rows(name, engine, models, (inputs, labels), args.dtypes, flops, args)
    command = "python benchmarks/run.py cpu-quant-accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    out = result_path("cpu-quant-accuracy" + ("-quick" if args.quick else ""), "cpu", args.out)
    write_rows(out, "cpu-quant-accuracy", rows, environment("cpu"), models=args.models, command=command.strip(),
               script="benchmarks/studies/cpu_quant_accuracy.py", compressions=compressions,
               loadavg_before=round(load_before, 2), loadavg_after=round(os.getloadavg()[0], 2))
    print(table([r.as_dict() for r in rows]))
    print("\n".join(accuracy_costs([r.as_dict() for r in rows]) + controls(compressions)))
    print(f"wrote {out} in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
