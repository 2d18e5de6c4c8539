"""Per-layer agreement of ``utilrank spectrum``'s default definitions with WeightWatcher 0.7.7.

Runs ``WeightWatcher(model).analyze(mp_fit=True)`` and ``analysis.spectrum.spectrum(model)`` on the built-in
ViT and CNN (random init, and briefly trained) and on random timm ViT and ResNet models, and reports, per
model and metric, the largest absolute difference over the layers both analyze, and whether both analyze
the same layers. ``tests/analysis/test_weightwatcher_parity.py`` asserts on it; run it to see the table:

    pip install -e '.[test]' && python benchmarks/run.py weightwatcher-parity [--json FILE]

WeightWatcher refits a scikit-learn KDE of the ESD at every residual evaluation of its MP fit (about 230
per layer; resnet18's MP fits take 140 s on a 2-core CPU); the KDE does not depend on the parameter
searched, so ``cached_kde`` memoizes it (the same scikit-learn call, made once per ESD): 6 s.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import sys
from collections.abc import Callable

import timm
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from utilrank_kernels.analysis.spectrum import spectrum
from utilrank_kernels.data import load_data
from utilrank_kernels.models import BUILTIN_MODELS, build_builtin
from utilrank_kernels.train import train

# our metric -> WeightWatcher's details column
METRICS = {
    "alpha": "alpha", "ks_distance": "D", "xmin": "xmin", "alpha_sigma": "sigma", "num_pl_spikes": "num_pl_spikes",
    "alpha_weighted": "alpha_weighted", "log_alpha_norm": "log_alpha_norm", "lambda_max": "lambda_max",
    "log_spectral_norm": "log_spectral_norm", "log_norm": "log_norm", "stable_rank": "stable_rank",
    "num_evals": "num_evals", "mp_softrank": "mp_softrank", "num_spikes": "num_spikes", "sigma_mp": "sigma_mp",
    "bulk_min": "bulk_min", "bulk_max": "bulk_max", "N": "N", "M": "M",
}
RELATIVE = ("xmin", "lambda_max", "bulk_min", "bulk_max", "stable_rank")  # scale-carrying: compared relatively


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _briefly_trained(name: str, epochs: int) -> nn.Module:
    recipe = {**BUILTIN_MODELS[name][2], "epochs": epochs}
    model = _seeded(lambda: build_builtin(name))
    return train(model, load_data("digits").train, desc=f"train {name}", **recipe).eval()


class EdgeCases(nn.Module):
    """Layers at WeightWatcher's size rules: a conv with 4 pooled eigenvalues and one with 9 (depthwise), a
    5-output and an 8-output head (min_evals 8), an embedding with N = 60,000 (max_N 50,000), and an
    all-zero matrix (nothing to fit)."""

    def __init__(self):
        super().__init__()
        self.tiny_conv = nn.Conv2d(1, 4, 2)  # 4 slices of 4x1: 4 eigenvalues
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)  # 9 slices of 16x1: 9 eigenvalues
        self.conv = nn.Conv2d(16, 24, 3)
        self.head5 = nn.Linear(32, 5)
        self.head8 = nn.Linear(32, 8)
        self.embedding = nn.Embedding(100, 12)
        self.huge_embedding = nn.Embedding(60_000, 8)
        self.zero = nn.Linear(16, 16)
        nn.init.zeros_(self.zero.weight)


def parity_models() -> dict[str, Callable[[], nn.Module]]:
    """The models of the comparison, by label (each built on demand, deterministically)."""
    return {
        "vit-digits (random)": lambda: _seeded(lambda: build_builtin("vit-digits")),
        "vit-digits (3 epochs)": lambda: _briefly_trained("vit-digits", 3),
        "vgg-digits (1 epoch)": lambda: _briefly_trained("vgg-digits", 1),
        "timm vit_tiny_patch16_224, depth 4 (random)":
            lambda: _seeded(lambda: timm.create_model("vit_tiny_patch16_224", depth=4)),
        "timm resnet18 (random)": lambda: _seeded(lambda: timm.create_model("resnet18")),
        "size-rule edge cases (random)": lambda: _seeded(EdgeCases),
    }


@contextlib.contextmanager
def cached_kde():
    """WeightWatcher's ``resid_mp`` with its scikit-learn KDE memoized by (samples, grid, bandwidth)."""
    from sklearn.neighbors import KernelDensity
    from weightwatcher import RMT_Util  # weightwatcher: optional (the test extra)

    cache: dict = {}

    class CachedKernelDensity:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit(self, samples):
            self.samples = samples
            return self

        def score_samples(self, grid):
            key = (hashlib.sha1(self.samples.tobytes()).hexdigest(), hashlib.sha1(grid.tobytes()).hexdigest(),
                   tuple(sorted(self.kwargs.items())))
            if key not in cache:
                cache[key] = KernelDensity(**self.kwargs).fit(self.samples).score_samples(grid)
            return cache[key].copy()

    original = RMT_Util.KernelDensity
    RMT_Util.KernelDensity = CachedKernelDensity
    try:
        yield
    finally:
        RMT_Util.KernelDensity = original


def weightwatcher_details(model: nn.Module):
    """``WeightWatcher(model).analyze(mp_fit=True)`` (its prints swallowed), as a pandas DataFrame."""
    import weightwatcher  # optional (the test extra)

    with cached_kde(), contextlib.redirect_stdout(io.StringIO()):
        return weightwatcher.WeightWatcher(model=model).analyze(mp_fit=True)


def candidate_layers(model: nn.Module) -> set[str]:
    """Every module of the kinds both tools consider."""
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))}


def compare(model: nn.Module) -> dict:
    """Both analyses of ``model``: the layers each fits and skips, and per metric the largest difference
    over the layers both fit (absolute; relative for the scale-carrying ones in ``RELATIVE``)."""
    report, _ = spectrum(model, progress=False)
    ours = {r["name"]: r for r in report["layers"]}
    details = weightwatcher_details(model)
    theirs = {row["longname"]: row for row in details.to_dict("records") if row["alpha"] != -1}  # -1: failed fit
    candidates = candidate_layers(model)
    diffs: dict[str, float] = {}
    worst_layer: dict[str, str] = {}
    for name in sorted(ours.keys() & theirs.keys()):
        for key, column in METRICS.items():
            a, b = float(ours[name][key]), float(theirs[name][column])
            d = abs(a - b) / max(abs(b), 1e-300) if key in RELATIVE else abs(a - b)
            if math.isnan(d) or d > diffs.get(key, -1.0):
                diffs[key], worst_layer[key] = d, name
    return {
        "layers": len(candidates), "analyzed_ours": sorted(ours), "analyzed_ww": sorted(theirs),
        "skipped_ours": sorted(s["name"] for s in report["skipped"]),
        "skipped_ww": sorted(candidates - theirs.keys()), "max_diff": diffs, "worst_layer": worst_layer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the comparison to this file")
    args = parser.parse_args(argv)
    import weightwatcher  # noqa: F401  (loads scipy's BLAS before the limit below: it binds loaded libraries only)

    torch.set_num_threads(1)  # small matrices: a second thread only adds barriers (10-100x on a busy 2-core box)
    results = {}
    with threadpool_limits(limits=1):
        for label, build in parity_models().items():
            results[label] = compare(build())
    keys = list(METRICS)
    print(f"{'metric':<18}" + "".join(f"{label[:26]:>28}" for label in results))
    for key in keys:
        print(f"{key + (' (rel)' if key in RELATIVE else ''):<18}"
              + "".join(f"{r['max_diff'].get(key, float('nan')):>28.2e}" for r in results.values()))
    ok = True
    for label, r in results.items():
        same = r["analyzed_ours"] == r["analyzed_ww"] and r["skipped_ours"] == r["skipped_ww"]
        ok &= same and r["max_diff"].get("alpha", 0.0) <= 0.01
        print(f"{label}: {len(r['analyzed_ours'])} of {r['layers']} layers analyzed by both"
              f"{'' if same else ' -- THE ANALYZED SETS DIFFER'}; skipped by both: {r['skipped_ours'] or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
