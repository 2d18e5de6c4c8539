"""``utilrank compress``: the headline claim and outputs that agree with each other on the built-in default; every
method end to end on a tiny timm model; a summary that claims only what it measured."""

import json

import pytest
import torch
from _data import make_imagefolder
from _hf import make_bert, make_text

from utilrank_kernels import load_compressed
from utilrank_kernels.cli import compress as compress_cli
from utilrank_kernels.cli import main
from utilrank_kernels.compress.summary import CompressSummary, EngineTiming, Target, Variant, latency_notes
from utilrank_kernels.data import load_data
from utilrank_kernels.measure import count_params
from utilrank_kernels.models import load_model_and_data
from utilrank_kernels.timing import Timing
from utilrank_kernels.train import evaluate


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``utilrank compress`` with every option at its default (the quick start's command): the one run of the suite
    that times the compile engine (every other test passes ``--engines eager``)."""
    out = tmp_path_factory.mktemp("compress") / "out"
    assert main(["compress", "--out", str(out)]) == 0
    return out, {name: json.loads((out / f"{name}.json").read_text()) for name in ("summary", "plan", "report")}


@pytest.mark.slow
def test_default_compress_keeps_accuracy_within_its_budget(default_run):
    """The product's claim: compressed test accuracy is at least the dense model's minus the rank search's
    total budget (default: --tolerance 0.5 pp times the searched layers), with fewer parameters and FLOPs."""
    out, docs = default_run
    summary, plan = docs["summary"], docs["plan"]
    budget = plan["total_tolerance"]
    if budget is None:  # the default: the per-layer tolerance summed over the searched layers
        budget = plan["tolerance"] * len(plan["layers"])
    assert summary["compressed"]["accuracy"] >= summary["dense"]["accuracy"] - budget / 100
    assert summary["compressed"]["params"] < 0.5 * summary["dense"]["params"]
    assert summary["compressed"]["flops"] < 0.5 * summary["dense"]["flops"]


@pytest.mark.slow
def test_outputs_agree_with_the_saved_model(default_run):
    """plan.json, report.json, summary.json and model.safetensors tell one story: every rank and every
    parameter count is the saved model's, and the loaded model scores what the summary says."""
    out, docs = default_run
    summary, plan, report = docs["summary"], docs["plan"], docs["report"]
    model = load_compressed(out)
    for row in report["layers"]:
        layer = model.get_submodule(row["name"])
        planned = plan["layers"].get(row["name"])
        assert row["saved_rank"] == (planned["rank"] if planned else None), row["name"]
        assert getattr(layer, "rank", None) == row["saved_rank"], row["name"]
    assert report["saved"]["compressed"] == summary["compressed"]["params"] == count_params(model)
    assert report["saved"]["dense"] == summary["dense"]["params"]
    assert evaluate(model, load_data("digits").test) == pytest.approx(summary["compressed"]["accuracy"])
    assert summary["method"] == plan["method"] and summary["test_split"] == "test"


@pytest.mark.slow
def test_default_summary_times_eager_compile_and_the_fastest_mode(default_run):
    """The default ``--engines eager,compile,fastest``: the summary times dense and compressed in both engines and in
    the fastest CPU mode found, which its row and a note name (one of the summary's modes, or compile where its own
    row was faster)."""
    from utilrank_kernels.bench.fastest import SUMMARY_MODES

    _, docs = default_run
    engines = docs["summary"]["engines"]
    assert list(engines) == ["eager", "compile", "fastest"], docs["summary"]["notes"]
    assert all(t["compressed_ms"] > 0 and t["speedup"] == t["dense_ms"] / t["compressed_ms"] for t in engines.values())
    assert engines["fastest"]["mode"] in {f"{e} {d}" for e, d in SUMMARY_MODES} | {"compile fp32"}
    assert any(n.startswith(f"fastest CPU mode here (the 'fastest' row): {engines['fastest']['mode']}")
               for n in docs["summary"]["notes"])


def _summary(**changes) -> CompressSummary:
    fields = dict(
        model="vit-digits", dataset="digits", method="optimal", metric="accuracy",
        engines={"eager": EngineTiming(Timing(2.0, 1.5, 2.5), Timing(1.0, 0.9, 1.1))},
        dense=Variant(0.95, 1000, 8000, Timing(2.0, 1.5, 2.5)), projected=Variant(0.9, 500, 4000),
        compressed=Variant(0.94, 500, 4000, Timing(1.0, 0.9, 1.1)), mlu=0.2, finetune_epochs=3, test_split="val",
        notes=("a note",), warnings=("a warning",), dense_finetuned=Variant(0.96),
        target=Target("params", 0.5, 0.5), finetune_loss="labels")
    return CompressSummary(**{**fields, **changes})


def test_summary_json_and_table():
    """The summary's ``summary.json`` keys (format ``utilrank.summary/1``) and the table the command prints."""
    summary = _summary()
    doc = summary.to_json()
    assert list(doc) == ["format", "model", "dataset", "method", "metric", "engines", "dense", "projected",
                         "compressed", "mlu", "finetune_epochs", "finetune_loss", "test_split", "latency_batch",
                         "notes", "warnings",
                         "dense_finetuned", "target"]
    assert doc["format"] == "utilrank.summary/1" and doc["latency_batch"] == 32
    assert doc["engines"]["eager"] == {"dense_ms": 2.0, "dense_p20_ms": 1.5, "dense_p80_ms": 2.5, "compressed_ms": 1.0,
                                       "compressed_p20_ms": 0.9, "compressed_p80_ms": 1.1, "speedup": 2.0}
    assert doc["dense"] == {"params": 1000, "flops": 8000, "accuracy": 0.95, "latency_ms": 2.0, "latency_p20_ms": 1.5,
                            "latency_p80_ms": 2.5}
    assert doc["projected"] == {"params": 500, "flops": 4000, "accuracy": 0.9}
    assert doc["dense_finetuned"] == {"accuracy": 0.96}
    assert doc["target"] == {"measure": "params", "fraction": 0.5, "achieved": 0.5}
    json.dumps(doc)
    table = summary.format_table().splitlines()
    assert table[2].startswith("FLOPs / image ")
    assert table[3] == f"{'CPU ms b32 eager':<24}{2.0:>14.2f}{1.0:>14.2f}{0.5:>10.3f}  (speedup 2.00x)"
    assert table[4] == f"{'  p20-p80':<24}{'[1.50-2.50]':>14}{'[0.90-1.10]':>14}"
    assert table[5] == f"{'test (= val!) accuracy':<24}{'95.00%':>14}{'94.00%':>14}  (-1.00 pp)"
    assert table[6] == ("projected (optimal, before fine-tuning): 90.00%; fine-tuned 3 epochs on labels: 94.00%; MLU "
                        "0.200")
    distilled = _summary(finetune_loss="logits", metric="agreement").format_table().splitlines()[6]
    assert "fine-tuned 3 epochs distilled from the dense logits (KL): 0.9400" in distilled
    tempered = _summary(finetune_loss="logits", metric="agreement", distill_temperature=2.0)
    assert "distilled from the dense logits (KL, T=2): 0.9400" in tempered.format_table()
    assert tempered.to_json()["distill_temperature"] == 2.0 and "distill_temperature" not in doc
    assert table[-3].startswith("control: the dense model fine-tuned the same 3 epochs: 96.00%")
    assert table[-2:] == ["note: a note", "warning: a warning"]


def test_summary_claims_only_what_it_measured():
    """A speedup only where the p20-p80 ranges do not overlap; a metric in its own unit (cosine is no percentage);
    no fine-tuning said as such; FLOPs per sequence for text."""
    overlapping = {"eager": EngineTiming(Timing(2.0, 1.0, 3.0), Timing(1.4, 1.2, 2.9)),
                   "compile": EngineTiming(Timing(1.0, 0.95, 1.05), Timing(1.5, 1.4, 1.6))}
    table = _summary(engines=overlapping, metric="cosine", dense=Variant(1.0, 1000, 8000), finetune_epochs=0,
                     projected=Variant(0.9, 500, 4000), compressed=Variant(0.9, 500, 4000), test_split="test",
                     dense_finetuned=None, example="sequence", notes=(), warnings=()).format_table().splitlines()
    assert table[2].startswith("FLOPs / sequence ")
    assert table[3].endswith("(no measurable difference)") and "speedup" not in table[3]  # 1.43x within the spread
    assert table[5].endswith("(slower (0.67x))")
    assert table[7] == f"{'test cosine':<24}{'1.0000':>14}{'0.9000':>14}  (-0.1000)"
    assert "%" not in table[7] and "pp" not in table[7]
    assert table[8] == "projected (optimal, no fine-tuning): 0.9000, the compressed model as saved; MLU 0.200"
    assert "fine-tuned 0" not in "\n".join(table)


def test_latency_notes_speak_of_the_spread():
    wide = {"eager": EngineTiming(Timing(2.0, 1.0, 3.0), Timing(1.4, 1.2, 2.9))}
    notes = latency_notes(wide, 32)
    assert "p80/p20 up to 3.00" in notes[0]
    assert "not measurably faster" in notes[1] and "within the p20-p80 spread" in notes[1]
    slower = {"eager": EngineTiming(Timing(1.0, 0.99, 1.01), Timing(1.2, 1.19, 1.21))}
    (note,) = latency_notes(slower, 32)  # measurably slower: the model, not the machine
    assert "not measurably faster" in note and "per-call overhead" in note
    assert latency_notes({"eager": EngineTiming(Timing(2.0, 1.9, 2.1), Timing(1.0, 0.9, 1.1))}, 32) == []


def test_text_latency_gets_the_spread_warning(monkeypatch):
    """Text models are timed in eager only, and get the same spread note as images (dense ranged 638-2,768 ms)."""
    wide = {"dense": {"median": 900.0, "p20": 638.0, "p80": 2768.0}, "compressed": {"median": 800.0, "p20": 600.0,
                                                                                  "p80": 2000.0}}
    monkeypatch.setattr(compress_cli, "latency_ms", lambda models, inputs, progress: wide)
    notes: list[str] = []
    model = torch.nn.Linear(2, 2)
    engines = compress_cli._time_engines(["eager"], model, model, {"input_ids": torch.zeros(4, 3)}, notes)
    assert list(engines) == ["eager"]
    assert any("p80/p20 up to 4.34" in n for n in notes) and any("not measurably faster" in n for n in notes)


@pytest.mark.slow
def test_cli_compress_options(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--finetune-epochs", "1", "--tolerance", "1", "--exclude", "head", "--method", "optimal",
                 "--engines", "eager", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "utilrank.summary/1" and summary["method"] == "optimal"
    assert list(summary["engines"]) == ["eager"]  # --engines eager: no torch.compile
    plan = json.loads((out / "plan.json").read_text())
    assert "head" not in plan["layers"] and plan["dense"]["head"] == "excluded by filter"
    report = json.loads((out / "report.json").read_text())
    assert "dense" not in report  # the contract's keys, plus the saved model's ranks and counts
    assert set(report) == {"format", "model", "dataset", "energy", "tokens", "mlu", "mlu_unbounded", "layers",
                           "skipped", "saved"}
    assert "parameters" in capsys.readouterr().out


def test_compress_accepts_the_latency_options():
    from utilrank_kernels.cli import build_parser

    args = build_parser().parse_args(["compress", "--target-device", "cpu", "--target-batch", "8"])
    assert (args.target_device, args.target_batch) == ("cpu", 8)
    assert build_parser().parse_args(["compress"]).target_device is None


# ---------------------------------------------------------------------------------------------
# every method end to end on a tiny timm model, and what a run re-entered from a plan does
# ---------------------------------------------------------------------------------------------
TINY = ["--model", "test_vit", "--energy", "0.9", "--batch-size", "8", "--engines", "eager"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("images"), per_class=4, size=16)


def _closing_files(printed: str) -> set[str]:
    line = next(line for line in printed.splitlines() if line.startswith("wrote "))
    return set(line.split("(", 1)[1].split(")", 1)[0].split(", "))


@pytest.mark.parametrize("method, epochs", [("optimal", 1), ("data", 0), ("svd", 0)])
def test_every_method_end_to_end(method, epochs, images, tmp_path, capsys, one_thread):
    """``utilrank compress --method M`` runs, saves a folder ``load_compressed`` reads back to the summary's score,
    and the closing line lists exactly the files written. ``svd`` (which crashed for every model) factors each layer
    to the truncated SVD of its own weight, at the data's ranks."""
    out = tmp_path / method
    assert main(["compress", *TINY, "--data", str(images), "--no-search", "--method", method, "--finetune-epochs",
                 str(epochs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary, plan = (json.loads((out / f"{n}.json").read_text()) for n in ("summary", "plan"))
    assert summary["method"] == plan["method"] == method and summary["finetune_epochs"] == epochs
    assert summary["compressed"]["params"] < summary["dense"]["params"] and plan["layers"]
    assert _closing_files(printed) == {p.name for p in out.iterdir()}
    assert ("fine-tuned 1 epoch on labels:" in printed) == bool(epochs)
    assert ("no fine-tuning" in printed) == (not epochs) and summary["finetune_loss"] == ("labels" if epochs else "")
    loaded = load_model_and_data("test_vit", str(images))
    model = load_compressed(out)
    assert evaluate(model, loaded.data.test) == pytest.approx(summary["compressed"]["accuracy"])
    if method == "svd":
        for name, entry in plan["layers"].items():
            weight = loaded.model.get_submodule(name).weight.detach().double()
            factored = model.get_submodule(name)
            product = (factored.weight_b.double().flatten(1) @ factored.weight_a.double().flatten(1))
            u, s, vh = torch.linalg.svd(weight.flatten(1), full_matrices=False)
            r = entry["rank"]
            assert torch.allclose(product, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5), name


def test_distill_logits_ignores_the_labels_and_agreement_scores(images, tmp_path, capsys, one_thread):
    """``--distill logits`` fine-tunes on the dense model's logits (the folder's labels unread) and ``--metric
    agreement`` scores top-1 agreement with the dense model: the summary names both, the dense model agrees with
    itself, and the saved model's agreement is the summary's."""
    out = tmp_path / "distilled"
    assert main(["compress", *TINY, "--data", str(images), "--no-search", "--distill", "logits",
                 "--distill-temperature", "2", "--metric", "agreement", "--finetune-epochs", "1", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune_loss"] == "logits" and summary["metric"] == "agreement"
    assert summary["distill_temperature"] == 2.0 and "distilled from the dense logits (KL, T=2)" in printed
    assert summary["dense"]["agreement"] == 1.0
    loaded = load_model_and_data("test_vit", str(images))
    model = load_compressed(out).eval()
    with torch.no_grad():
        x = torch.stack([loaded.data.test[i][0] for i in range(len(loaded.data.test))])
        same = (model(x).argmax(-1) == loaded.model.eval()(x).argmax(-1)).double().mean().item()
    assert same == pytest.approx(summary["compressed"]["agreement"])


def test_a_plan_is_factored_by_its_own_method(images, tmp_path, capsys, one_thread):
    """``--plan`` re-enters at the factors with the method the plan was made with (a ``data`` plan was silently
    re-factored as ``optimal``); another ``--method`` is refused; with ``--stats`` no pass runs and the folder (and
    its closing line) has no stats.safetensors."""
    first = tmp_path / "first"
    assert main(["compress", *TINY, "--data", str(images), "--no-search", "--method", "data", "--finetune-epochs", "0",
                 "--out", str(first)]) == 0
    capsys.readouterr()
    again = ["compress", *TINY, "--data", str(images), "--plan", str(first / "plan.json"), "--stats",
             str(first / "stats.safetensors"), "--finetune-epochs", "0"]
    assert main([*again, "--method", "optimal", "--out", str(tmp_path / "refused")]) == 2
    assert "made with --method data" in capsys.readouterr().err and not (tmp_path / "refused.partial").exists()
    second = tmp_path / "second"
    assert main([*again, "--out", str(second)]) == 0
    captured = capsys.readouterr()
    assert "factored by its method, data" in captured.out and "statistics:" not in captured.err
    summary, plan = (json.loads((second / f"{n}.json").read_text()) for n in ("summary", "plan"))
    assert summary["method"] == plan["method"] == "data"
    before = json.loads((first / "plan.json").read_text())
    assert {n: e["rank"] for n, e in plan["layers"].items()} == {n: e["rank"] for n, e in before["layers"].items()}
    assert not (second / "stats.safetensors").exists() and "stats.safetensors" not in _closing_files(captured.out)
    assert _closing_files(captured.out) == {p.name for p in second.iterdir()}


def test_an_unreachable_target_names_the_embeddings_before_any_pass(tmp_path, capsys, one_thread):
    """The embeddings of a text encoder cannot be factored: a target below what they hold is refused from the
    architecture alone, naming them and the smallest reachable target, before the statistics pass (which took
    2 min 20 s on all-MiniLM-L6-v2 before the refusal)."""
    make_bert(tmp_path / "bert")
    make_text(tmp_path / "lines.txt", lines=20)
    out = tmp_path / "o"
    assert main(["compress", "--model", f"hf:{tmp_path / 'bert'}", "--data", f"text:{tmp_path / 'lines.txt'}",
                 "--metric", "cosine", "--finetune-epochs", "0", "--target-params", "0.25", "--engines", "eager",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    for word in ("--target-params 0.25", "embeddings.word_embeddings (Embedding", "embeddings.position_embeddings",
                 "smallest reachable target is 0.2959"):
        assert word in line, line
    assert "statistics:" not in err and not out.exists() and not (tmp_path / "o.partial").exists()


def test_the_fastest_row_times_both_models_in_the_mode_found_and_names_it(images, tmp_path, capsys, monkeypatch):
    """``--engines eager,fastest``: the summary gets a ``fastest`` row with the mode ``bench.fastest_mode`` chose over
    the summary's modes (compile-freeze left out), its timings as found, and a note naming the mode, the modes tried
    and the ones that could not run. ``fastest_mode`` itself is tested against real timings in tests/bench."""
    from utilrank_kernels.bench.fastest import FastestMode

    seen = {}

    def fake(dense, compressed, input_shape, *, batch, modes, **kwargs):
        seen.update(batch=batch, modes=modes, shape=input_shape)
        rows = [{"engine": "onnxruntime", "dtype": "int8", "variant": "compressed"},
                {"engine": "eager", "dtype": "bf16", "error": "no BF16 instructions"}]
        return FastestMode("onnxruntime int8", "onnxruntime", "int8", 8.0, 2.0, 4.0, 0.999, rows,
                           Timing(8.0, 7.9, 8.1), Timing(2.0, 1.9, 2.1))

    monkeypatch.setattr(compress_cli, "fastest_mode", fake)
    out = tmp_path / "out"
    assert main(["compress", *TINY[:-1], "eager,fastest", "--data", str(images), "--no-search",
                 "--finetune-epochs", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert seen["modes"] and all(engine != "compile-freeze" for engine, _ in seen["modes"])
    assert seen["batch"] == summary["latency_batch"] and seen["shape"] == (3, 160, 160)  # test_vit's input size
    row = summary["engines"]["fastest"]
    assert row["mode"] == "onnxruntime int8" and row["dense_ms"] == 8.0 and row["compressed_ms"] == 2.0
    assert row["speedup"] == pytest.approx(4.0)
    note = next(n for n in summary["notes"] if n.startswith("fastest CPU mode here"))
    assert "onnxruntime int8" in note and "eager bf16 (no BF16 instructions)" in note and "0.9990" in note
    assert "(onnxruntime int8)" in printed and "CPU ms b32 fastest" in printed


def test_a_folder_of_images_without_class_folders_is_unlabelled_and_distilled(tmp_path, capsys, one_thread):
    """A folder of images (no class folders) loads as unlabelled: ``--distill auto`` distils from the dense model's
    logits, the default metric is the logit cosine to the dense model (1.0 for itself), and the split is the
    folder's 70/15/15; ``--num-classes`` (a new head, trained on labels) is refused in one line."""
    import numpy as np
    from PIL import Image

    flat = tmp_path / "photos"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(flat / f"img{i:02d}.png")
    (flat / "notes.txt").write_text("not an image: not read")
    loaded = load_model_and_data("test_vit", str(flat))
    assert [len(s) for s in (loaded.data.train, loaded.data.val, loaded.data.test)] == [9, 2, 3]
    assert isinstance(loaded.data.train[0], torch.Tensor)  # an image alone: no label
    out = tmp_path / "out"
    assert main(["compress", *TINY, "--data", str(flat), "--no-search", "--finetune-epochs", "1", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "fine-tuning loss (--distill auto): logits" in printed
    assert summary["finetune_loss"] == "logits" and summary["metric"] == "cosine"
    assert summary["dense"]["cosine"] == pytest.approx(1.0)
    assert main(["compress", *TINY, "--data", str(flat), "--checkpoint", str(out / "model.safetensors"),
                 "--num-classes", "3", "--out", str(tmp_path / "refused")]) == 2
    assert "has no class folders (unlabelled images)" in capsys.readouterr().err


def test_distillation_defaults_to_its_own_learning_rate():
    """Without ``--lr``, fine-tuning on labels runs at 1e-3 and distillation at ``DISTILL_LR`` (1e-4: 1e-3 undid the
    pretrained models measured); ``--lr`` wins over both; no fine-tuning changes nothing."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from utilrank_kernels.cli import build_parser

    model = torch.nn.Linear(4, 3)
    labelled = SimpleNamespace(name="l", train=TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)),
                               val=None)
    unlabelled = SimpleNamespace(name="u", train=[torch.randn(4)] * 4, val=None)

    def lr(data, *argv):
        args = build_parser().parse_args(["compress", *argv])
        return compress_cli._distill_lr(args, compress_cli.compress_config(args), model, data).finetune.lr

    assert lr(labelled) == 1e-3 and lr(unlabelled) == compress_cli.DISTILL_LR == 1e-4
    assert lr(labelled, "--distill", "logits") == 1e-4
    assert lr(unlabelled, "--lr", "5e-4") == lr(labelled, "--lr", "5e-4") == 5e-4
    assert lr(unlabelled, "--finetune-epochs", "0") == 1e-3  # nothing trains


def test_the_fastest_row_is_an_engine_timed_above_where_that_was_faster(monkeypatch):
    """``fastest_mode`` leaves compile engines out (their compiles take long); where the summary's ``compile`` row
    was faster than every mode it tried, the fastest row is that engine's timing, named ``compile fp32``."""
    from utilrank_kernels.bench.fastest import FastestMode

    found = FastestMode("eager fp32", "eager", "fp32", 3.5, 3.2, 1.09, 1.0, [], Timing(3.5, 3.4, 3.6),
                        Timing(3.2, 3.1, 3.3))
    monkeypatch.setattr(compress_cli, "fastest_mode", lambda *a, **k: found)
    timed = {"eager": EngineTiming(Timing(3.5, 3.4, 3.6), Timing(3.2, 3.1, 3.3)),
             "compile": EngineTiming(Timing(3.0, 2.9, 3.1), Timing(2.4, 2.3, 2.5))}
    notes: list[str] = []
    row = compress_cli._time_fastest(None, None, torch.zeros(2, 3, 8, 8), notes, timed=timed)
    assert row.mode == "compile fp32" and row.compressed.median == 2.4 and row.dense.median == 3.0
    assert notes[0].startswith("fastest CPU mode here (the 'fastest' row): compile fp32, of eager fp32, ")
    assert notes[0].endswith("onnxruntime int8, compile fp32")  # no cosine: compile runs the fp32 model itself
    slower = {"compile": EngineTiming(Timing(3.0, 2.9, 3.1), Timing(3.9, 3.8, 4.0))}
    assert compress_cli._time_fastest(None, None, torch.zeros(2, 3, 8, 8), [], timed=slower).mode == "eager fp32"
