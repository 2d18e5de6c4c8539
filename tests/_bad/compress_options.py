"""Conflicting and out-of-range options of ``compress`` and ``analyze``, plans and statistics files that do not fit the
run, layer globs that match nothing, and targets the architecture cannot reach: each refused in one line before any
statistics pass (most before any file is read), nothing written."""

from __future__ import annotations

from pathlib import Path

import torch
from _data import make_imagefolder

from _bad import Bad
from utilrank_kernels.analysis import LayerStats, Statistics
from utilrank_kernels.compress import LayerPlan, Plan

TINY = ("--model", "test_vit", "--data", "{tmp}/img", "--engines", "eager", "--finetune-epochs", "0")
OUT = ("--out", "{tmp}/o")


def images(tmp: Path) -> None:
    make_imagefolder(tmp / "img", per_class=2, size=16)


def plan_file(method: str = "optimal", arch: str = "test_vit", layer: str = "head"):
    def setup(tmp: Path) -> None:
        images(tmp)
        Plan(arch, {layer: LayerPlan("linear", 2)}, method=method).save(tmp / "plan.json")
    return setup


def stats_file(model: str = "test_vit", dataset: str | None = None, checkpoint: str | None = None):
    """A statistics file of test_vit's head (64 -> 3), as a pass records it."""
    def setup(tmp: Path) -> None:
        images(tmp)
        meta = {"model": model, "dataset": dataset or str(tmp / "img"), "pass": {"checkpoint": checkpoint}}
        head = LayerStats("head", "linear", 64, 3, torch.eye(64, dtype=torch.float64), 10)
        Statistics({"head": head}, [], 1, meta).save(tmp / "stats.safetensors")
    return setup


def not_statistics(tmp: Path) -> None:
    (tmp / "stats.safetensors").write_text('{"format": "utilrank.plan/1"}\n')


BERT = ("--model", "hf:{tmp}/bert", "--data", "text:{tmp}/lines.txt", "--metric", "cosine", "--finetune-epochs", "0",
        "--engines", "eager")

CASES = [
    # sizes that contradict how ranks are chosen (refused before any file is read)
    Bad("compress-target-with-plan", ("compress", "--target-params", "0.5", "--plan", "{tmp}/plan.json", *OUT),
        ("--target-params 0.5", "--plan", "drop one")),
    Bad("compress-target-with-tolerance", ("compress", "--target-params", "0.5", "--tolerance", "1", *OUT),
        ("--tolerance 1", "--target-params 0.5")),
    Bad("compress-target-with-total-tolerance", ("compress", "--target-flops", "0.4", "--total-tolerance", "3", *OUT),
        ("--total-tolerance 3", "--target-flops 0.4")),
    Bad("compress-target-with-no-search", ("compress", "--target-params", "0.5", "--no-search", *OUT),
        ("--no-search", "--target-params 0.5")),
    Bad("compress-tolerance-with-no-search", ("compress", "--tolerance", "2", "--no-search", *OUT),
        ("--tolerance 2", "--no-search")),
    Bad("compress-plan-with-tolerance", ("compress", "--plan", "{tmp}/plan.json", "--tolerance", "1", *OUT),
        ("--tolerance 1", "--plan", "no search")),
    Bad("compress-plan-with-exclude", ("compress", "--plan", "{tmp}/plan.json", "--exclude", "head", *OUT),
        ("--include/--exclude", "--plan")),
    Bad("compress-plan-with-target-device", ("compress", "--plan", "{tmp}/plan.json", "--target-device", "cpu", *OUT),
        ("--target-device", "--plan")),
    Bad("compress-no-refine-without-target", ("compress", "--no-refine", *OUT), ("--no-refine", "give a target")),
    Bad("compress-target-batch-without-device", ("compress", "--target-batch", "8", *OUT),
        ("--target-batch 8", "--target-device")),
    Bad("compress-stats-with-resume", ("compress", "--stats", "{tmp}/s.safetensors", "--resume", *OUT),
        ("--resume", "--stats", "no statistics pass")),
    Bad("analyze-stats-with-max-batches", ("analyze", "--stats", "{tmp}/s.safetensors", "--max-batches", "2", *OUT),
        ("--max-batches", "--stats")),
    Bad("compress-lr-without-finetuning", ("compress", "--finetune-epochs", "0", "--lr", "0.01", *OUT),
        ("--lr 0.01", "--finetune-epochs 0")),
    Bad("compress-finetune-dense-without-epochs", ("compress", "--finetune-epochs", "0", "--finetune-dense", *OUT),
        ("--finetune-dense", "--finetune-epochs")),
    # numbers out of range
    Bad("compress-target-params-above-one", ("compress", "--target-params", "1.5", *OUT),
        ("--target-params 1.5", "(0, 1)")),
    Bad("compress-target-flops-nan", ("compress", "--target-flops", "nan", *OUT), ("--target-flops nan", "(0, 1)")),
    Bad("compress-tolerance-nan", ("compress", "--tolerance", "nan", *OUT), ("--tolerance nan", ">= 0")),
    Bad("compress-lr-infinite", ("compress", "--lr", "inf", *OUT), ("--lr inf", "finite")),
    Bad("compress-weight-decay-negative", ("compress", "--weight-decay", "-0.1", *OUT), ("--weight-decay -0.1",)),
    # plans that do not fit the run
    Bad("compress-plan-missing", ("compress", "--plan", "{tmp}/nowhere.json", *OUT), ("--plan", "nowhere.json")),
    Bad("compress-plan-of-another-method", ("compress", *TINY, "--plan", "{tmp}/plan.json", "--method", "optimal",
                                            *OUT),
        ("--method optimal", "--plan", "made with --method data"), setup=plan_file(method="data")),
    Bad("compress-plan-of-another-model", ("compress", *TINY, "--plan", "{tmp}/plan.json", *OUT),
        ("--plan", "made for --model vit-digits", "test_vit"), setup=plan_file(arch="vit-digits")),
    Bad("compress-plan-layer-not-in-model", ("compress", *TINY, "--plan", "{tmp}/plan.json", *OUT),
        ("--plan", "blocks.9.mlp.fc1", "no such layer"), setup=plan_file(layer="blocks.9.mlp.fc1")),
    # statistics files that do not fit the run
    Bad("compress-stats-missing", ("compress", *TINY, "--stats", "{tmp}/nowhere.safetensors", *OUT),
        ("--stats", "nowhere.safetensors")),
    Bad("analyze-stats-not-statistics", ("analyze", "--model", "test_vit", "--stats", "{tmp}/stats.safetensors", *OUT),
        ("--stats", "stats.safetensors"), setup=not_statistics),
    Bad("analyze-stats-of-another-model", ("analyze", "--model", "test_vit", "--data", "{tmp}/img", "--stats",
                                           "{tmp}/stats.safetensors", *OUT),
        ("--stats", "collected on --model vit-digits"), setup=stats_file(model="vit-digits")),
    Bad("compress-stats-of-another-checkpoint", ("compress", *TINY, "--stats", "{tmp}/stats.safetensors", *OUT),
        ("--stats", "--checkpoint other.safetensors"), setup=stats_file(checkpoint="other.safetensors")),
    Bad("analyze-stats-of-other-data", ("analyze", "--model", "test_vit", "--data", "{tmp}/img", "--stats",
                                        "{tmp}/stats.safetensors", *OUT),
        ("--stats", "collected on --data elsewhere"), setup=stats_file(dataset="elsewhere")),
    # layer globs that select nothing
    Bad("analyze-include-matches-nothing", ("analyze", "--model", "test_vit", "--data", "{tmp}/img", "--include",
                                            "encoder.*", *OUT),
        ("--include 'encoder.*'", "matches no"), setup=images),
    Bad("compress-exclude-matches-nothing", ("compress", *TINY, "--exclude", "blocks.99.*", *OUT),
        ("--exclude 'blocks.99.*'", "matches no"), setup=images),
    Bad("compress-include-and-exclude-leave-nothing", ("compress", *TINY, "--include", "head", "--exclude", "he*",
                                                       *OUT),
        ("--include head", "--exclude he*", "no layer"), setup=images),
    # targets the architecture cannot reach, and targets text cannot measure (before any pass)
    Bad("compress-target-params-unreachable", ("compress", *TINY, "--target-params", "0.05", *OUT),
        ("--target-params 0.05", "pos_embed", "smallest reachable target is 0.0575"), setup=images),
    Bad("compress-target-flops-on-text", ("compress", *BERT, "--target-flops", "0.5", *OUT),
        ("--target-flops", "--data text:", "tensor inputs")),
    Bad("compress-target-device-on-text", ("compress", *BERT, "--target-params", "0.5", "--target-device", "cpu",
                                           *OUT),
        ("--target-device", "--data text:", "tensor inputs")),
]

