"""What the ``utilrank`` commands share: usage errors, the device option, torchrun setup, the model and
data options, and the statistics pass with its checkpoints."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from .. import env

DEFAULT_MODEL = "vit-digits"


class UsageError(Exception):
    """A problem with the command's input: printed as one line, exit status 2."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def init_distributed() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1), join the process group; returns (rank, world_size)."""
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def load_model_and_data(args, device: torch.device):
    """The model (built-in or timm, with ``--checkpoint``) and its data splits."""
    from ..data import load_data
    from ..models import BUILTIN_MODELS, build_model

    try:
        if args.model in BUILTIN_MODELS:
            if args.data not in (None, "digits"):
                raise ValueError(f"--model {args.model} is built for the digits data (1x16x16); "
                                 f"with --data {args.data} use a timm model name")
            model, config = build_model(args.model, args.checkpoint, device=str(device))
            data = load_data(args.data, model)
        else:
            if args.data in (None, "digits"):
                data = load_data(args.data)
                shape = {"in_chans": data.in_chans, "img_size": data.img_size}
            else:  # timm's eval transforms come from the model's config: a meta-device copy is enough
                with torch.device("meta"):
                    probe, _ = build_model(args.model)
                data, shape = load_data(args.data, probe), {}
            model, config = build_model(args.model, args.checkpoint, num_classes=data.num_classes, **shape)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(str(exc).strip("'\"")) from exc
    return model.to(device), config, data


def _stream_loader(dataset, batch_size: int, start_batch: int, rank: int, world: int, workers: int) -> DataLoader:
    """A fixed-order loader over this process's shard, starting after ``start_batch`` batches."""
    indices = list(range(rank, len(dataset), world))[start_batch * batch_size :]
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers)


def collect_statistics(args, model, data, device, out: Path, rank: int, world: int):
    """The statistics pass of ``analyze`` and ``compress``, with checkpoints and resume."""
    from ..analysis import Statistics, collect_stats

    suffix = f".rank{rank}" if world > 1 else ""
    ckpt = out / f"stats.ckpt{suffix}.safetensors"
    resume = None
    if args.resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
        resume = Statistics.load(ckpt, device="cpu" if args.stats_on_cpu else device)
        if rank == 0:
            print(f"resuming after {resume.batches} batches from {ckpt}")
    start = resume.batches if resume else 0
    loader = _stream_loader(data.train, args.batch_size, start, rank, world, args.num_workers)
    n_batches = start + len(loader)
    if args.checkpoint_every and args.checkpoint_every < 0:
        raise UsageError("--checkpoint-every must be a positive number of batches")
    stats = collect_stats(
        model, loader, device=device, stats_on_cpu=args.stats_on_cpu, max_batches=args.max_batches,
        resume=resume, skip_resumed=False, checkpoint_path=ckpt, checkpoint_every=args.checkpoint_every,
        progress=rank == 0, meta={"model": args.model, "dataset": data.name}, total=n_batches,
        overlap=False if args.no_overlap else None,
    )
    if rank == 0:
        stats.save(out / "stats.safetensors")
    if ckpt.exists():
        ckpt.unlink()
    return stats


def add_common_options(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in vit-digits | vgg-digits, or any timm model name (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="weights for --model: .safetensors, or a torch file loaded with weights_only=True")
    p.add_argument("--data", default=None,
                   help="'digits' (built-in, default) or an ImageFolder directory (DIR/train + DIR/val, or one "
                        "folder split 70/15/15)")
    p.add_argument("--energy", type=float, default=0.99,
                   help="fraction of each covariance's trace the kept eigenvectors must hold (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="batch size of the statistics pass (default: %(default)s)")
    p.add_argument("--max-batches", type=int, default=None, help="stop the statistics pass after N batches")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write the statistics to OUT/stats.ckpt.safetensors every N batches (0: never)")
    p.add_argument("--resume", action="store_true", help="continue the statistics pass from OUT's checkpoint")
    p.add_argument("--stats-on-cpu", action="store_true", help="keep the fp64 accumulators in host memory")
    p.add_argument("--no-overlap", action="store_true",
                   help="on CPU, run the covariance updates in the forward's thread instead of a second thread "
                        "(each with half of torch's threads); needed only by models that modify a layer's "
                        "input in place after the layer")
    p.add_argument("--out", default=None, help=f"output folder (default: utilrank-out/{command}-MODEL)")


def positive_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """``--threads`` for PyTorch and for the BLAS under numpy (the spectra's fits), via threadpoolctl; 0
    (the default) keeps the libraries' defaults. (A default of 1 for the built-in models was needed while
    the statistics pass ran scipy's BLAS beside torch's threads; without it, 2 threads are as fast on 2
    cores: spectrum 15 s either way, soup 37 s against 40-46 s.)"""
    from threadpoolctl import threadpool_limits

    if threads < 0:
        raise UsageError(f"--threads {threads}: must be >= 0 (0: the libraries' defaults)")
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:  # a caller in the same process (a test, a notebook) gets its setting back
        torch.set_num_threads(before)


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for PyTorch and BLAS (default: 0, the libraries' defaults)")
