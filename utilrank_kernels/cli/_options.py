"""The command line's input: the error a bad input raises, the argparse types, the options several commands share
(the model, data and statistics-pass options, the layer globs and ``--stats``; ``--threads``), and the closing
line's list of the files written."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._folder import MANIFEST

DEFAULT_MODEL = "vit-digits"


class UsageError(Exception):
    """A problem with the command's input: printed as one line, exit status 2."""


def files_written(out: Path) -> str:
    """The files a finished folder holds, as the closing line lists them (the manifest last)."""
    names = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    return ", ".join([*names, MANIFEST] if (out / MANIFEST).is_file() else names)


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


def positive_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def add_common_options(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in vit-digits | vgg-digits, any timm model name, torchvision:NAME (a torchvision "
                        "classification model, weights from --checkpoint), or hf:DIR, a local Hugging Face model "
                        "folder (AutoModelForImageClassification / ...ForSequenceClassification where its config "
                        "has that head, else AutoModel; never downloads) (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="weights for --model: .safetensors, or a torch file loaded with weights_only=True")
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                   help="the checkpoint's classifier has other classes than --data: replace it by a new N-class "
                        "head (timm's reset_classifier), trained with the backbone frozen for --head-epochs before "
                        "the statistics pass")
    p.add_argument("--label-map", default=None, metavar="FILE",
                   help="keep the checkpoint's classifier on an ImageFolder --data: a JSON object of class folder "
                        "name -> the head's class index (folders named by index, 0..999, or by ImageNet WordNet id, "
                        "n01440764, need none); the dense accuracy is then the pretrained model's own")
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


def add_layer_options(p: argparse.ArgumentParser, command: str) -> None:
    """``--include`` / ``--exclude`` (globs on layer names) and ``--stats`` (a saved statistics file instead of a
    pass), shared by ``analyze`` and ``compress``."""
    verb = "analyze" if command == "analyze" else "factor"
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help=f"{verb} only layers whose name matches (fnmatch on the whole name, e.g. 'blocks.*.mlp.*'; "
                        "repeatable); a pattern that matches no layer is refused")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help=f"do not {verb} layers whose name matches (repeatable), e.g. --exclude head --exclude "
                        "'pooler.*'")
    p.add_argument("--stats", default=None, metavar="FILE",
                   help="a stats.safetensors from an earlier analyze or compress of the same --model, --checkpoint "
                        "and --data, instead of a new statistics pass" + (
                            " (a new --energy or layer selection costs no pass)" if command == "analyze" else ""))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for PyTorch and BLAS (default: 0, the libraries' defaults)")
