"""Hugging Face models from a local folder: the model's own layer names, and ``save_compressed`` /
``load_compressed`` rebuilding the architecture from ``config.json`` alone (no folder, no download)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from _hf import make_bert, make_text, make_vit  # noqa: E402

from utilrank_kernels import CompressConfig, TrainRecipe, compress_model, load_compressed, save_compressed  # noqa: E402
from utilrank_kernels.data import load_text_splits  # noqa: E402
from utilrank_kernels.data.batch import call_model, model_input  # noqa: E402
from utilrank_kernels.metrics import OutputCosine  # noqa: E402
from utilrank_kernels.models import hf  # noqa: E402

NO_FINETUNE = TrainRecipe(epochs=0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub access would fail, not hang or download


@pytest.mark.parametrize("head, auto_class, task", [
    ("encoder", "BertModel", "encoder"),
    ("classifier", "BertForSequenceClassification", "sequence-classification"),
])
def test_load_hf_model_class_and_names(tmp_path, head, auto_class, task):
    saved = make_bert(tmp_path, head)
    model, config = hf.load_hf_model(f"hf:{tmp_path}")
    assert type(model).__name__ == auto_class and config["task"] == task and config["source"] == "hf"
    # the model as the user loads it, unwrapped: the same module names and weights
    assert [n for n, _ in model.named_modules()] == [n for n, _ in saved.named_modules()]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values(),
                                                  strict=True))
    assert hf.has_classification_head(model) == (head != "encoder")
    json.dumps(config)  # config.json-ready


def test_hf_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf_model(f"hf:{tmp_path}")


def _text_data(tmp_path, bert_dir):
    return load_text_splits(make_text(tmp_path / "lines.txt", 40), hf.tokenizer(f"hf:{bert_dir}"), 32)


def _outputs(model, dataset):
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return call_model(model.eval(), model_input(batch, "cpu")[0])


def test_bert_compressed_round_trip_and_names_fit_the_bare_model(tmp_path, one_thread):
    from transformers import AutoModel

    bert_dir = tmp_path / "bert"
    make_bert(bert_dir)
    model, config = hf.load_hf_model(f"hf:{bert_dir}")
    data = _text_data(tmp_path, bert_dir)
    result = compress_model(model, data, CompressConfig(tolerance=None, energy=0.9, finetune=NO_FINETUNE),
                            metric=OutputCosine(model), progress=False)
    assert result.plan.layers and all(n.startswith("encoder.") or n.startswith("pooler.") for n in result.plan.layers)
    # statistics and plan fit the model exactly as AutoModel loads it from the folder
    bare = AutoModel.from_pretrained(bert_dir, local_files_only=True)
    result.statistics.check_model(bare)
    assert set(result.plan.layers) <= {n for n, _ in bare.named_modules()}
    assert 0 < result.scores["projected"]["test"] <= 1 + 1e-6

    out = tmp_path / "compressed"
    save_compressed(result.model, result.plan, config, out)
    stored = json.loads((out / "config.json").read_text())
    assert stored["source"] == "hf" and stored["hf_config"]["model_type"] == "bert"
    import shutil

    shutil.rmtree(bert_dir)  # rebuilt from config.json alone
    loaded = load_compressed(out)
    assert type(loaded).__name__ == "BertModel"
    expected, got = _outputs(result.model, data.test), _outputs(loaded, data.test)
    assert torch.equal(expected.last_hidden_state, got.last_hidden_state)
    assert torch.equal(expected.pooler_output, got.pooler_output)
    # and it is a real cut: outputs differ from the dense model's
    assert not torch.allclose(_outputs(model, data.test).last_hidden_state, got.last_hidden_state, atol=1e-4)


def test_vit_classifier_round_trip(tmp_path, one_thread):
    vit_dir = tmp_path / "vit"
    make_vit(vit_dir)
    model, config = hf.load_hf_model(f"hf:{vit_dir}")
    assert config["task"] == "image-classification"
    images = torch.randn(5, 3, 32, 32)
    data = type("Splits", (), {"train": torch.utils.data.TensorDataset(images, torch.arange(5) % 3)})()
    result = compress_model(model, data, CompressConfig(tolerance=None, energy=0.9, finetune=NO_FINETUNE),
                            score=False, progress=False)
    assert "vit.embeddings.patch_embeddings.projection" in result.statistics.layers  # the patch conv, own name
    save_compressed(result.model, result.plan, config, tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(result.model(images).logits, loaded(images).logits)
