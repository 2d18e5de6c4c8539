"""``--distill`` and ``--distill-temperature`` of ``compress``: a choice that does not exist, a temperature out of range
or with nothing to use it, a distillation with no fine-tuning or with the dense control, and losses the model or data
cannot give (labels with a temperature): each refused in one line before any statistics pass (the option conflicts
before any file is read), nothing written. The refusals of a text encoder (logits from an encoder, labels from
unlabelled text, ``--metric agreement``) are in tests/cli/test_hf.py: loading an HF model prints its progress."""

from __future__ import annotations

from pathlib import Path

from _data import make_imagefolder

from _bad import Bad

OUT = ("--out", "{tmp}/o")
TINY = ("compress", "--model", "test_vit", "--data", "{tmp}/img", "--engines", "eager", "--no-search", *OUT)


def images(tmp: Path) -> None:
    make_imagefolder(tmp / "img", per_class=2, size=16)


CASES = [
    Bad("distill-unknown-choice", ("compress", "--distill", "soft", *OUT), ("--distill", "invalid choice", "soft")),
    Bad("distill-without-finetuning", ("compress", "--distill", "logits", "--finetune-epochs", "0", *OUT),
        ("--distill logits", "--finetune-epochs 0")),
    Bad("distill-temperature-zero", ("compress", "--distill-temperature", "0", *OUT),
        ("--distill-temperature 0", "> 0")),
    Bad("distill-temperature-nan", ("compress", "--distill-temperature", "nan", *OUT),
        ("--distill-temperature nan", "> 0")),
    Bad("distill-temperature-negative", ("compress", "--distill-temperature", "-2", *OUT),
        ("--distill-temperature -2", "> 0")),
    Bad("distill-temperature-without-finetuning", ("compress", "--distill-temperature", "2", "--finetune-epochs", "0",
                                                   *OUT), ("--distill-temperature 2", "--finetune-epochs 0")),
    Bad("distill-temperature-with-labels", ("compress", "--distill", "off", "--distill-temperature", "2", *OUT),
        ("--distill-temperature 2", "--distill off")),
    Bad("distill-temperature-with-embedding", ("compress", "--distill", "embedding", "--distill-temperature", "2",
                                               *OUT), ("--distill-temperature 2", "--distill embedding")),
    Bad("distill-temperature-with-hidden", ("compress", "--distill", "hidden", "--distill-temperature", "2", *OUT),
        ("--distill-temperature 2", "--distill hidden")),
    Bad("distill-hidden-of-a-timm-model", (*TINY, "--finetune-epochs", "1", "--distill", "hidden"),
        ("--distill hidden", "not a Hugging Face model", "--distill logits"), setup=images),
    Bad("distill-with-dense-control", ("compress", "--distill", "logits", "--finetune-dense", *OUT),
        ("--finetune-dense", "--distill logits", "itself")),
    # found once the model and data are read, before the statistics pass
    Bad("distill-temperature-auto-labelled", (*TINY, "--finetune-epochs", "1", "--distill-temperature", "2"),
        ("--distill-temperature 2", "--distill auto", "labels"), setup=images),
]
