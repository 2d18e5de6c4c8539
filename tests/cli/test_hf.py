"""``utilrank analyze`` / ``compress`` with ``--model hf:DIR``: a tiny random BERT on ``--data text:FILE`` (cosine to
the dense model) and a tiny random ViT on an ImageFolder (accuracy), end to end; ``load_compressed`` gives the model
the command saved; the folders record their input and preprocessing, and ``utilrank export`` and ``utilrank bench
--compressed`` take them as they are. Nothing is downloaded (``HF_HUB_OFFLINE=1``)."""

import io
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from _data import make_imagefolder  # noqa: E402
from _hf import make_bert, make_text, make_vit  # noqa: E402

from utilrank_kernels import load_compressed  # noqa: E402
from utilrank_kernels.cli import main  # noqa: E402
from utilrank_kernels.data import load_text_splits  # noqa: E402
from utilrank_kernels.export import missing_packages  # noqa: E402
from utilrank_kernels.metrics import embeddings  # noqa: E402
from utilrank_kernels.models import hf  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-bert")
    make_bert(root / "bert")
    make_text(root / "lines.txt", 80)
    return root


def test_analyze_bert_on_text(bert_folder, tmp_path, capsys, one_thread):
    out = tmp_path / "analyze"
    assert main(["analyze", "--model", f"hf:{bert_folder / 'bert'}", "--data", f"text:{bert_folder / 'lines.txt'}",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [row["name"] for row in report["layers"]]
    assert names[0] == "encoder.layer.0.attention.self.query" and "pooler.dense" in names  # BertModel's own
    # the pad tokens are not counted: the tokens are the real ones of the train lines
    data = load_text_splits(bert_folder / "lines.txt", hf.tokenizer(f"hf:{bert_folder / 'bert'}"))
    real = sum(int(data.train[i]["attention_mask"].sum()) for i in range(len(data.train)))
    assert report["tokens"] == real < len(data.train) * data.train[0]["input_ids"].numel()
    assert 0 < report["mlu"] < 1 and "MLU" in capsys.readouterr().out


def test_compress_bert_cosine_and_load(bert_folder, tmp_path, capsys, one_thread):
    bert, lines = f"hf:{bert_folder / 'bert'}", f"text:{bert_folder / 'lines.txt'}"
    out = tmp_path / "compress"
    # fine-tuning on labels, distillation on logits and top-1 agreement need labels or a head: each refused in one
    # line, before any pass
    for option, words in ((["--distill", "off"], ("--distill off", "no classification head", "--finetune-epochs 0")),
                          (["--distill", "logits"], ("--distill logits", "no class logits", "--distill embedding")),
                          (["--metric", "agreement"], ("--metric agreement", "no classification head"))):
        assert main(["compress", "--model", bert, "--data", lines, *option, "--engines", "eager", "--out",
                     str(out)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and all(w in errors[0] for w in words), errors
        assert not out.exists() and not (tmp_path / "compress.partial" / "stats.safetensors").exists()
    assert main(["compress", "--model", bert, "--data", lines, "--metric", "accuracy", "--engines", "eager", "--out",
                 str(out)]) == 2
    assert "no classification head" in capsys.readouterr().err
    # the cosine search over the second block's layers; the rest cut at --energy
    assert main(["compress", "--model", bert, "--data", lines, "--metric", "cosine", "--finetune-epochs", "0",
                 "--tolerance", "2", "--include", "encoder.layer.1.*", "--energy", "0.95", "--engines", "eager",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test cosine" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "cosine" and summary["dense"]["cosine"] == pytest.approx(1.0)
    assert summary["compressed"]["params"] < summary["dense"]["params"]
    assert 0 < summary["compressed"]["flops"] < summary["dense"]["flops"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layers"] and all(n.startswith("encoder.layer.1.") for n in plan["layers"])
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == "hf" and config["task"] == "encoder"

    # the saved folder rebuilds the model; its cosine to the dense model on the test split is the summary's
    small = load_compressed(out)
    dense, _ = hf.load_hf_model(bert)
    data = load_text_splits(bert_folder / "lines.txt", hf.tokenizer(bert))
    got, ref = embeddings(small, data.test), embeddings(dense, data.test)
    cosine = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1).mean().item()
    assert cosine == pytest.approx(summary["compressed"]["cosine"], abs=1e-5)


def test_compress_bert_distils_without_labels(bert_folder, tmp_path, capsys, one_thread):
    """The default --distill auto fine-tunes an encoder on unlabelled text by distillation on its output embedding:
    the summary says so, and the held-out cosine to the dense model (1 - the distillation loss) rises over the
    projected model's."""
    out = tmp_path / "distilled"
    assert main(["compress", "--model", f"hf:{bert_folder / 'bert'}", "--data", f"text:{bert_folder / 'lines.txt'}",
                 "--method", "svd", "--no-search", "--energy", "0.6", "--finetune-epochs", "1", "--lr", "1e-4",
                 "--finetune-batch-size", "16", "--engines", "eager", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuning loss (--distill auto): embedding" in printed and "distilled from the dense" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune_loss"] == "embedding" and summary["finetune_epochs"] == 1
    assert 1 - summary["compressed"]["cosine"] < 0.5 * (1 - summary["projected"]["cosine"])


def test_compress_vit_on_imagefolder(tmp_path, capsys, one_thread):
    make_vit(tmp_path / "vit", num_labels=3)
    images = make_imagefolder(tmp_path / "images", per_class=8)
    out = tmp_path / "out"
    assert main(["compress", "--model", f"hf:{tmp_path / 'vit'}", "--data", str(images), "--no-search",
                 "--energy", "0.9", "--finetune-epochs", "1", "--engines", "eager", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and summary["compressed"]["params"] < summary["dense"]["params"]
    plan = json.loads((out / "plan.json").read_text())
    assert "vit.embeddings.patch_embeddings.projection" in plan["layers"]  # ViTForImageClassification's own names
    model = load_compressed(out)
    assert type(model).__name__ == "ViTForImageClassification"
    from utilrank_kernels.data import load_imagefolder_splits
    from utilrank_kernels.train import evaluate

    data = load_imagefolder_splits(images, transform=hf.image_transform(f"hf:{tmp_path / 'vit'}"), img_size=32)
    assert evaluate(model, data.test) == pytest.approx(summary["compressed"]["accuracy"])
    # a head with other classes than the data: one line that names --num-classes
    make_vit(tmp_path / "vit5", num_labels=5)
    assert main(["analyze", "--model", f"hf:{tmp_path / 'vit5'}", "--data", str(images), "--out",
                 str(tmp_path / "a")]) == 2
    assert "--num-classes 3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A tiny BERT on text and a tiny 32-px ViT on images, each compressed by the command (energy cut, no
    fine-tuning): the folders a deployer is handed."""
    root = tmp_path_factory.mktemp("hf-deploy")
    make_bert(root / "bert")
    make_text(root / "lines.txt", 40)
    make_vit(root / "vit", num_labels=3)
    images = make_imagefolder(root / "images", per_class=6)
    common = ["--no-search", "--energy", "0.9", "--finetune-epochs", "0", "--engines", "eager"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        assert main(["compress", "--model", f"hf:{root / 'bert'}", "--data", f"text:{root / 'lines.txt'}",
                     "--metric", "cosine", "--max-length", "24", *common, "--out", str(root / "c-bert")]) == 0
        assert main(["compress", "--model", f"hf:{root / 'vit'}", "--data", str(images), *common, "--out",
                     str(root / "c-vit")]) == 0
    return root


def test_hf_folders_record_their_input_and_preprocessing(hf_folders):
    """config.json says what the model takes and how the data was prepared; the tokenizer and image processor
    files are in the folder's preprocessing/, and load from there as from the model folder."""
    from transformers import AutoImageProcessor, AutoTokenizer

    text = json.loads((hf_folders / "c-bert" / "config.json").read_text())["input"]
    assert text["kind"] == "text" and text["names"] == ["input_ids", "attention_mask"]
    assert text["max_length"] == 24 and text["vocab_size"] == 94 and text["pad_token_id"] == 0
    assert sorted(text["files"]) == ["preprocessing/tokenizer.json", "preprocessing/tokenizer_config.json",
                                     "preprocessing/vocab.txt"]
    ours = AutoTokenizer.from_pretrained(hf_folders / "c-bert" / "preprocessing", local_files_only=True)
    theirs = hf.tokenizer(f"hf:{hf_folders / 'bert'}")
    assert ours("the cat sat on a mat")["input_ids"] == theirs("the cat sat on a mat")["input_ids"]
    manifest = json.loads((hf_folders / "c-bert" / "manifest.json").read_text())
    assert "preprocessing/vocab.txt" in manifest["files"]  # verified with the rest by load_compressed

    image = json.loads((hf_folders / "c-vit" / "config.json").read_text())["input"]
    assert image["kind"] == "image" and image["names"] == ["pixel_values"] and image["size"] == [3, 32, 32]
    assert image["mean"] == [0.5] * 3 and image["std"] == [0.5] * 3 and image["interpolation"] == "bilinear"
    processor = AutoImageProcessor.from_pretrained(hf_folders / "c-vit" / "preprocessing", local_files_only=True)
    assert processor.size == {"height": 32, "width": 32}


@pytest.mark.skipif(bool(missing_packages()), reason="the deploy extra (onnx, onnxscript, onnxruntime)")
def test_hf_text_folder_exports_and_benches(hf_folders, tmp_path, capsys, one_thread):
    """`utilrank export` of an HF text folder: input_ids and attention_mask with dynamic batch and sequence, which
    onnxruntime runs at another batch and length, padded, as the folder's model computes; `bench --compressed`
    times it on token batches of the recorded length."""
    import onnxruntime as ort

    folder, onnx_file = hf_folders / "c-bert", tmp_path / "bert.onnx"
    assert main(["export", str(folder), "--out", str(onnx_file)]) == 0
    printed = capsys.readouterr().out
    assert "input 24 tokens (input_ids, attention_mask), dynamic length" in printed
    assert "inputs input_ids, attention_mask, outputs last_hidden_state, pooler_output" in printed
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 94, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.inference_mode():
        want = load_compressed(folder)(input_ids=ids, attention_mask=mask)
    assert float((torch.from_numpy(got[0]) - want.last_hidden_state).abs().max()) < 1e-4
    assert float((torch.from_numpy(got[1]) - want.pooler_output).abs().max()) < 1e-4

    out = tmp_path / "bench.json"
    assert main(["bench", "--compressed", str(folder), "--device", "cpu", "--batch-sizes", "2", "--warmup", "1",
                 "--iters", "2", "--no-plot", "--out", str(out)]) == 0
    assert "input 24 tokens (input_ids, attention_mask)" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "compressed"] and not any("error" in r for r in rows)
    assert rows[1]["params"] < rows[0]["params"] and rows[1]["theoretical_speedup"] > 1


@pytest.mark.skipif(bool(missing_packages()), reason="the deploy extra (onnx, onnxscript, onnxruntime)")
def test_hf_vit_folder_exports_and_benches_at_its_own_size(hf_folders, tmp_path, capsys, one_thread):
    """The 32-px HF ViT exports at 32 px (its pixel_values input, its logits output) and benches there; another
    --input-size is checked against the model before any timing."""
    import onnxruntime as ort

    folder, onnx_file = hf_folders / "c-vit", tmp_path / "vit.onnx"
    assert main(["export", str(folder), "--out", str(onnx_file)]) == 0
    assert "input (3, 32, 32)" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"] and session.get_inputs()[0].shape[1:] == [3, 32,
                                                                                                                 32]
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        want = load_compressed(folder)(x).logits
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    assert float((torch.from_numpy(got) - want).abs().max()) < 1e-4

    out = tmp_path / "bench.json"
    argv = ["bench", "--compressed", str(folder), "--device", "cpu", "--batch-sizes", "2", "--warmup", "1", "--iters",
            "2", "--no-plot", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["img_size"] for r in rows] == [32, 32] and not any("error" in r for r in rows)
    assert main([*argv, "--input-size", "3,64,64"]) == 2
    assert "--input-size 3,64,64: the model does not run on it" in capsys.readouterr().err


def test_a_folder_naming_custom_code_is_refused_and_its_code_never_runs(tmp_path, monkeypatch, capsys):
    """A folder whose config.json maps the Auto classes to a .py file beside it (an unknown model_type: transformers
    would ask whether to run it) is refused in one line, with "y" on standard input; the file's code, which would
    write a marker, never runs. The control: trusted, transformers does run it (in a child process, its module cache
    in the test's folder)."""
    import subprocess
    import sys

    from _bad.hf_and_deploy import EVIL, custom_model_code

    folder = tmp_path / "bert"
    make_bert(folder)
    make_text(tmp_path / "lines.txt", 20)
    custom_model_code(folder)
    assert (folder / "evil.py").read_text() == EVIL.format(marker=str(folder / "MARKER"))
    marker = folder / "MARKER"
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    capsys.readouterr()
    for command in ("analyze", "compress"):
        assert main([command, "--model", f"hf:{folder}", "--data", f"text:{tmp_path / 'lines.txt'}", "--out",
                     str(tmp_path / command)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "names custom code (auto_map" in err and "Traceback" not in err
        assert not marker.exists() and not (tmp_path / command).exists()
    with pytest.raises(ValueError, match="custom code"):
        hf.load_hf_model(f"hf:{folder}")
    assert not marker.exists()

    trusted = (f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(folder)!r}, "
               "trust_remote_code=True, local_files_only=True)")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", trusted], env=env, check=True, capture_output=True, timeout=300)
    assert marker.read_text() == "custom code ran"
