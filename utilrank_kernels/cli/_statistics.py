"""The commands' statistics pass: ``analysis.statistics_pass`` with the options' values, in the output folder."""

from __future__ import annotations

from .._folder import test_kill
from ..analysis.statistics_pass import ResumeError, statistics_pass
from ._options import UsageError


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
