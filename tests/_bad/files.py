"""Files and folders: plan, config, manifest and statistics files that are valid JSON of the wrong type or shape, or out
of range (read through the commands that read them: ``compress --plan``, ``compress --stats``, ``analyze --resume``,
``bench --compressed``, ``export``); output folders that cannot be written (a file, a link, a lock held by another
run, no permission, a full disk, too little free space); and what argparse itself refuses."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from _data import make_imagefolder
from safetensors.torch import save_file

from _bad import Bad
from utilrank_kernels._files import sha256

OUT = ("--out", "{tmp}/o")
TINY = ("--model", "test_vit", "--data", "{tmp}/data")  # refused after the model loads: a tiny one


def _text(doc) -> str:
    return doc if isinstance(doc, str) else json.dumps(doc)


# ---- plan.json, read by compress --plan before anything else -------------------------------------------------------
PLAN = {"format": "utilrank.plan/1", "arch": "vit-digits", "method": "optimal",
        "layers": {"blocks.0.mlp.fc1": {"kind": "linear", "rank": 8, "k_in": 9, "k_out": 8, "energy": 0.99}},
        "dense": {"head": "rank 10 saves nothing"}}
FC1 = "layers[blocks.0.mlp.fc1]"


def _plan(**change):
    """PLAN with top-level fields (``layers=``...) or, as ``layer={...}``, fc1's fields changed (None: removed)."""
    doc = json.loads(json.dumps(PLAN))
    for key, value in change.pop("layer", {}).items():
        if value is None:
            doc["layers"]["blocks.0.mlp.fc1"].pop(key)
        else:
            doc["layers"]["blocks.0.mlp.fc1"][key] = value
    for key, value in change.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


def _write_plan(doc):
    def setup(tmp: Path) -> None:
        path = tmp / "plan.json"
        path.write_bytes(doc) if isinstance(doc, bytes) else path.write_text(_text(doc))
    return setup


def plan_case(id: str, doc, *words: str) -> Bad:
    return Bad(id, ("compress", "--plan", "{tmp}/plan.json", *OUT), ("--plan", "{tmp}/plan.json", *words),
               setup=_write_plan(doc))


PLAN_CASES = [
    plan_case("plan-is-a-list", [], "expected an object", "an array"),
    plan_case("plan-is-a-number", 5, "expected an object", "got 5"),
    plan_case("plan-dense-is-a-number", _plan(dense=5), "field dense", "expected an object", "got 5"),
    plan_case("plan-dense-reason-is-a-number", _plan(dense={"head": 3}), "field dense.head", "expected a string"),
    plan_case("plan-layers-is-a-list", _plan(layers=[]), "field layers", "expected an object"),
    plan_case("plan-layer-is-a-number", _plan(layers={"head": 4}), "field layers.head", "expected an object"),
    plan_case("plan-rank-is-true", _plan(layer={"rank": True}), f"field {FC1}.rank", "an integer", "got true"),
    plan_case("plan-rank-zero", _plan(layer={"rank": 0}), f"field {FC1}.rank", ">= 1", "got 0"),
    plan_case("plan-rank-fraction", _plan(layer={"rank": 2.5}), f"field {FC1}.rank", "an integer", "2.5"),
    plan_case("plan-rank-a-string", _plan(layer={"rank": "8"}), f"field {FC1}.rank", "an integer", '"8"'),
    plan_case("plan-rank-missing", _plan(layer={"rank": None}), f"field {FC1}.rank", "missing"),
    plan_case("plan-k-out-negative", _plan(layer={"k_out": -3}), f"field {FC1}.k_out", ">= 1", "-3"),
    plan_case("plan-kind-unknown", _plan(layer={"kind": "conv3d"}), f"field {FC1}.kind", "'linear'", "conv3d"),
    plan_case("plan-energy-above-one", _plan(layer={"energy": 1.5}), f"field {FC1}.energy", "<= 1", "1.5"),
    plan_case("plan-energy-nan", _plan(layer={"energy": float("nan")}), f"field {FC1}.energy", "finite", "NaN"),
    plan_case("plan-latency-a-string", _plan(layer={"latency": "fast"}), f"field {FC1}.latency", "expected an object"),
    plan_case("plan-method-unknown", _plan(method="pca"), "field method", "'optimal'", "pca"),
    plan_case("plan-target-params-above-one", _plan(target_params=1.5), "field target_params", "<= 1"),
    plan_case("plan-of-another-format", _plan(format="utilrank.report/1"), "not a utilrank.plan/1 file",
              "utilrank.report/1"),
    plan_case("plan-without-format", _plan(format=None), "not a utilrank.plan/1 file", "no format field"),
    plan_case("plan-truncated", json.dumps(PLAN)[:40], "not JSON", "line 1"),
    plan_case("plan-empty-file", "", "not JSON"),
    plan_case("plan-not-utf8", b"\x89PNG\r\n\x1a\n\xff\xfe", "not JSON", "UTF-8"),
]


# ---- the statistics header (safetensors metadata), read by compress --stats and analyze --resume -------------------
HEADER = {"format": "utilrank.stats/1", "batches": 1, "skipped": [], "meta": {},
          "layers": {"fc": {"kind": "linear", "in_features": 4, "out_features": 2, "conv": None}}}
CONV = {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "in_channels": 2}


def _header(**change):
    doc = json.loads(json.dumps(HEADER))
    for key, value in change.pop("layer", {}).items():
        doc["layers"]["fc"][key] = value
    doc.update(change)
    return doc


def _write_stats(path: Path, header, tensors: dict | None = None) -> None:
    tensors = tensors if tensors is not None else {
        "fc::cov": torch.eye(4, dtype=torch.float64), "fc::tokens": torch.tensor([5], dtype=torch.int64)}
    save_file(tensors, str(path), metadata=None if header is None else {"utilrank": _text(header)})


def stats_case(id: str, header, *words: str, tensors: dict | None = None) -> Bad:
    return Bad(id, ("compress", "--stats", "{tmp}/s.safetensors", *OUT), ("--stats", "{tmp}/s.safetensors", *words),
               setup=lambda tmp: _write_stats(tmp / "s.safetensors", header, tensors))


def _cov(*shape, fill=0.0, dtype=torch.float64):
    return {"fc::cov": torch.full(shape, fill, dtype=dtype), "fc::tokens": torch.tensor([5], dtype=torch.int64)}


STATS_CASES = [
    stats_case("stats-without-header", None, "not a utilrank.stats/1 file", "no utilrank header"),
    stats_case("stats-header-not-json", "{oops", "not JSON"),
    stats_case("stats-header-is-a-list", [1, 2], "expected an object", "an array"),
    stats_case("stats-of-another-format", _header(format="utilrank.subspaces/1"), "not a utilrank.stats/1 file"),
    stats_case("stats-layers-is-a-list", _header(layers=["fc"]), "field layers", "expected an object"),
    stats_case("stats-in-features-zero", _header(layer={"in_features": 0}), "field layers.fc.in_features", ">= 1"),
    stats_case("stats-kind-unknown", _header(layer={"kind": "attention"}), "field layers.fc.kind", "attention"),
    stats_case("stats-batches-negative", _header(batches=-1), "field batches", ">= 0", "-1"),
    stats_case("stats-batches-true", _header(batches=True), "field batches", "an integer", "true"),
    stats_case("stats-conv-kernel-one-number", _header(layer={"kind": "conv2d", "conv": {**CONV, "kernel_size": [3]}}),
               "field layers.fc.conv.kernel_size", "at least 2 items"),
    stats_case("stats-meta-pass-is-a-list", _header(meta={"pass": ["batch_size", 8]}), "field meta.pass",
               "expected an object"),
    stats_case("stats-skipped-is-a-string", _header(skipped="none"), "field skipped", "expected an array"),
    stats_case("stats-cov-of-another-shape", HEADER, "tensor fc::cov", "expected 4 x 4", "got 3 x 3",
               tensors=_cov(3, 3)),
    stats_case("stats-cov-of-integers", HEADER, "tensor fc::cov", "floats", "int64",
               tensors=_cov(4, 4, dtype=torch.int64)),
    stats_case("stats-cov-nan", HEADER, "tensor fc::cov", "NaN", tensors=_cov(4, 4, fill=float("nan"))),
    stats_case("stats-tensor-missing", HEADER, "the header lists layer fc", "no tensor fc::cov",
               tensors={"fc::tokens": torch.tensor([5])}),
    stats_case("stats-tokens-negative", HEADER, "tensor fc::tokens", "integer >= 0",
               tensors={"fc::cov": torch.eye(4, dtype=torch.float64), "fc::tokens": torch.tensor([-5])}),
]


def _resume_setup(tmp: Path) -> None:
    make_imagefolder(tmp / "data", per_class=3)
    (tmp / "o.partial").mkdir()
    _write_stats(tmp / "o.partial" / "stats.ckpt.safetensors", _header(layers={"fc": {"kind": "linear"}}))


RESUME_CASES = [
    Bad("resume-checkpoint-header-missing-fields", ("analyze", *TINY, "--resume", *OUT),
        ("--resume", "stats.ckpt.safetensors", "field layers.fc.in_features", "missing"), setup=_resume_setup),
]


# ---- a compressed folder (config.json, plan.json, manifest.json), read by bench --compressed and export ----------
CONFIG = {"format": "utilrank.config/1", "arch": "test_vit", "source": "timm", "num_classes": 3,
          "model_kwargs": {"num_classes": 3}}
FOLDER_PLAN = {"format": "utilrank.plan/1", "arch": "test_vit", "method": "optimal", "layers": {}, "dense": {}}


def _folder(config=CONFIG, plan=FOLDER_PLAN, manifest=None):
    """A compressed folder ``{tmp}/c`` whose manifest verifies (``manifest``: its document, changed, instead); its
    weights are a placeholder: every case is refused before they are read."""
    def setup(tmp: Path) -> None:
        folder = tmp / "c"
        folder.mkdir()
        save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(_text(config))
        (folder / "plan.json").write_text(_text(plan))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(folder.iterdir())}
        doc = {"format": "utilrank.manifest/1", "command": "compress", "argv": [], "version": "0.1.0",
               "date": "2026-01-01T00:00:00", "files": files}
        (folder / "manifest.json").write_text(_text(manifest(doc) if callable(manifest) else doc))
    return setup


def _changed(doc: dict, **change) -> dict:
    return {**doc, **change}


def _entry(**change):
    """A manifest whose model.safetensors entry is changed."""
    def change_manifest(doc: dict) -> dict:
        doc["files"]["model.safetensors"].update(change)
        return doc
    return change_manifest


BENCH = ("bench", "--compressed", "{tmp}/c", "--out", "{tmp}/b.json")
EXPORT = ("export", "{tmp}/c", "--out", "{tmp}/c.onnx")
CONFIG_JSON, MANIFEST_JSON = "{tmp}/c/config.json", "{tmp}/c/manifest.json"

FOLDER_CASES = [
    Bad("config-is-a-list", BENCH, (CONFIG_JSON, "expected an object", "an array"), setup=_folder(config=[CONFIG])),
    Bad("config-arch-a-number", EXPORT, (CONFIG_JSON, "field arch", "expected a string", "got 7"),
        setup=_folder(config=_changed(CONFIG, arch=7))),
    Bad("config-arch-empty", BENCH, (CONFIG_JSON, "field arch", "non-empty"),
        setup=_folder(config=_changed(CONFIG, arch=""))),
    Bad("config-model-kwargs-a-list", BENCH, (CONFIG_JSON, "field model_kwargs", "expected an object"),
        setup=_folder(config=_changed(CONFIG, model_kwargs=[3]))),
    Bad("config-num-classes-zero", EXPORT, (CONFIG_JSON, "field num_classes", ">= 1", "got 0"),
        setup=_folder(config=_changed(CONFIG, num_classes=0))),
    Bad("config-source-unknown", BENCH, (CONFIG_JSON, "field source", "'timm'", "pypi"),
        setup=_folder(config=_changed(CONFIG, source="pypi"))),
    Bad("config-head-reset-a-string", EXPORT, (CONFIG_JSON, "field head_reset", "true or false", '"yes"'),
        setup=_folder(config=_changed(CONFIG, head_reset="yes"))),
    Bad("config-of-another-format", EXPORT, (CONFIG_JSON, "not a utilrank.config/1 file"),
        setup=_folder(config=_changed(CONFIG, format="utilrank.plan/1"))),
    Bad("folder-plan-rank-true", EXPORT, ("{tmp}/c/plan.json", "field layers.head.rank", "an integer", "got true"),
        setup=_folder(plan=_changed(FOLDER_PLAN, layers={"head": {"kind": "linear", "rank": True}}))),
    Bad("manifest-is-a-list", BENCH, (MANIFEST_JSON, "expected an object", "an array"),
        setup=_folder(manifest=lambda doc: [doc])),
    Bad("manifest-files-a-list", EXPORT, (MANIFEST_JSON, "field files", "expected an object"),
        setup=_folder(manifest=lambda doc: {**doc, "files": list(doc["files"])})),
    Bad("manifest-bytes-negative", BENCH, (MANIFEST_JSON, "field files[model.safetensors].bytes", ">= 0"),
        setup=_folder(manifest=_entry(bytes=-1))),
    Bad("manifest-sha256-not-hex", EXPORT, (MANIFEST_JSON, "field files[model.safetensors].sha256", "matching"),
        setup=_folder(manifest=_entry(sha256="not-a-digest"))),
    Bad("manifest-command-a-number", BENCH, (MANIFEST_JSON, "field command", "expected a string"),
        setup=_folder(manifest=lambda doc: {**doc, "command": 3})),
]


# ---- output folders ----------------------------------------------------------------------------------------------
def _results(folder: Path, command: str = "analyze", manifest=None) -> None:
    """A finished folder of ``command``'s results (or ``manifest``'s document as its manifest)."""
    folder.mkdir(parents=True)
    (folder / "report.json").write_text("{}")
    doc = manifest if manifest is not None else {"format": "utilrank.manifest/1", "command": command, "files": {}}
    (folder / "manifest.json").write_text(_text(doc))


def _link(target: str, make=None):
    def setup(tmp: Path) -> None:
        if make is not None:
            make(tmp)
        (tmp / "o").symlink_to(tmp / target)
    return setup


_HELD = []  # the open lock files of the cases that hold a lock (closed by monkeypatch's undo)


def _held_lock(pid: str = "4242"):
    """Another run holds the lock: its pid in ``o.lock`` (setup), the lock held on it (patch)."""
    def setup(tmp: Path) -> None:
        (tmp / "o.lock").write_text(f"{pid}\n")

    def patch(monkeypatch, tmp: Path) -> None:
        handle = open(tmp / "o.lock", "rb")  # noqa: SIM115 (closed when the case's monkeypatch is undone)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr(sys.modules[__name__], "_HELD", [handle])
    return setup, patch


def _failing(function: str, code: int, when=lambda *args: True):
    """Make ``function`` ("module:attribute") raise OSError(code) where ``when(*args)``."""
    def patch(monkeypatch, tmp: Path) -> None:
        module, name = function.split(":")
        owner = sys.modules[module] if module in sys.modules else __import__(module)
        for part in name.split(".")[:-1]:
            owner = getattr(owner, part)
        attr = name.split(".")[-1]
        original = getattr(owner, attr)

        def failing(*args, **kwargs):
            if when(*args):
                raise OSError(code, os.strerror(code), str(args[0]))
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, attr, failing)
    return patch


def _compressed(tmp: Path) -> None:
    """A real compressed folder ``{tmp}/c`` (test_vit, no layer factored)."""
    import timm

    from utilrank_kernels.compress import Plan, save_compressed

    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    save_compressed(model, Plan("test_vit", {}), {k: v for k, v in CONFIG.items() if k != "format"}, tmp / "c")


def _small_disk(monkeypatch, tmp: Path) -> None:
    usage = shutil.disk_usage(tmp)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))


def _imagefolder(tmp: Path) -> None:
    make_imagefolder(tmp / "data", per_class=3)


_lock_setup, _lock_patch = _held_lock()
OUT_CASES = [
    Bad("out-is-a-file", ("analyze", *OUT), ("--out {tmp}/o", "exists and is not a folder"),
        setup=lambda tmp: (tmp / "o").write_text("x")),
    Bad("out-under-a-file", ("analyze", "--out", "{tmp}/f/o"), ("--out {tmp}/f/o", "cannot write there"),
        setup=lambda tmp: (tmp / "f").write_text("x")),
    Bad("out-in-proc", ("analyze", "--out", "/proc/utilrank-out"), ("--out /proc/utilrank-out", "cannot write there")),
    Bad("out-permission-denied", ("analyze", "--out", "{tmp}/ro/o"), ("--out {tmp}/ro/o", "cannot write there",
                                                                        "Permission denied"),
        patch=_failing("os:open", errno.EACCES, lambda path, *a: str(path).endswith(".lock"))),
    Bad("out-read-only-file-system", ("compress", *OUT), ("--out {tmp}/o", "cannot write there", "Read-only"),
        patch=_failing("os:open", errno.EROFS, lambda path, *a: str(path).endswith(".lock"))),
    Bad("out-disk-already-full", ("analyze", *OUT), ("--out {tmp}/o", "cannot write there", "No space left"),
        patch=_failing("pathlib:Path.write_bytes", errno.ENOSPC, lambda path, *a: path.name == ".write-test")),
    Bad("out-holds-results-of-analyze", ("compress", *OUT), ("--out {tmp}/o", "made by utilrank analyze", "--force"),
        setup=lambda tmp: _results(tmp / "o")),
    Bad("out-manifest-is-a-number", ("analyze", *OUT), ("{tmp}/o/manifest.json", "expected an object", "got 3"),
        setup=lambda tmp: _results(tmp / "o", manifest=3)),
    Bad("out-link-to-a-file", ("analyze", *OUT), ("--out {tmp}/o", "a link to {tmp}/f", "exists and is not a folder"),
        setup=_link("f", lambda tmp: (tmp / "f").write_text("x"))),
    Bad("out-link-loop", ("analyze", *OUT), ("--out {tmp}/o", "symbolic link", "does not resolve"),
        setup=_link("o")),
    Bad("out-link-to-results", ("analyze", *OUT), ("--out {tmp}/o", "a link to {tmp}/r", "made by utilrank compress"),
        setup=_link("r", lambda tmp: _results(tmp / "r", "compress"))),
    Bad("out-locked-by-another-run", ("analyze", *OUT), ("--out {tmp}/o", "another utilrank run", "pid 4242"),
        setup=_lock_setup, patch=_lock_patch),
    Bad("out-locked-by-another-compress", ("compress", "--force", *OUT), ("--out {tmp}/o", "pid 4242"),
        setup=lambda tmp: (_lock_setup(tmp), _results(tmp / "o")), patch=_lock_patch),
    Bad("bench-disk-full-writing-the-rows", ("bench", "--compressed", "{tmp}/c", "--iters", "1", "--warmup", "0",
                                            "--batch-sizes", "1", "--device", "cpu", "--no-plot", "--out",
                                            "{tmp}/b.json"),
        ("{tmp}/b.json", "no space left on the device"),
        setup=lambda tmp: (_compressed(tmp), (tmp / "b.json").write_text("an earlier run's rows")),
        patch=_failing("pathlib:Path.write_text", errno.ENOSPC, lambda path, *a: path.name.startswith(".b.json."))),
    Bad("out-too-little-free-space", ("analyze", *TINY, *OUT), ("--out {tmp}/o", "1 MiB free", "writes about"),
        setup=_imagefolder, patch=_small_disk),
    Bad("out-too-little-free-space-compress", ("compress", *TINY, "--finetune-epochs", "0", "--engines", "eager",
                                               "--no-search", *OUT),
        ("--out {tmp}/o", "1 MiB free"), setup=_imagefolder, patch=_small_disk),
]


# ---- argparse's own refusals: one line, no usage block ---------------------------------------------------------
ARGPARSE_CASES = [
    Bad("argparse-no-command", (), ("utilrank: error:", "required", "(see utilrank --help)")),
    Bad("argparse-unknown-command", ("analyse",), ("utilrank: error:", "invalid choice", "'analyse'")),
    Bad("argparse-unknown-option", ("analyze", "--frobnicate", "3"), ("utilrank analyze: error:", "--frobnicate",
                                                                       "(see utilrank analyze --help)")),
    Bad("argparse-debug-after-the-command", ("analyze", "--debug"), ("utilrank analyze: error:", "--debug")),
    Bad("argparse-option-without-value", ("analyze", "--out"), ("--out", "expected one argument")),
    Bad("argparse-invalid-choice", ("compress", "--method", "pca"), ("--method", "invalid choice", "'pca'")),
    Bad("argparse-not-a-number", ("analyze", "--energy", "most"), ("--energy", "invalid float value", "'most'")),
    Bad("argparse-two-targets", ("compress", "--target-params", "0.5", "--target-flops", "0.5"),
        ("--target-flops", "not allowed with", "--target-params")),
]


CASES = [*PLAN_CASES, *STATS_CASES, *RESUME_CASES, *FOLDER_CASES, *OUT_CASES, *ARGPARSE_CASES]
