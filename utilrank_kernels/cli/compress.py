"""``utilrank compress``: factor every layer to its utilized rank (or a searched cut), fine-tune, save."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ._common import (
    UsageError,
    add_common_options,
    collect_statistics,
    init_distributed,
    load_model_and_data,
    resolve_device,
)


def _summary_table(summary: dict) -> str:
    d, p, c = summary["dense"], summary["projected"], summary["compressed"]
    lines = [
        f"{'':<18}{'dense':>14}{'compressed':>14}{'ratio':>9}",
        f"{'parameters':<18}{d['params']:>14,}{c['params']:>14,}{c['params'] / d['params']:>9.3f}",
        f"{'FLOPs / image':<18}{d['flops']:>14,}{c['flops']:>14,}{c['flops'] / d['flops']:>9.3f}",
        f"{'CPU ms (batch 32)':<18}{d['latency_ms']:>14.2f}{c['latency_ms']:>14.2f}"
        f"{c['latency_ms'] / d['latency_ms']:>9.3f}",
        f"{'test accuracy':<18}{d['accuracy']:>14.2%}{c['accuracy']:>14.2%}"
        f"{100 * (c['accuracy'] - d['accuracy']):>+8.2f}pp",
        f"projected ({summary['method']}, before fine-tuning): {p['accuracy']:.2%}; "
        f"fine-tuned {summary['finetune_epochs']} epochs: {c['accuracy']:.2%}; MLU {summary['mlu']:.3f}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    import copy

    from ..analysis import Statistics, analyze, format_table, write_report
    from ..compress import decompose, make_plan, name_filter, plan_ranks, save_compressed
    from ..measure import count_flops, count_params, latency_ms
    from ..train import evaluate, train

    if args.tolerance is not None and args.tolerance < 0:
        raise UsageError(f"--tolerance {args.tolerance}: must be >= 0 percentage points")
    if args.total_tolerance is not None and args.total_tolerance < 0:
        raise UsageError(f"--total-tolerance {args.total_tolerance}: must be >= 0 percentage points")
    if args.finetune_epochs < 0:
        raise UsageError("--finetune-epochs must be >= 0")
    rank, world = init_distributed()
    device = resolve_device(args.device)
    out = Path(args.out or f"utilrank-out/compress-{args.model}")
    started = time.perf_counter()
    model, config, data = load_model_and_data(args, device)
    if args.stats:
        try:
            stats = Statistics.load(args.stats, device=device)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
    else:
        stats = collect_statistics(args, model, data, device, out, rank, world)
    if rank != 0:
        return 0
    report, subspaces = analyze(model, stats, args.energy)
    val_accuracy = lambda m: evaluate(m, data.val, device=device)
    layers, dense = plan_ranks(model, report, subspaces, energy=args.energy, tolerance=args.tolerance,
                               total_tolerance=args.total_tolerance, evaluate=val_accuracy,
                               filter_fn=name_filter(args.include, args.exclude))
    if args.target_device:  # latency-aware plan, decided by timings measured on the target
        from ..compress.latency import latency_aware

        try:
            layers, dense = latency_aware(model, layers, dense, data.test[0][0][None], args.target_device,
                                          args.target_batch, progress=True)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    plan = make_plan(args.model, layers, dense, method=args.method,
                     tolerance=args.tolerance, total_tolerance=args.total_tolerance, energy=args.energy)
    compressed = decompose(model, subspaces, plan, method=args.method)
    dense_acc = evaluate(model, data.test, device=device)
    projected_acc = evaluate(compressed, data.test, device=device)
    projected_params, example = count_params(compressed), data.test[0][0][None].to(device)
    projected_flops = count_flops(compressed, example)
    if args.finetune_epochs:
        train(compressed, data.train, epochs=args.finetune_epochs, lr=args.lr, weight_decay=0.01,
              batch_size=64, augment=data.name == "digits", device=device, desc="fine-tune")
    compressed_acc = evaluate(compressed, data.test, device=device)
    bench_input = torch.stack([data.test[i % len(data.test)][0] for i in range(32)])
    latency = latency_ms({"dense": copy.deepcopy(model).cpu(), "compressed": copy.deepcopy(compressed).cpu()},
                         bench_input)
    summary = {
        "format": "utilrank.summary/1", "model": args.model, "dataset": data.name, "method": args.method,
        "dense": {"params": count_params(model), "flops": count_flops(model, example), "accuracy": dense_acc,
                  "latency_ms": latency["dense"]},
        "projected": {"params": projected_params, "flops": projected_flops, "accuracy": projected_acc},
        "compressed": {"params": count_params(compressed), "flops": count_flops(compressed, example),
                       "accuracy": compressed_acc,
                       "latency_ms": latency["compressed"]},
        "mlu": report["mlu"], "finetune_epochs": args.finetune_epochs,
    }
    report["dense"] = [{"name": n, "reason": r} for n, r in dense.items()]
    save_compressed(compressed, plan, config, out)
    write_report(report, out)
    from .._cache import write_json

    write_json(out / "summary.json", summary)
    print(format_table(report))
    print(f"factored {len(layers)} layers; kept dense: "
          + (", ".join(f"{n} ({r})" for n, r in dense.items()) or "none"))
    print(_summary_table(summary))
    print(f"wrote {out}/ (model.safetensors, plan.json, config.json, report.json, summary.json, "
          f"utilization.png) in {time.perf_counter() - started:.1f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="factor every layer to its utilized rank, fine-tune, save")
    add_common_options(p, "compress")
    p.add_argument("--tolerance", type=float, default=0.2,
                   help="rank search: per layer, the deepest cut whose projection alone costs at most PP "
                        "percentage points of validation accuracy (default: %(default)s); --tolerance -1 is "
                        "refused, use --no-search for the fixed --energy cut")
    p.add_argument("--total-tolerance", type=float, default=None, metavar="PP",
                   help="rank search: all cuts together may cost at most PP percentage points of validation "
                        "accuracy, else every layer backs off one candidate at a time (default: --tolerance "
                        "times the number of searched layers)")
    p.add_argument("--no-search", dest="tolerance", action="store_const", const=None,
                   help="no rank search: cut every layer at --energy")
    p.add_argument("--finetune-epochs", type=int, default=20,
                   help="epochs of fine-tuning the factored model on the train split (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default: %(default)s)")
    p.add_argument("--method", choices=("data", "svd"), default="data",
                   help="data: project on the data subspaces; svd: truncated SVD of W at the same ranks")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="factor only layers whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep layers whose name matches dense (repeatable), e.g. --exclude head")
    p.add_argument("--stats", default=None,
                   help="reuse a stats.safetensors from an earlier analyze instead of a new pass")
    p.add_argument("--target-device", choices=("cpu", "cuda"), default=None,
                   help="keep a layer dense where factoring is not faster on this device, and round ranks up "
                        "to tile multiples where that costs no time (measured; timings cached per device)")
    p.add_argument("--target-batch", type=int, default=32,
                   help="with --target-device: the batch size to be fast at (default: %(default)s)")
    p.set_defaults(func=run)
