"""Pretrained models on the user's data: ``--label-map`` files that are not maps of class folders to a head's
indices, class folders named by an index beyond the head, ``--label-map`` where there is no head to keep or beside
``--num-classes``, model names that are neither built-in, timm, torchvision nor ``hf:DIR``, and a 1000-class
checkpoint on folders that name none of its classes."""

from __future__ import annotations

import json
from pathlib import Path

import timm
from _data import make_imagefolder
from safetensors.torch import save_file

from _bad import Bad

ANALYZE = ("analyze", "--out", "{tmp}/o")
KEEP = ("--model", "test_vit", "--checkpoint", "{tmp}/in1k.safetensors", "--data", "{tmp}/data")
MAP = ("--label-map", "{tmp}/map.json")


def pretrained(classes=("cat", "dog", "fox"), label_map=None):
    """A 1000-class test_vit checkpoint, a small ImageFolder of ``classes`` and, where given, ``map.json`` (text
    written as is, anything else as JSON)."""
    def setup(tmp: Path) -> None:
        save_file(timm.create_model("test_vit", pretrained=False, num_classes=1000).state_dict(),
                  str(tmp / "in1k.safetensors"))
        make_imagefolder(tmp / "data", classes=classes, per_class=1, size=16)
        if label_map is not None:
            text = label_map if isinstance(label_map, str) else json.dumps(label_map)
            (tmp / "map.json").write_text(text)
    return setup


FULL = {"cat": 281, "dog": 207, "fox": 277}

CASES = [
    Bad("label-map-not-json", (*ANALYZE, *KEEP, *MAP), ("--label-map", "map.json", "not JSON"),
        pretrained(label_map="{cat: 1")),
    Bad("label-map-a-list", (*ANALYZE, *KEEP, *MAP), ("--label-map", "expected an object", "an array"),
        pretrained(label_map=[281, 207, 277])),
    Bad("label-map-negative-index", (*ANALYZE, *KEEP, *MAP), ("--label-map", "field dog", ">= 0", "-1"),
        pretrained(label_map={**FULL, "dog": -1})),
    Bad("label-map-index-a-string", (*ANALYZE, *KEEP, *MAP), ("--label-map", "field fox", "an integer", 'got "277'),
        pretrained(label_map={**FULL, "fox": "277"})),
    Bad("label-map-without-a-folder", (*ANALYZE, *KEEP, *MAP), ("--label-map", "'fox'", "not in it", "1 of 3"),
        pretrained(label_map={"cat": 281, "dog": 207})),
    Bad("label-map-beyond-the-head", (*ANALYZE, *KEEP, *MAP), ("--label-map", "'fox' -> 1000", "1000 classes"),
        pretrained(label_map={**FULL, "fox": 1000})),
    Bad("label-map-no-such-file", (*ANALYZE, *KEEP, "--label-map", "{tmp}/none.json"),
        ("--label-map {tmp}/none.json", "no such file"), pretrained()),
    Bad("label-map-and-num-classes", (*ANALYZE, *KEEP, *MAP, "--num-classes", "3"),
        ("--label-map", "--num-classes 3", "give one"), pretrained(label_map=FULL)),
    Bad("label-map-without-checkpoint", (*ANALYZE, "--model", "test_vit", "--data", "{tmp}/data", *MAP),
        ("--label-map", "none to keep", "--checkpoint"), pretrained(label_map=FULL)),
    Bad("label-map-on-digits", (*ANALYZE, "--model", "test_vit", "--data", "digits", *MAP),
        ("--label-map", "the digits have their own 10 classes"), pretrained(label_map=FULL)),
    Bad("class-index-beyond-the-head", (*ANALYZE, *KEEP), ("'1000'", "beyond the head's 1000 classes",
                                                          "--label-map", "--num-classes"),
        pretrained(classes=("0", "17", "1000"))),
    Bad("folders-naming-no-class-of-the-head", (*ANALYZE, *KEEP), ("1000-class classifier", "--num-classes 3",
                                                                  "--label-map"), pretrained()),
    Bad("model-name-unknown", (*ANALYZE, "--model", "no_such_net", "--data", "{tmp}/data"),
        ("--model no_such_net", "timm.list_models()", "torchvision:NAME", "hf:DIR"), pretrained()),
    Bad("torchvision-name-unknown", (*ANALYZE, "--model", "torchvision:no_such_net", "--data", "{tmp}/data"),
        ("--model torchvision:no_such_net", "list_models(module=torchvision.models)"), pretrained()),
    Bad("torchvision-on-the-digits", (*ANALYZE, "--model", "torchvision:resnet18", "--data", "digits"),
        ("--data digits", "3-channel")),
]
