"""What the ``utilrank`` commands share: usage errors, option types, the device option, torchrun setup, the
output folder, the model and data options, and the statistics pass with its checkpoints."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from .. import env
from .._folder import test_kill

DEFAULT_MODEL = "vit-digits"


class UsageError(Exception):
    """A problem with the command's input: printed as one line, exit status 2."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def output_folder(args, command: str):
    """The command's ``--out`` folder, checked before any compute: writable, and not a folder of results this
    run must not replace (``--force``). Files go to ``OUT.partial/`` until ``commit``."""
    from .._folder import FolderError, OutputFolder

    out = Path(args.out or f"utilrank-out/{command}-{Path(args.model.removeprefix('hf:')).name}")
    try:
        return OutputFolder(out, command, force=args.force, resume=getattr(args, "resume", False)).prepare()
    except FolderError as exc:
        raise UsageError(str(exc)) from exc


def commit(folder) -> Path:
    """Swap the finished folder into place; if that fails the results stay where the error says."""
    from .._folder import FolderError

    try:
        return folder.commit()
    except FolderError as exc:
        raise UsageError(str(exc)) from exc


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
    from ..measure import count_params
    from ..models import BUILTIN_MODELS, build_model

    new_head = getattr(args, "num_classes", None)
    # a line before the imports and the load (timm, scikit-learn: seconds on a small machine)
    print(f"loading --model {args.model}" + (f" and --data {args.data}" if args.data else "") + " ...", flush=True)
    try:
        if args.model.startswith("hf:"):
            model, config, data = _hf_model_and_data(args, new_head)
        elif args.data is not None and args.data.startswith("text:"):
            raise ValueError(f"--data {args.data}: text needs a tokenizer: give --model hf:DIR (a Hugging Face "
                             "model folder with one)")
        elif args.model in BUILTIN_MODELS:
            if args.data not in (None, "digits"):
                raise ValueError(f"--model {args.model} is built for the digits data (1x16x16); "
                                 f"with --data {args.data} use a timm model name")
            if new_head is not None:
                raise ValueError(f"--num-classes: the built-in {args.model} already has the digits' 10 classes")
            model, config = build_model(args.model, args.checkpoint, device=str(device))
            print(f"{args.model}: {count_params(model):,} parameters", flush=True)  # the data takes seconds more
            data = load_data(args.data, model)
        else:
            if args.data in (None, "digits"):
                data = load_data(args.data)
                shape = {"in_chans": data.in_chans, "img_size": data.img_size}
            else:  # timm's eval transforms come from the model's config: a meta-device copy is enough
                with torch.device("meta"):
                    probe, _ = build_model(args.model)
                data, shape = load_data(args.data, probe), {}
            if new_head is not None and new_head != data.num_classes:
                raise ValueError(f"--num-classes {new_head}: the data has {data.num_classes} classes")
            if new_head is not None and args.checkpoint is None:
                raise ValueError("--num-classes replaces a checkpoint's classifier: give --checkpoint")
            model, config = build_model(args.model, args.checkpoint, num_classes=data.num_classes,
                                        reset_head=new_head is not None, **shape)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(str(exc).strip("'\"")) from exc
    check_finite(model, f"--checkpoint {args.checkpoint}" if args.checkpoint else f"--model {args.model}")
    model = model.to(device)
    print(("" if args.model in BUILTIN_MODELS else f"{args.model}: {count_params(model):,} parameters; ")
          + f"data {data.name}: {len(data.train):,} train, {len(data.val):,} val, {len(data.test):,} test", flush=True)
    if config.get("head_reset"):  # a fresh classifier: trained first, so that the search measures a real model
        from ..models import hf
        from ..train import train_head

        epochs = getattr(args, "head_epochs", 5)
        print(f"--num-classes {new_head}: a new {new_head}-class head, trained {epochs} epochs with the backbone "
              "frozen")
        head = hf.classifier(model) if hf.is_hf_model(model) else model.get_classifier()
        train_head(model, data.train, head, epochs=epochs, device=device)
    elif new_head is not None:
        print(f"--num-classes {new_head}: the checkpoint's head already has {new_head} classes; kept")
    return model, config, data


def _hf_model_and_data(args, new_head: int | None):
    """``--model hf:DIR``: the folder's model with ``--data text:FILE`` (its tokenizer), an ImageFolder (its image
    processor) or the built-in digits (a model configured for 1x16x16 images)."""
    from ..data import load_data, load_imagefolder_splits, load_text_splits
    from ..data.text import DEFAULT_MAX_LENGTH
    from ..models import hf

    if args.checkpoint is not None:
        raise ValueError(f"--checkpoint: --model {args.model} loads the weights of its folder; give no --checkpoint")
    hf_config = hf.read_config(args.model)
    image_model = "num_channels" in hf_config and "image_size" in hf_config
    if args.data is None:
        raise ValueError(f"--model {args.model}: give --data: " + (
            "an ImageFolder directory (or digits for a 1x16x16 model)" if image_model else "text:FILE (one example "
            "per line)"))
    if args.data.startswith("text:"):
        if image_model:
            raise ValueError(f"--data {args.data}: --model {args.model} takes images, not text")
        max_length = min(hf_config.get("max_position_embeddings", DEFAULT_MAX_LENGTH), DEFAULT_MAX_LENGTH)
        if args.max_length is not None and args.max_length > hf_config.get("max_position_embeddings", args.max_length):
            raise ValueError(f"--max-length {args.max_length}: --model {args.model} has "
                             f"{hf_config['max_position_embeddings']} positions (max_position_embeddings)")
        data = load_text_splits(args.data, hf.tokenizer(args.model), args.max_length or max_length)
    elif args.data == "digits":
        shape = (hf_config.get("num_channels"), hf_config.get("image_size"))
        if shape != (1, 16):
            raise ValueError(f"--data digits: the digits are 1x16x16 images; --model {args.model} takes "
                             f"num_channels {shape[0]}, image_size {shape[1]}")
        data = load_data("digits")
    elif not image_model:
        raise ValueError(f"--data {args.data}: --model {args.model} takes text: give --data text:FILE")
    else:
        size = hf_config["image_size"]
        data = load_imagefolder_splits(args.data, transform=hf.image_transform(args.model),
                                       img_size=size if isinstance(size, int) else size[0])
    labels = hf.num_labels(hf_config)
    task = hf.task_of(hf_config.get("architectures"))
    if new_head is not None and new_head != data.num_classes:
        raise ValueError(f"--num-classes {new_head}: the data has {data.num_classes} classes")
    if task != "encoder" and data.num_classes and labels != data.num_classes and new_head is None:
        raise ValueError(f"--model {args.model} has a {labels}-class head ({task}), --data {args.data} has "
                         f"{data.num_classes} classes: give --num-classes {data.num_classes} to replace the head")
    model, config = hf.load_hf_model(args.model, num_labels=new_head)
    return model, config, data


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Refuse weights that hold NaN or Inf, naming the tensor (before they poison every statistic after it)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UsageError(f"{source}: {name} holds NaN or Inf")


def _stream_loader(dataset, batch_size: int, start_batch: int, rank: int, world: int, workers: int) -> DataLoader:
    """A fixed-order loader over this process's shard, starting after ``start_batch`` batches."""
    indices = list(range(rank, len(dataset), world))[start_batch * batch_size :]
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers)


def pass_identity(args, model, data, rank: int, world: int) -> dict:
    """What makes a statistics pass reproducible, recorded in its checkpoints: a resume must match it."""
    from ..layers import find_layers, layer_shape

    layers, _ = find_layers(model)
    return {"model": args.model, "checkpoint": args.checkpoint, "dataset": data.name,
            "examples": len(data.train), "batch_size": args.batch_size, "order": "dataset order, no shuffle",
            "shard": f"{rank} of {world}", "mask": "attention_mask" if data.name.startswith("text:") else "none",
            "layers": {n: [layer_shape(m).out_features, layer_shape(m).in_features] for n, m in layers.items()}}


def statistics_bytes(model: torch.nn.Module) -> int:
    """Bytes of the fp64 accumulators (and of ``stats.safetensors``) a pass over ``model`` holds."""
    from ..layers import find_layers, layer_shape

    return sum(8 * layer_shape(m).in_features ** 2 for m in find_layers(model)[0].values())


def collect_statistics(args, model, data, device, folder, rank: int, world: int):
    """The statistics pass of the commands, with checkpoints in the output folder and a checked resume."""
    from ..analysis import Statistics, collect_stats

    path = folder.path if hasattr(folder, "path") else (lambda name: Path(folder) / name)  # OutputFolder or a Path
    suffix = f".rank{rank}" if world > 1 else ""
    ckpt = path(f"stats.ckpt{suffix}.safetensors")
    identity = pass_identity(args, model, data, rank, world)
    resume = None
    if args.resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt} (nothing to resume; run without --resume)")
        try:
            resume = Statistics.load(ckpt, device="cpu" if args.stats_on_cpu else device)
        except ValueError as exc:
            raise UsageError(f"--resume: {exc}") from exc
        recorded = resume.meta.get("pass", {})
        for key, value in identity.items():
            if recorded.get(key) != value:
                what = "layers" if key == "layers" else f"{key} {recorded.get(key)!r}"
                now = "a model with other layers" if key == "layers" else repr(value)
                raise UsageError(f"--resume: the checkpoint {ckpt} was made with {what}, this run has {now}; "
                                 "rerun without --resume to start over")
        if rank == 0:
            print(f"resuming after {resume.batches} batches from {ckpt}")
    start = resume.batches if resume else 0
    loader = _stream_loader(data.train, args.batch_size, start, rank, world, args.num_workers)
    n_batches = start + len(loader)
    if args.max_batches is not None and args.max_batches <= start:
        raise UsageError(f"--max-batches {args.max_batches}: the checkpoint already holds {start} batches")
    stats = collect_stats(
        model, loader, device=device, stats_on_cpu=args.stats_on_cpu, max_batches=args.max_batches,
        resume=resume, skip_resumed=False, checkpoint_path=ckpt, checkpoint_every=args.checkpoint_every,
        progress=rank == 0, meta={"model": args.model, "dataset": data.name, "pass": identity}, total=n_batches,
        overlap=False if args.no_overlap else None,
    )
    if rank == 0:
        stats.save(path("stats.safetensors"))
    test_kill("after-statistics")
    if not hasattr(folder, "path") and ckpt.exists():
        ckpt.unlink()
    return stats


def add_common_options(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in vit-digits | vgg-digits, any timm model name, or hf:DIR, a local Hugging Face model "
                        "folder (AutoModelForImageClassification / ...ForSequenceClassification where its config "
                        "has that head, else AutoModel; never downloads) (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="weights for --model: .safetensors, or a torch file loaded with weights_only=True")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="the checkpoint's classifier has other classes than --data: replace it by a new N-class "
                        "head (timm's reset_classifier), trained with the backbone frozen for --head-epochs before "
                        "the statistics pass")
    p.add_argument("--head-epochs", type=positive_int, default=5,
                   help="with --num-classes: epochs of training the new head (default: %(default)s)")
    p.add_argument("--data", default=None,
                   help="'digits' (built-in, default) or an ImageFolder directory (DIR/train + DIR/val, or one "
                        "folder split 70/15/15); with --model hf:DIR also text:FILE, one example per line (a .tsv: "
                        "LABEL<TAB>TEXT), tokenized by the folder's tokenizer and split 70/15/15")
    p.add_argument("--max-length", type=positive_int, default=None, metavar="N",
                   help="--data text:FILE: truncate each line to N tokens (default: 128, or the model's "
                        "max_position_embeddings if fewer); lines are padded to the longest line of the file")
    p.add_argument("--energy", type=float, default=0.99,
                   help="fraction of each covariance's trace the kept eigenvectors must hold (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="batch size of the statistics pass (default: %(default)s)")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="stop the statistics pass after N batches")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="DataLoader workers (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="write the statistics to OUT.partial/stats.ckpt.safetensors every N batches (0: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted statistics pass from its checkpoint in OUT.partial/ (the same "
                        "model, data and --batch-size, or an error says what differs)")
    p.add_argument("--stats-on-cpu", action="store_true", help="keep the fp64 accumulators in host memory")
    p.add_argument("--no-overlap", action="store_true",
                   help="on CPU, run the covariance updates in the forward's thread instead of a second thread "
                        "(each with half of torch's threads); needed only by models that modify a layer's "
                        "input in place after the layer")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: utilrank-out/{command}-MODEL); written as a unit: files go to "
                        "OUT.partial/ and replace OUT only once all are written")
    p.add_argument("--force", action="store_true", help="replace an --out folder that already holds results")


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
