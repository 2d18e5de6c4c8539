"""Hugging Face models from a local folder: the model's own layer names, and ``save_compressed`` /
``load_compressed`` rebuilding the architecture from ``config.json`` alone (no folder, no download)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from _hf import make_bert, make_gpt2, make_text, make_vit  # noqa: E402

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


def test_every_transformers_load_refuses_remote_code(tmp_path, monkeypatch):
    """``trust_remote_code=False`` reaches every ``from_pretrained`` (config, model, tokenizer, image processor), and
    a folder naming custom code is refused before transformers sees it."""
    import transformers

    seen = []
    for cls in ("AutoConfig", "AutoModel", "AutoTokenizer", "AutoImageProcessor", "AutoModelForImageClassification"):
        real = getattr(transformers, cls).from_pretrained

        def recording(*args, _real=real, _cls=cls, **kwargs):
            seen.append((_cls, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", recording)
    make_bert(tmp_path / "bert")
    make_vit(tmp_path / "vit")
    hf.load_hf_model(f"hf:{tmp_path / 'bert'}")
    hf.tokenizer(f"hf:{tmp_path / 'bert'}")
    hf.load_hf_model(f"hf:{tmp_path / 'vit'}")
    hf.image_transform(f"hf:{tmp_path / 'vit'}")
    assert {c for c, _ in seen} == {"AutoConfig", "AutoModel", "AutoTokenizer", "AutoImageProcessor",
                                    "AutoModelForImageClassification"}
    assert all(trust is False for _, trust in seen), seen

    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "m.M"}}))
    (tmp_path / "bert" / "m.py").write_text("raise SystemExit('ran')\n")
    seen.clear()
    with pytest.raises(ValueError, match=r"config.json names custom code \(auto_map"):
        hf.load_hf_model(f"hf:{tmp_path / 'bert'}")
    assert seen == []  # refused before any transformers load


def test_tokenizer_without_vocabulary_or_of_another_model_is_refused(tmp_path):
    """No vocabulary file: refused (transformers would build a tokenizer of the special tokens, every word [UNK]);
    more tokens than the embedding has rows: refused naming both."""
    bert = tmp_path / "bert"
    make_bert(bert)
    config = json.loads((bert / "config.json").read_text())
    hf.check_vocabulary("hf:bert", hf.tokenizer(f"hf:{bert}"), config)  # its own: fits
    with pytest.raises(ValueError, match=r"has 94 tokens, the model's embedding 50 rows"):
        hf.check_vocabulary("hf:bert", hf.tokenizer(f"hf:{bert}"), {**config, "vocab_size": 50})
    for name in ("tokenizer.json", "vocab.txt"):
        (bert / name).unlink()
    with pytest.raises(ValueError, match="no tokenizer in"):
        hf.tokenizer(f"hf:{bert}")


def test_gpt2_conv1d_layers_run_as_linear_and_round_trip(tmp_path, one_thread):
    """GPT-2's transformers Conv1D layers (weight stored (in, out)) become the nn.Linear they compute: same names,
    same outputs; they are analyzed and factored like any linear layer, and the folder rebuilds them so."""
    from transformers import AutoModel
    from transformers.pytorch_utils import Conv1D

    make_gpt2(tmp_path / "gpt2")
    model, config = hf.load_hf_model(f"hf:{tmp_path / 'gpt2'}")
    original = AutoModel.from_pretrained(tmp_path / "gpt2", local_files_only=True).eval()
    conv1d = [n for n, m in original.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8 and config["conv1d_as_linear"] == conv1d
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in conv1d)
    ids = torch.randint(0, 257, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).last_hidden_state, want, atol=1e-6)

    data = load_text_splits(make_text(tmp_path / "lines.txt", 30), hf.tokenizer(f"hf:{tmp_path / 'gpt2'}"), 32)
    result = compress_model(model, data, CompressConfig(tolerance=None, energy=0.9, finetune=NO_FINETUNE),
                            score=False, progress=False)
    assert set(result.plan.layers) == set(conv1d)  # every Conv1D analyzed and factored
    save_compressed(result.model, result.plan, config, tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    with torch.no_grad():
        expected = result.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, expected)


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
