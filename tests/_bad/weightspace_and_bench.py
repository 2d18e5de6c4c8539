"""Weight-space inputs (``soup``, ``regions``, ``predict``, ``spectrum``) and ``bench`` options: NaN or Inf weights and
statistics named by file and tensor, a soup of one model, copies of one model where several are needed, files of
another architecture or not weights at all, options out of range, and a bench ``--out`` the rows could not be
written to. Each refused in one line before any training, evaluation or timing (the built-in's architecture is
built, never trained: the weight files are random ones written in ``setup``), nothing written."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from _bad import Bad
from utilrank_kernels.analysis import LayerStats, Statistics
from utilrank_kernels.models import build_builtin

QKV = "blocks.0.attn.qkv.weight"  # a tensor of the built-in ViT


def _state(seed: int, model: str = "vit-digits") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in build_builtin(model).state_dict().items()}


def weights(*names: str, bad: dict[str, float] | None = None, model: str = "vit-digits"):
    """Random built-in weights as ``NAME.safetensors`` (one seed per name); ``bad`` puts a NaN or Inf value in
    ``QKV`` of the named files; ``NAME=OTHER`` writes a copy of OTHER's file."""
    def setup(tmp: Path) -> None:
        for i, name in enumerate(names):
            if "=" in name:
                name, other = name.split("=")
                shutil.copyfile(tmp / f"{other}.safetensors", tmp / f"{name}.safetensors")
                continue
            state = _state(i, model)
            if bad and name in bad:
                state[QKV][3, 5] = bad[name]
            save_file(state, str(tmp / f"{name}.safetensors"))
    return setup


def files(*names: str) -> tuple[str, ...]:
    return tuple(f"{{tmp}}/{n}.safetensors" for n in names)


def both(*setups):
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)
    return setup


def truncated(tmp: Path) -> None:
    weights("w0")(tmp)
    data = (tmp / "w0.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])


def empty(tmp: Path) -> None:
    weights("w0", "w1", "w2")(tmp)
    (tmp / "empty.safetensors").write_bytes(b"")


def pickled(tmp: Path) -> None:
    """A torch file that needs unpickling code (an argparse.Namespace): refused by weights_only=True."""
    weights("w0")(tmp)
    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(2)}, tmp / "code.pt")


def folder(tmp: Path) -> None:
    weights("w0")(tmp)
    (tmp / "runs").mkdir()


def stats(value: float = 1.0, layer: str = "head", out_features: int = 10):
    """A statistics file of one 64-input layer; ``value`` on the covariance's diagonal (Inf: a broken pass)."""
    def setup(tmp: Path) -> None:
        cov = torch.eye(64, dtype=torch.float64)
        cov[7, 7] = value
        Statistics({layer: LayerStats(layer, "linear", 64, out_features, cov, 10)}, [], 1,
                   {"model": "vit-digits"}).save(tmp / "stats.safetensors")
    return setup


def a_file(tmp: Path) -> None:
    (tmp / "notes.txt").write_text("not a folder\n")


def a_folder(tmp: Path) -> None:
    (tmp / "rows.json").mkdir()


OUT = ("--out", "{tmp}/o")
CUT = ("bench", "--model", "vit-digits", "--param-ratio", "0.5", "--no-plot")

CASES = [
    # soup: NaN / Inf ingredients named by file and tensor, a soup of one, copies, files that are not the model's
    Bad("soup-nan-ingredient", ("soup", "--from", *files("w0", "nan"), *OUT),
        ("--from", "nan.safetensors", QKV, "1 NaN"), weights("w0", "nan", bad={"nan": float("nan")})),
    Bad("soup-inf-ingredient", ("soup", "--from", *files("w0", "w1", "inf"), *OUT),
        ("inf.safetensors", QKV, "1 Inf"), weights("w0", "w1", "inf", bad={"inf": float("inf")})),
    Bad("soup-nan-checkpoint", ("soup", "--checkpoint", *files("nan"), "--from", *files("w0", "w1"), *OUT),
        ("--checkpoint", "nan.safetensors", QKV), weights("nan", "w0", "w1", bad={"nan": float("nan")})),
    Bad("soup-of-one-file", ("soup", "--from", *files("w0"), *OUT), ("--from", "w0.safetensors", "at least 2"),
        weights("w0")),
    Bad("soup-of-two-copies", ("soup", "--from", *files("w0", "copy"), *OUT),
        ("w0.safetensors = ", "copy.safetensors", "same weights", "at least 2"), weights("w0", "copy=w0")),
    Bad("soup-of-one-trained-ingredient", ("soup", "--ingredients", "1", *OUT), ("--ingredients 1", "at least 2")),
    Bad("soup-of-unchanged-ingredients", ("soup", "--epochs", "0", *OUT), ("--epochs 0", "base model")),
    Bad("soup-ingredient-of-another-architecture", ("soup", "--from", *files("w0", "vgg"), *OUT),
        ("--from", "vgg.safetensors", "not weights of vit-digits"),
        both(weights("w0"), weights("vgg", model="vgg-digits"))),
    Bad("soup-missing-ingredient", ("soup", "--from", *files("w0", "gone"), *OUT), ("gone.safetensors", "no such file"),
        weights("w0")),
    Bad("soup-truncated-ingredient", ("soup", "--from", *files("w0", "cut"), *OUT), ("--from", "cut.safetensors"),
        truncated),
    Bad("soup-ingredient-needs-pickled-code", ("soup", "--from", *files("w0"), "{tmp}/code.pt", *OUT),
        ("--from", "code.pt", "refused"), pickled),
    Bad("soup-ingredient-is-a-folder", ("soup", "--from", *files("w0"), "{tmp}/runs", *OUT), ("runs", "is a folder"),
        folder),
    Bad("soup-compressed-lr-zero", ("soup", "--compressed-lr", "0", *OUT), ("--compressed-lr 0",)),
    # regions
    Bad("regions-of-identical-models", ("regions", "--from", *files("w0", "same"), *OUT),
        ("--from", "same weights", "at least 2"), weights("w0", "same=w0")),
    Bad("regions-nan-member", ("regions", "--from", *files("w0", "w1", "nan"), *OUT), ("nan.safetensors", QKV, "NaN"),
        weights("w0", "w1", "nan", bad={"nan": float("-inf")})),
    Bad("regions-files-of-another-model", ("regions", "--model", "vgg-digits", "--from", *files("w0", "w1"), *OUT),
        ("w0.safetensors", "not weights of vgg-digits"), weights("w0", "w1")),
    Bad("regions-unknown-layer", ("regions", "--from", *files("w0", "w1"), "--layer", "blocks.9.mlp", *OUT),
        ("--layer blocks.9.mlp", "no such layer"), weights("w0", "w1")),
    Bad("regions-groups-miscounted", ("regions", "--from", *files("w0", "w1"), "--groups", "a", *OUT),
        ("--groups", "1 labels for 2 files"), weights("w0", "w1")),
    Bad("regions-one-point-paths", ("regions", "--from", *files("w0", "w1"), "--points", "1", *OUT), ("--points 1",),
        weights("w0", "w1")),
    # predict
    Bad("predict-four-copies-of-one-file", ("predict", "--from", *files("w0", "a", "b", "w0"), *OUT),
        ("--from", "4 files", "1 different model", "at least 4"), weights("w0", "a=w0", "b=w0")),
    Bad("predict-nan-member", ("predict", "--from", *files("nan", "w1", "w2", "w3"), *OUT),
        ("--from {tmp}/nan.safetensors", QKV, "NaN"), weights("nan", "w1", "w2", "w3", bad={"nan": float("nan")})),
    Bad("predict-three-models", ("predict", "--from", *files("w0", "w1", "w2"), *OUT), ("3 files", "at least 4"),
        weights("w0", "w1", "w2")),
    Bad("predict-empty-file", ("predict", "--from", *files("w0", "w1", "w2", "empty"), *OUT),
        ("--from", "empty.safetensors"), empty),
    Bad("predict-unknown-metric", ("predict", "--metrics", "accuracy", *OUT), ("--metrics accuracy",)),
    # spectrum
    Bad("spectrum-nan-checkpoint", ("spectrum", "--checkpoint", *files("nan"), *OUT),
        ("--checkpoint", "nan.safetensors", QKV), weights("nan", bad={"nan": float("nan")})),
    Bad("spectrum-inf-statistics", ("spectrum", "--stats", "{tmp}/stats.safetensors", *OUT),
        ("--stats", "stats.safetensors", "head", "NaN or Inf"), stats(float("inf"))),
    Bad("spectrum-statistics-of-another-model", ("spectrum", "--stats", "{tmp}/stats.safetensors", *OUT),
        ("--stats", "head", "3 x 64"), stats(out_features=3)),
    Bad("spectrum-stats-and-weights-only", ("spectrum", "--stats", "{tmp}/stats.safetensors", "--weights-only", *OUT),
        ("--stats", "--weights-only"), stats()),
    Bad("spectrum-min-evals-one", ("spectrum", "--weights-only", "--min-evals", "1", *OUT), ("--min-evals 1",)),
    Bad("spectrum-max-evals-below-min", ("spectrum", "--weights-only", "--max-evals", "4", *OUT),
        ("--max-evals 4", "--min-evals")),
    # bench: options out of range and an --out the rows could not be written to, all before any timing
    Bad("bench-iters-zero", (*CUT, "--iters", "0", "--out", "{tmp}/r.json"), ("--iters",)),
    Bad("bench-max-seconds-zero", (*CUT, "--max-seconds", "0", "--out", "{tmp}/r.json"), ("--max-seconds 0",)),
    Bad("bench-out-under-a-file", (*CUT, "--out", "{tmp}/notes.txt/r.json"), ("--out", "notes.txt", "not a folder"),
        a_file),
    Bad("bench-out-is-a-folder", (*CUT, "--out", "{tmp}/rows.json"), ("--out", "rows.json", "is a folder"), a_folder),
    Bad("bench-out-not-json", (*CUT, "--out", "{tmp}/rows.csv", "--csv"), ("--out", "rows.csv", ".json")),
    Bad("bench-out-unwritable", (*CUT, "--out", "/proc/rows.json"), ("--out /proc/rows.json", "cannot write")),
    Bad("bench-fuse-mlps-without-folder", (*CUT, "--fuse-mlps", "--out", "{tmp}/r.json"), ("--fuse-mlps",)),
    Bad("bench-compressed-and-param-ratio", (*CUT, "--compressed", "{tmp}", "--out", "{tmp}/r.json"),
        ("--compressed", "--param-ratio")),
]
