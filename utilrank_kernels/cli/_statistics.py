"""The commands' statistics: ``analysis.statistics_pass`` with the options' values, in the output folder, or a saved
file (``--stats``) checked against the run's model, checkpoint and data."""

from __future__ import annotations

from pathlib import Path

import torch

from .._folder import test_kill
from ..analysis import Statistics
from ..analysis.statistics_pass import ResumeError, statistics_pass
from ._options import UsageError


def read_statistics(args, device: torch.device) -> Statistics | None:
    """``--stats FILE``, read before the model loads: refused where it is not a statistics file, or its header says
    another ``--model`` or ``--checkpoint`` made it."""
    if not args.stats:
        return None
    try:
        stats = Statistics.load(args.stats, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--stats {args.stats}: {str(exc).removeprefix(f'statistics {args.stats}: ')}") from exc
    if stats.meta.get("model") is not None and not same_model(stats.meta["model"], args.model):
        raise UsageError(f"--stats {args.stats}: collected on --model {stats.meta['model']}, not {args.model}")
    recorded = (stats.meta.get("pass") or {}).get("checkpoint", args.checkpoint)
    if not _same_file(recorded, args.checkpoint):
        said = lambda path: f"--checkpoint {path}" if path else "no --checkpoint"  # noqa: E731
        raise UsageError(f"--stats {args.stats}: collected with {said(recorded)}, this run has {said(args.checkpoint)}"
                         ": other weights have other output statistics")
    return stats


def same_model(a: str, b: str) -> bool:
    """Whether two ``--model`` values name one model (``hf:DIR`` given by another path to the same folder too)."""
    if a == b:
        return True
    return a.startswith("hf:") and b.startswith("hf:") and Path(a[3:]).resolve() == Path(b[3:]).resolve()


def _same_file(a: str | None, b: str | None) -> bool:
    return a == b or (a is not None and b is not None and Path(a).resolve() == Path(b).resolve())


def check_statistics(args, model, data, stats: Statistics | None) -> None:
    """The ``--stats`` file fits the loaded model's layers and was collected on the same ``--data``."""
    if stats is None:
        return
    try:
        stats.check_model(model)
    except ValueError as exc:
        raise UsageError(f"--stats {args.stats}: {exc}") from exc
    recorded = stats.meta.get("dataset")
    if recorded and recorded != data.name:
        raise UsageError(f"--stats {args.stats}: collected on --data {recorded}, this run has --data {data.name}; "
                         "give the data the statistics came from")


def collect_statistics(args, model, data, device, folder, rank: int, world: int):
    """The commands' statistics pass (``analysis.statistics_pass``) in the output folder, with the options' values;
    a checkpoint that cannot be resumed is a usage error naming the option."""
    try:
        stats = statistics_pass(
            model, data.train, folder.partial, batch_size=args.batch_size, device=device, model_name=args.model,
            dataset_name=data.name, model_checkpoint=args.checkpoint, resume=args.resume,
            max_batches=args.max_batches, checkpoint_every=args.checkpoint_every, stats_on_cpu=args.stats_on_cpu,
            overlap=False if args.no_overlap else None, num_workers=args.num_workers, rank=rank, world=world,
        )
    except ResumeError as exc:
        raise UsageError(f"--{exc.parameter.replace('_', '-')}: {exc.reason}") from exc
    test_kill("after-statistics")
    return stats
