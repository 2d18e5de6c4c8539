"""The metrics ``compress_model(metric=...)`` takes: the output embedding, the cosine to a reference model, and
which metric a model and its data allow."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("transformers")

from _hf import bert_config, make_text, make_tokenizer  # noqa: E402

from utilrank_kernels.data import load_text_splits  # noqa: E402
from utilrank_kernels.metrics import OutputCosine, embeddings, output_embedding, select_metric  # noqa: E402


@pytest.fixture(scope="module")
def bert_and_text(tmp_path_factory):
    from transformers import BertModel

    root = tmp_path_factory.mktemp("metrics")
    torch.manual_seed(0)
    data = load_text_splits(make_text(root / "lines.txt", 40), make_tokenizer(root), 32)
    return BertModel(bert_config()).eval(), data


def test_mean_embedding_skips_padding(bert_and_text, one_thread):
    """The masked mean of each sequence equals the plain mean of that sequence run alone, unpadded (fp64)."""
    model, data = bert_and_text
    model = copy.deepcopy(model).double()
    rows = embeddings(model, data.test)
    for i in range(len(data.test)):
        n = int(data.test[i]["attention_mask"].sum())
        alone = {k: v[None, :n] for k, v in data.test[i].items()}
        with torch.no_grad():
            expected = model(**alone).last_hidden_state[0].mean(0)
        torch.testing.assert_close(rows[i].double(), expected, rtol=1e-6, atol=1e-6)  # rows are fp32
    assert any(int(data.test[i]["attention_mask"].sum()) < data.test[i]["input_ids"].numel()
               for i in range(len(data.test)))  # the split really pads


def test_output_cosine(bert_and_text, one_thread):
    model, data = bert_and_text
    cosine = OutputCosine(model)
    assert cosine(model, data.test) == pytest.approx(1.0, abs=1e-6)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        noisy.encoder.layer[1].output.dense.weight.add_(torch.randn_like(noisy.encoder.layer[1].output.dense.weight))
    expected = torch.nn.functional.cosine_similarity(embeddings(noisy, data.test).double(),
                                                     embeddings(model, data.test).double(), dim=-1).mean().item()
    assert cosine(noisy, data.test) == pytest.approx(expected, abs=1e-6) and expected < 0.999


def test_output_embedding_fallbacks():
    hidden = torch.randn(2, 3, 4)
    pooled = torch.randn(2, 4)
    out = SimpleNamespace(last_hidden_state=hidden, pooler_output=pooled)
    torch.testing.assert_close(output_embedding(out, None), hidden.mean(1))
    assert output_embedding(out, None, "pooler") is pooled
    assert output_embedding(SimpleNamespace(logits=pooled)) is pooled
    torch.testing.assert_close(output_embedding(hidden), hidden.flatten(1))  # a plain tensor (a timm model's logits)


def test_select_metric(bert_and_text):
    model, data = bert_and_text
    assert select_metric(None, model, data)[0] == "cosine"  # an encoder on unlabelled text
    with pytest.raises(ValueError, match="no classification head"):
        select_metric("accuracy", model, data)
    classifier = torch.nn.Linear(4, 3)
    images = SimpleNamespace(val=TensorDataset(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), name="x")
    assert select_metric(None, classifier, images)[0] == "accuracy"
    assert select_metric("cosine", classifier, images)[0] == "cosine"
