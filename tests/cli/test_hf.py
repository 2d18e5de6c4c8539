"""``utilrank analyze`` / ``compress`` with ``--model hf:DIR``: a tiny random BERT on ``--data text:FILE`` (cosine to
the dense model) and a tiny random ViT on an ImageFolder (accuracy), end to end; ``load_compressed`` gives the model
the command saved. Nothing is downloaded (``HF_HUB_OFFLINE=1``)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from _data import make_imagefolder  # noqa: E402
from _hf import make_bert, make_text, make_vit  # noqa: E402

from utilrank_kernels import load_compressed  # noqa: E402
from utilrank_kernels.cli import main  # noqa: E402
from utilrank_kernels.data import load_text_splits  # noqa: E402
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
    # fine-tuning needs labels and a head: the default 20 epochs are refused in one line, before any pass
    assert main(["compress", "--model", bert, "--data", lines, "--engines", "eager", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--finetune-epochs 0" in errors[0]
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
